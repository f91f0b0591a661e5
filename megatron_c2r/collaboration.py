"""Collaboration (co-activation) counting and the per-layer tracker.

C[i, j] = number of (non-padding) tokens whose routed top-k set contains both experts i and j,
i != j (the C2R paper's collaboration, arXiv 2504.01337; see docs/architecture.md). Only the
ranking of C is ever used (top-T lists, placement), so uniform scalings (e.g. TP ranks seeing
the same tokens) do not matter.

Shape suffixes (the legend of ``megatron_c2r/placement/__init__.py``): T tokens, E experts,
L length of a top-T collaborator list (the paper's "T").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def coactivation_counts(
    routing_map_TE: torch.Tensor, padding_mask_T: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """int64 [E, E] co-activation counts of one routing map, zero diagonal.

    Args:
        routing_map_TE: bool routing map.
        padding_mask_T: bool, True marks padding tokens (Megatron's convention); they are ignored.
    """
    m_TE = routing_map_TE.to(torch.float32)
    if padding_mask_T is not None:
        m_TE = m_TE * (~padding_mask_T.reshape(-1)).to(m_TE.dtype).unsqueeze(1)
    num_experts = m_TE.shape[1]
    counts_EE = torch.zeros(num_experts, num_experts, dtype=torch.int64, device=m_TE.device)
    # fp32 sums of 0/1 products are exact below 2**24; chunk the token dim to stay there.
    for chunk_TE in m_TE.split(1 << 23):
        counts_EE += (chunk_TE.t() @ chunk_TE).round_().to(torch.int64)
    counts_EE.fill_diagonal_(0)
    return counts_EE


def top_t_lists(counts_EE: torch.Tensor, top_t: int) -> torch.Tensor:
    """int64 [E, L], L = ``top_t``: row i = the L most frequent collaborators of expert i (never
    i itself). Ties break towards the lower expert id, so every rank derives the same lists."""
    num_experts = counts_EE.shape[0]
    if counts_EE.dim() != 2 or counts_EE.shape[1] != num_experts:
        raise ValueError(f"counts has shape {tuple(counts_EE.shape)}: expected square [E, E]")
    if not 0 <= top_t <= num_experts - 1:
        raise ValueError(f"top_t={top_t} must be in [0, num_experts-1={num_experts - 1}]")
    key_EE = counts_EE.to(torch.float64).clone()
    key_EE.fill_diagonal_(-1.0)  # below any count
    order_EE = torch.sort(-key_EE, dim=1, stable=True).indices
    return order_EE[:, :top_t].contiguous()


class CollaborationTracker(torch.nn.Module):
    """Per-layer E x E co-activation counts, accumulated over a window.

    Buffers (saved in the module's state_dict):
        counts   int64 [E, E]  counts already summed over the reduce group (identical on all ranks)
        pending  int64 [E, E]  this rank's counts since the last ``reduce_`` (rank-local)
        tokens   int64 []      tokens counted into ``counts``
    ``record`` is called on every counted training forward (no collectives, no host sync);
    ``reduce_`` sums ``pending`` over a process group (data-parallel ranks see different tokens)
    and folds it into ``counts``; call it on all ranks of that group at the same point (when
    lists are derived, and before saving: ``C2RRouter.sharded_state_dict`` does, so torch_dist
    checkpoints hold the whole group's counts).
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("counts", torch.zeros(num_experts, num_experts, dtype=torch.int64))
        self.register_buffer("pending", torch.zeros(num_experts, num_experts, dtype=torch.int64))
        self.register_buffer("pending_tokens", torch.zeros((), dtype=torch.int64))
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def record(
        self, routing_map_TE: torch.Tensor, padding_mask_T: Optional[torch.Tensor] = None
    ) -> None:
        """Add one routing map's co-activation to ``pending`` (no collective, no host sync: the
        padding count stays a device tensor). ``padding_mask_T``: bool, True marks padding."""
        counts_EE = coactivation_counts(routing_map_TE, padding_mask_T)
        self.pending += counts_EE.to(self.pending.device)
        if padding_mask_T is None:
            self.pending_tokens += routing_map_TE.shape[0]
        else:
            self.pending_tokens += (~padding_mask_T.reshape(-1)).sum().to(self.pending_tokens.device)

    @torch.no_grad()
    def reduce_(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Sum ``pending`` over ``group`` (all ranks must call) and fold it into ``counts``."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            packed = torch.cat([self.pending.flatten(), self.pending_tokens.view(1)])
            dist.all_reduce(packed, group=group)
            self.pending.copy_(packed[:-1].view_as(self.pending))
            self.pending_tokens.copy_(packed[-1])
        self.counts += self.pending
        self.tokens += self.pending_tokens
        self.pending.zero_()
        self.pending_tokens.zero_()

    @torch.no_grad()
    def reset_(self) -> None:
        for buf in (self.counts, self.pending, self.tokens, self.pending_tokens):
            buf.zero_()

    def top_t_lists(self, top_t: int) -> torch.Tensor:
        return top_t_lists(self.counts, top_t)
