import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fftrainer_ds.errors import ConfigError
from fftrainer_ds.replication import placement, replica_holders, ring_order, sources_held_by


def test_single_node_is_the_plain_ring():
    assert [replica_holders(r, 4, 1, [0] * 4) for r in range(4)] == [[1], [2], [3], [0]]
    assert [replica_holders(r, 4, 2, [0] * 4) for r in range(4)] == [[1, 2], [2, 3], [3, 0], [0, 1]]
    assert sources_held_by(0, 4, 2, [0] * 4) == [2, 3]
    assert replica_holders(2, 4, 0, [0] * 4) == []


def test_two_nodes_hold_every_shard_off_its_node():
    node_of = [0, 0, 1, 1]
    assert ring_order(node_of) == [0, 2, 1, 3]
    assert placement(4, 1, node_of) == [[2], [3], [1], [0]]
    assert placement(4, 2, node_of) == [[2, 3], [3, 2], [1, 0], [0, 1]]
    assert [sources_held_by(r, 4, 1, node_of) for r in range(4)] == [[3], [2], [0], [1]]


def test_falls_back_to_own_node_only_when_other_nodes_are_too_few():
    # 3 ranks on node 0, 1 rank on node 1: k=2 needs a same-node holder for ranks 0..2
    table = placement(4, 2, [0, 0, 0, 1])
    for src in range(3):
        assert table[src][0] == 3 and len(set(table[src])) == 2 and src not in table[src]
    assert table[3][0] != 3


@pytest.mark.parametrize("ws,k", [(1, 1), (3, 3), (4, 7)])
def test_too_few_ranks_names_the_numbers(ws, k):
    with pytest.raises(ConfigError, match=rf"replication_factor={k} needs at least {k + 1} ranks.*world size is {ws}"):
        replica_holders(0, ws, k, [0] * ws)


def test_other_errors_name_the_numbers():
    with pytest.raises(ConfigError, match="node_of has 3 entries for a world size of 4"):
        placement(4, 1, [0, 0, 1])
    with pytest.raises(ConfigError, match="must be >= 0, got -1"):
        placement(4, -1, [0] * 4)
    with pytest.raises(ConfigError, match="rank 4 is outside the world of size 4"):
        replica_holders(4, 4, 1, [0] * 4)
    with pytest.raises(ConfigError, match="rank -1"):
        sources_held_by(-1, 4, 1, [0] * 4)


@st.composite
def layouts(draw):
    nodes = draw(st.integers(1, 4))
    per_node = draw(st.lists(st.integers(1, 4), min_size=nodes, max_size=nodes))
    node_of = [n for n, c in enumerate(per_node) for _ in range(c)]
    if draw(st.booleans()):
        node_of = draw(st.permutations(node_of))
    k = draw(st.integers(0, len(node_of) - 1))
    return list(node_of), k


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_placement_properties(layout):
    node_of, k = layout
    ws = len(node_of)
    table = placement(ws, k, node_of)
    off_node_ranks = lambda src: [r for r in range(ws) if node_of[r] != node_of[src]]  # noqa: E731
    for src, holders in enumerate(table):
        assert len(holders) == k and len(set(holders)) == k and src not in holders
        expected_off = min(k, len(off_node_ranks(src)))
        assert sum(node_of[h] != node_of[src] for h in holders) == expected_off
        assert holders == replica_holders(src, ws, k, node_of)
    for r in range(ws):
        assert sources_held_by(r, ws, k, node_of) == [s for s in range(ws) if r in table[s]]
    if len(set(node_of)) > 1 and k >= 1:
        # one node failure never takes a shard and all its copies
        for node in set(node_of):
            for src in range(ws):
                if node_of[src] == node:
                    assert any(node_of[h] != node for h in table[src])
    sizes = {n: node_of.count(n) for n in set(node_of)}
    if len(set(sizes.values())) == 1:  # equal nodes: every rank holds k replicas
        assert all(len(sources_held_by(r, ws, k, node_of)) == k for r in range(ws))
