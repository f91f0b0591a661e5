"""Pure statistics of one routing map, as device tensors (no host sync): what ``C2RMetrics``
records per MoE layer and forward (``megatron_c2r.metrics``), and the host step that turns the
reduced load table into busiest-over-mean ratios.

Shape suffixes: T tokens, E experts, P EP ranks, L experts per rank (E/P), G EP ranks per node,
D nodes (P/G), X load columns (P + 2).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from megatron_c2r.routing.functional import groups_per_token

# Rows of the load table (one per busiest-over-mean metric), in the order ranks agree on:
#   busiest_rank_tokens_over_mean  expert input rows ((token, expert) pairs) an EP rank receives
#   busiest_rank_rows_over_mean    rows an EP rank receives from a one-row-per-(token, rank)
#                                  dispatcher (ours, flat or two-level's last hop)
#   busiest_node_tokens_over_mean  expert input rows a node's ranks receive
#   busiest_node_rows_over_mean    rows a node receives, one per (token, node) (the two-level
#                                  dispatcher's node rows, own node included)
LOAD_NAMES = (
    "busiest_rank_tokens_over_mean",
    "busiest_rank_rows_over_mean",
    "busiest_node_tokens_over_mean",
    "busiest_node_rows_over_mean",
)


def _masked(routing_map_TE: torch.Tensor, padding_T: Optional[torch.Tensor]) -> torch.Tensor:
    """The bool map with padding tokens' rows cleared (masked, not indexed away: no sync)."""
    rmap_TE = routing_map_TE.bool()
    if padding_T is not None:
        rmap_TE = rmap_TE & ~padding_T.reshape(rmap_TE.shape[0], 1).bool()
    return rmap_TE


