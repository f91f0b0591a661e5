"""Pure routing functions: tensor in, tensor out, no Megatron imports, CPU-testable.

Shape legend used across this package:
    T  tokens (S*B flattened)      E  experts         K  top-k
    G  groups (EP ranks by default) N  experts per group (E // G)
    L  top-T list length
"""

from megatron_c2r.routing.functional import (
    c2r_topk,
    group_topk,
    groups_from_expert_to_group,
    probs_from_selection,
    validate_groups,
    validate_top_t_lists,
)
from megatron_c2r.routing.penalty import collaboration_penalty

__all__ = [
    "c2r_topk",
    "group_topk",
    "groups_from_expert_to_group",
    "probs_from_selection",
    "validate_groups",
    "validate_top_t_lists",
    "collaboration_penalty",
]
