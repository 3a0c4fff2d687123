import random

import pytest

from exo.networking.peer_info import PeerInfo
from exo.topology.partitioning import Stage, partition_by_memory, ring_order


def peer(node_id: str, memory: int = 0) -> PeerInfo:
    return PeerInfo(node_id=node_id, host="127.0.0.1", port=5000, memory=memory)


def sizes(stages: list[Stage]) -> list[int]:
    return [s.end_layer - s.start_layer + 1 for s in stages]


def check_cover(stages: list[Stage], n_layers: int) -> None:
    assert stages[0].start_layer == 0
    assert stages[-1].end_layer == n_layers - 1
    for a, b in zip(stages, stages[1:]):
        assert b.start_layer == a.end_layer + 1
    assert all(s.end_layer >= s.start_layer for s in stages)
    assert sum(sizes(stages)) == n_layers


@pytest.mark.parametrize(
    ("n_nodes", "n_layers", "expected"),
    [(2, 30, [15, 15]), (3, 30, [10, 10, 10]), (3, 24, [8, 8, 8]), (1, 7, [7])],
)
def test_equal_memory_splits_evenly(n_nodes, n_layers, expected):
    nodes = [peer(f"n{i}", memory=8 << 30) for i in range(n_nodes)]
    stages = partition_by_memory(nodes, n_layers)
    assert sizes(stages) == expected
    check_cover(stages, n_layers)


def test_zero_memory_everywhere_is_an_equal_split():
    stages = partition_by_memory([peer("a"), peer("b"), peer("c")], 24)
    assert sizes(stages) == [8, 8, 8]
    assert [s.node_id for s in stages] == ["a", "b", "c"]


def test_proportional_to_memory():
    stages = partition_by_memory([peer("small", 8 << 30), peer("big", 16 << 30)], 30)
    assert stages == [Stage("big", 0, 19), Stage("small", 20, 29)]


def test_uneven_split_is_within_one_layer_of_ideal():
    memories = [7, 5, 3, 1]
    nodes = [peer(f"n{i}", m) for i, m in enumerate(memories)]
    stages = partition_by_memory(nodes, 31)
    check_cover(stages, 31)
    for stage, m in zip(stages, sorted(memories, reverse=True)):
        ideal = 31 * m / sum(memories)
        assert abs((stage.end_layer - stage.start_layer + 1) - ideal) < 1


def test_largest_node_holds_layer_zero():
    nodes = [peer("a", 4), peer("b", 32), peer("c", 16)]
    stages = partition_by_memory(nodes, 26)
    assert [s.node_id for s in stages] == ["b", "c", "a"]
    assert stages[0].start_layer == 0


def test_ties_ordered_by_node_id_regardless_of_input_order():
    nodes = [peer("zeta", 8), peer("alpha", 8), peer("mid", 8), peer("huge", 64)]
    expected = partition_by_memory(nodes, 40)
    assert [s.node_id for s in expected] == ["huge", "alpha", "mid", "zeta"]
    rng = random.Random(3)
    for _ in range(10):
        shuffled = nodes[:]
        rng.shuffle(shuffled)
        assert partition_by_memory(shuffled, 40) == expected
    assert [p.node_id for p in ring_order(nodes)] == ["huge", "alpha", "mid", "zeta"]


def test_tiny_node_still_gets_a_layer():
    nodes = [peer("big", 1000), peer("tiny", 1), peer("tiny2", 1)]
    stages = partition_by_memory(nodes, 10)
    assert sizes(stages) == [8, 1, 1]
    check_cover(stages, 10)


def test_as_many_nodes_as_layers_gives_one_each():
    nodes = [peer(f"n{i}", memory=1 << i) for i in range(6)]
    stages = partition_by_memory(nodes, 6)
    assert sizes(stages) == [1] * 6


def test_full_coverage_property_random_inputs():
    rng = random.Random(12345)
    for _ in range(2000):
        n_layers = rng.randint(1, 120)
        n_nodes = rng.randint(1, min(n_layers, 12))
        zero_all = rng.random() < 0.1
        nodes = [
            peer(f"node-{i}", 0 if zero_all else rng.choice([0, 1, rng.randint(1, 1 << 40)]))
            for i in range(n_nodes)
        ]
        stages = partition_by_memory(nodes, n_layers)
        assert len(stages) == n_nodes
        assert {s.node_id for s in stages} == {p.node_id for p in nodes}
        check_cover(stages, n_layers)
        assert min(sizes(stages)) >= 1
        order = ring_order(nodes)
        assert [s.node_id for s in stages] == [p.node_id for p in order]


def test_more_nodes_than_layers_is_an_error():
    with pytest.raises(ValueError, match="3 nodes but only 2 layers"):
        partition_by_memory([peer("a"), peer("b"), peer("c")], 2)


def test_no_nodes_is_an_error():
    with pytest.raises(ValueError, match="empty node list"):
        partition_by_memory([], 10)


@pytest.mark.parametrize("n_layers", [0, -3])
def test_non_positive_layers_is_an_error(n_layers):
    with pytest.raises(ValueError, match="at least 1 layer"):
        partition_by_memory([peer("a")], n_layers)


def test_duplicate_ids_and_negative_memory_are_errors():
    with pytest.raises(ValueError, match="duplicate"):
        partition_by_memory([peer("a", 1), peer("a", 2)], 10)
    with pytest.raises(ValueError, match="negative memory"):
        partition_by_memory([peer("a", -1)], 10)
