"""Which ranks of an expert-parallel (EP) group share a node: learned once, at construction.

The two-level dispatcher optimises the hop that leaves the node, so it has to know the nodes. A
:class:`NodeTopology` is a pure description (EP size, EP ranks per node, this rank); it comes from
the real process placement through :func:`discover_topology` (one all-gather of a node key, a hash
of the hostname, over the EP group) or from an explicit ``gpus_per_node`` (tests, and simulating
nodes on one CPU machine: node = global rank // gpus_per_node, no collective).

Layout contract (REFERENCE.md section 10): nodes hold equal, contiguous blocks of EP ranks. With
Megatron's rank order and expert-tensor-parallel 1 the EP ranks of one group are consecutive global
ranks, so this holds; anything else is rejected with a one-line error naming the parallel sizes.
EP rank r then sits on node r // G at local index r % G (G = EP ranks per node), and with
Megatron's expert blocks (rank r owns [r*L, (r+1)*L)) node n owns the experts [n*G*L, (n+1)*G*L).

Vocabulary: a *rail* is the set of EP ranks with the same local index on every node (DeepEP's
inter-node peers: rank (n, g) talks across nodes only to (m, g)).
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch.distributed as dist


@dataclass(frozen=True)
class NodeTopology:
    """Node layout of one EP group, seen from one of its ranks.

    Attributes:
        ep_size: P, ranks in the EP group.
        ranks_per_node: G, EP ranks on each node (P % G == 0; N = P / G nodes).
        rank: this rank's index in the EP group.
    """

    ep_size: int
    ranks_per_node: int
    rank: int

    def __post_init__(self):
        P, G = self.ep_size, self.ranks_per_node
        if P < 1 or G < 1 or P % G != 0:
            raise ValueError(
                f"ranks_per_node={G} must be a positive divisor of ep_size={P}; pick a divisor"
            )
        if not 0 <= self.rank < P:
            raise ValueError(f"rank={self.rank} must be in [0, ep_size={P}); pass the EP rank")

    @property
    def num_nodes(self) -> int:
        """N, nodes the EP group spans."""
        return self.ep_size // self.ranks_per_node

    @property
    def node(self) -> int:
        """This rank's node index (0..N-1)."""
        return self.rank // self.ranks_per_node

    @property
    def local_index(self) -> int:
        """This rank's index inside its node (0..G-1), i.e. its rail."""
        return self.rank % self.ranks_per_node

    @property
    def is_multi_node(self) -> bool:
        """True when the EP group spans more than one node (the two-level dispatcher pays off)."""
        return self.num_nodes > 1

    def node_of(self, ep_rank: int) -> int:
        """Node of EP rank ``ep_rank``."""
        return ep_rank // self.ranks_per_node

    def rank_of(self, node: int, local_index: int) -> int:
        """EP rank at ``local_index`` on ``node``."""
        return node * self.ranks_per_node + local_index

    def rail_peers(self) -> list[int]:
        """EP ranks with this rank's local index on every node (self included), node order: the
        ranks this rank exchanges inter-node rows with."""
        return [self.rank_of(n, self.local_index) for n in range(self.num_nodes)]

    def node_peers(self) -> list[int]:
        """EP ranks on this rank's node (self included), local-index order."""
        return [self.rank_of(self.node, g) for g in range(self.ranks_per_node)]

    def experts_per_node(self, num_experts: int) -> int:
        """E / N; raises if the experts do not split evenly over the EP ranks."""
        if num_experts < 1 or num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_moe_experts={num_experts} must be a positive multiple of "
                f"expert_model_parallel_size={self.ep_size}; change either"
            )
        return num_experts // self.num_nodes

    def node_experts(self, node: int, num_experts: int) -> range:
        """The contiguous block of global expert ids node ``node`` owns."""
        K = self.experts_per_node(num_experts)
        return range(node * K, (node + 1) * K)


def node_key(hostname: Optional[str] = None) -> int:
    """A stable 63-bit integer naming this process's node (blake2b of the hostname; Python's
    ``hash`` is salted per process, so it cannot be compared across ranks)."""
    name = socket.gethostname() if hostname is None else hostname
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 1


def topology_from_node_keys(
    keys: Sequence[int], rank: int, parallel_sizes: Optional[Mapping[str, int]] = None
) -> NodeTopology:
    """The :class:`NodeTopology` for EP ranks whose nodes are named by ``keys`` (pure).

    Args:
        keys: one node key per EP rank, EP-rank order (any hashable values).
        rank: this rank's EP index.
        parallel_sizes: named sizes for the error message (e.g. tensor/expert/expert-tensor
            parallel sizes), so a user can see which setting breaks the layout.

    Raises:
        ValueError (one line) unless the nodes are equal, contiguous blocks of EP ranks.
    """
    P = len(keys)
    blocks: list[tuple[object, int]] = []  # (key, length) of each run of equal keys
    for key in keys:
        if blocks and blocks[-1][0] == key:
            blocks[-1] = (key, blocks[-1][1] + 1)
        else:
            blocks.append((key, 1))
    sizes = {length for _, length in blocks}
    distinct = len({key for key, _ in blocks})
    if distinct != len(blocks) or len(sizes) != 1:
        node_ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        where = ", ".join(f"{k}={v}" for k, v in (parallel_sizes or {}).items())
        raise ValueError(
            f"the EP group's nodes must be equal, contiguous blocks of EP ranks, but EP ranks "
            f"0..{P - 1} sit on nodes {[node_ids[k] for k in keys]} ({where or f'ep_size={P}'}); "
            f"use expert_tensor_parallel_size=1 and Megatron's rank order, equal GPUs per node, "
            f"or hierarchy='flat'"
        )
    return NodeTopology(ep_size=P, ranks_per_node=sizes.pop(), rank=rank)


def discover_topology(
    group: Optional[dist.ProcessGroup] = None,
    *,
    gpus_per_node: Optional[int] = None,
    key: Optional[int] = None,
    parallel_sizes: Optional[Mapping[str, int]] = None,
) -> NodeTopology:
    """This EP group's :class:`NodeTopology`, from the real placement or a simulated one.

    Args:
        group: the EP process group (``None`` = the default group).
        gpus_per_node: if given, no collective: the node of an EP rank is its *global* rank //
            ``gpus_per_node`` (for tests, and for simulating nodes on one machine).
        key: this process's node key (default :func:`node_key` of the hostname); tests pass
            fake keys to exercise the real all-gather.
        parallel_sizes: named sizes for the layout error (see :func:`topology_from_node_keys`).

    Returns:
        The topology. Collective on ``group`` unless ``gpus_per_node`` is given: one
        ``all_gather_object`` (device-agnostic: gloo on CPU, NCCL on the current device), meant
        for construction time, never the hot path. Without an initialised process group: one rank.
    """
    if not dist.is_initialized():
        return NodeTopology(ep_size=1, ranks_per_node=1, rank=0)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise ValueError(f"gpus_per_node={gpus_per_node} must be >= 1; pass GPUs per node")
        keys = [g // gpus_per_node for g in dist.get_process_group_ranks(group or dist.group.WORLD)]
    else:
        keys = [None] * world
        dist.all_gather_object(keys, node_key() if key is None else key, group=group)
    sizes = dict(parallel_sizes or {})
    sizes.setdefault("ep_size", world)
    if gpus_per_node is not None:
        sizes.setdefault("gpus_per_node", gpus_per_node)
    return topology_from_node_keys(keys, rank, sizes)