@torch.no_grad()
def routing_stats(
    routing_map_TE: torch.Tensor,
    *,
    ep_size: int,
    ep_rank: int = 0,
    expert_to_group_E: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    padding_T: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Routing statistics of one forward, as 0-dim float32 tensors on the map's device.

    No host sync: padding tokens are masked out of the map instead of indexed away (every
    statistic counts routed entries only, so a padded token with no experts adds nothing).

    Args:
        routing_map_TE: bool [T, E], token t uses expert e.
        ep_size, ep_rank: EP ranks P (expert e lives on rank e // (E/P)) and this rank.
        expert_to_group_E: int64 [E] group per expert (None -> the EP blocks); needs
            ``num_groups``.
        padding_T: bool [T] (any shape with T elements), True for padding tokens (excluded).
    """
    T, E = routing_map_TE.shape
    L, device = E // ep_size, routing_map_TE.device
    rmap_TE = _masked(routing_map_TE, padding_T)
    experts_E = torch.arange(E, device=device)
    # Distinct EP ranks per token: the groups-per-token rule with the EP blocks as groups.
    ranks_T = groups_per_token(
        rmap_TE, experts_E // L, ep_size, groups_GN=experts_E.view(ep_size, L)
    ).float()
    local_T = rmap_TE[:, ep_rank * L : (ep_rank + 1) * L].any(dim=1)  # a row to this rank
    experts_T = rmap_TE.sum(dim=1).float()
    routed_T = experts_T > 0
    n_routed = routed_T.sum().clamp(min=1).float()
    rows = ranks_T.sum().clamp(min=1)
    ranks_per_token = ranks_T.sum() / n_routed
    alltoall = experts_T.sum() / n_routed

    tokens_E = rmap_TE.sum(dim=0).float()
    mean_E = tokens_E.mean().clamp(min=1e-12)
    tokens_P = tokens_E.view(ep_size, -1).sum(dim=1)

    if expert_to_group_E is None:
        expert_to_group_E, num_groups = experts_E // L, ep_size
    elif num_groups is None:
        raise ValueError(
            "routing_stats got expert_to_group_E without num_groups; pass num_groups (reading "
            "it from the map's max would sync with the device)"
        )
    per_group_TG = torch.zeros(T, num_groups, device=device)
    per_group_TG.index_add_(1, expert_to_group_E.to(device), rmap_TE.float())
    intra = (per_group_TG * (per_group_TG - 1) / 2).sum()
    pairs = (experts_T * (experts_T - 1) / 2).sum()
    return {
        "ranks_per_token": ranks_per_token,
        "rows_per_token_alltoall": alltoall,
        "row_reduction": alltoall / ranks_per_token.clamp(min=1e-12),
        "remote_fraction": (ranks_T.sum() - local_T.sum()) / rows,
        "intra_group_share": torch.where(
            pairs > 0, intra / pairs.clamp(min=1), torch.ones_like(pairs)
        ),
        "tokens_per_expert_max_over_mean": tokens_E.max() / mean_E,
        "tokens_per_expert_cv": tokens_E.std(unbiased=False) / mean_E,
        "overload_factor": tokens_P.max() / tokens_P.mean().clamp(min=1e-12),
    }


@torch.no_grad()
def routing_loads(
    routing_map_TE: torch.Tensor,
    *,
    ep_size: int,
    ranks_per_node: Optional[int] = None,
    padding_T: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """What this rank's tokens load onto every EP rank and node, for the busiest-over-mean
    metrics: summed over a group's ranks (every source), a row is what each destination
    receives. No host sync, O(T x E).

    Args:
        routing_map_TE: bool [T, E]; expert e lives on EP rank e // (E/P).
        ep_size: P. ranks_per_node: G (EP ranks e // (E/P) // G share node d); None = unknown
            (the node rows stay empty).
        padding_T: bool, True for padding tokens (excluded).

    Returns:
        ``load_4X`` float64 [4, P + 2] on the map's device; rows :data:`LOAD_NAMES`; columns
        0..P-1 the load per EP rank (rank rows) or per node (node rows: column d < D, zeros
        after), column P the slots the row uses (P, D, or 0 when nodes are unknown), column
        P + 1 one (this record). Sums of such tables stay meaningful: slots / records is the
        slot count.
    """
    T, E = routing_map_TE.shape
    P = ep_size
    rmap_TPL = _masked(routing_map_TE, padding_T).view(T, P, E // P)
    tokens_P = rmap_TPL.sum(dim=(0, 2)).double()
    rows_P = rmap_TPL.any(dim=2).sum(dim=0).double()
    zeros_P = torch.zeros_like(tokens_P)
    tokens_D = rows_D = zeros_P
    D = 0
    if ranks_per_node is not None:
        D = P // ranks_per_node
        pad = torch.zeros(P - D, dtype=torch.float64, device=tokens_P.device)
        tokens_D = torch.cat([tokens_P.view(D, ranks_per_node).sum(dim=1), pad])
        rows_D = torch.cat([rmap_TPL.reshape(T, D, -1).any(dim=2).sum(dim=0).double(), pad])
    # Slot counts and the record column as fills on the device: a host tensor copied over
    # would be a blocking host->device copy per forward.
    slots_4 = torch.full((4,), float(P), dtype=torch.float64, device=tokens_P.device)
    slots_4[2:] = float(D)
    loads_4P = torch.stack([tokens_P, rows_P, tokens_D, rows_D])
    return torch.cat([loads_4P, slots_4.view(4, 1), torch.ones_like(slots_4).view(4, 1)], dim=1)


def busiest_over_mean(row: Sequence[float]) -> Optional[float]:
    """One host row of a (summed) :func:`routing_loads` table -> the busiest slot's load over
    the mean load, or None when it holds no slots or no load. Pure Python."""
    records = row[-1]
    if records <= 0:
        return None
    slots = int(round(row[-2] / records))
    loads = row[:slots]
    total = sum(loads)
    if slots < 1 or total <= 0:
        return None
    return max(loads) / (total / slots)
