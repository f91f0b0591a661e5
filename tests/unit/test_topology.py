"""NodeTopology: which EP ranks share a node, and the layout contract (equal contiguous blocks).
The real all-gather over a gloo EP group: tests/distributed/test_two_level_dispatcher.py.
"""

from __future__ import annotations

import hashlib

import pytest

from megatron_c2r.comm.topology import NodeTopology, node_key, topology_from_node_keys


def test_contiguous_equal_blocks_give_nodes_rails_and_expert_blocks():
    topo = topology_from_node_keys(["a", "a", "a", "b", "b", "b"], rank=4)
    assert (topo.ep_size, topo.ranks_per_node, topo.num_nodes) == (6, 3, 2)
    assert (topo.node, topo.local_index, topo.is_multi_node) == (1, 1, True)
    assert topo.rail_peers() == [1, 4]
    assert topo.node_peers() == [3, 4, 5]
    assert [topo.node_of(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    assert topo.rank_of(1, 2) == 5
    assert topo.experts_per_node(12) == 6
    assert topo.node_experts(1, 12) == range(6, 12)


def test_one_node_is_not_multi_node_and_every_rank_is_its_own_node_is():
    assert not topology_from_node_keys([7, 7, 7, 7], rank=2).is_multi_node
    spread = topology_from_node_keys([1, 2, 3, 4], rank=2)
    assert (spread.num_nodes, spread.ranks_per_node, spread.rail_peers()) == (4, 1, [0, 1, 2, 3])


@pytest.mark.parametrize(
    "keys",
    [["a", "b", "a", "b"], ["a", "a", "a", "b"], ["a", "b", "b", "b"], ["a", "b", "b", "a"]],
    ids=["interleaved", "unequal", "unequal-first", "split-node"],
)
def test_non_contiguous_or_unequal_nodes_raise_one_line_naming_the_parallel_sizes(keys):
    sizes = dict(expert_model_parallel_size=4, expert_tensor_parallel_size=2)
    with pytest.raises(ValueError) as err:
        topology_from_node_keys(keys, rank=0, parallel_sizes=sizes)
    message = str(err.value)
    assert "\n" not in message
    assert "expert_model_parallel_size=4" in message and "expert_tensor_parallel_size=2" in message
    assert "hierarchy='flat'" in message


def test_bad_sizes_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"ranks_per_node=3 must be a positive divisor of ep_size"):
        NodeTopology(ep_size=4, ranks_per_node=3, rank=0)
    with pytest.raises(ValueError, match=r"rank=4 must be in \[0, ep_size=4\)"):
        NodeTopology(ep_size=4, ranks_per_node=2, rank=4)
    with pytest.raises(ValueError, match=r"num_moe_experts=6 must be a positive multiple"):
        NodeTopology(ep_size=4, ranks_per_node=2, rank=0).experts_per_node(6)


def test_node_key_is_stable_across_processes_and_separates_hostnames():
    # blake2b, not Python's salted hash(): the same name gives the same key in every process.
    digest = hashlib.blake2b(b"node-017", digest_size=8).digest()
    assert node_key("node-017") == int.from_bytes(digest, "big") >> 1
    assert node_key("node-017") != node_key("node-018")
    assert 0 <= node_key() < 2**63
