"""Where each rank's snapshot is replicated: a ring, node-aware.

The ring visits ranks interleaved across nodes: local index 0 of every node (nodes in order of
their id), then local index 1 of every node, and so on. On one node that is plain r -> r+1 -> ...;
with ranks numbered node by node (node_of = [0, 0, 1, 1]) it is 0 -> 2 -> 1 -> 3 -> 0, so every
rank's successor sits on another node and, for equal node sizes, every rank holds the same number
of replicas. A source's k holders are the first k ranks after it on the ring that are on another
node; only when there are fewer than k such ranks are ranks of its own node taken (still in ring
order). So with more than one node at least one copy of every shard is off its node: one node
failure never takes a shard and all its copies.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from ..errors import ConfigError


def _validate(world_size: int, k: int, node_of: Sequence[int]) -> None:
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if len(node_of) != world_size:
        raise ConfigError(f"node_of has {len(node_of)} entries for a world size of {world_size}")
    if k < 0:
        raise ConfigError(f"fast_failover.replication_factor must be >= 0, got {k}")
    if k > world_size - 1:
        raise ConfigError(f"fast_failover.replication_factor={k} needs at least {k + 1} ranks (each shard "
                          f"plus {k} copies on other ranks); the world size is {world_size}")


def ring_order(node_of: Sequence[int]) -> List[int]:
    """All ranks in ring order, interleaved across nodes (see the module docstring)."""
    per_node: Dict[int, List[int]] = {}
    for r, n in enumerate(node_of):
        per_node.setdefault(n, []).append(r)
    nodes = sorted(per_node)
    order: List[int] = []
    for i in range(max((len(v) for v in per_node.values()), default=0)):
        order.extend(per_node[n][i] for n in nodes if i < len(per_node[n]))
    return order


def placement(world_size: int, k: int, node_of: Sequence[int]) -> List[List[int]]:
    """holders[src] for every source rank; ConfigError (naming the numbers) if k does not fit."""
    _validate(world_size, k, node_of)
    order = ring_order(node_of)
    pos = {r: i for i, r in enumerate(order)}
    table = []
    for src in range(world_size):
        after = [order[(pos[src] + j) % world_size] for j in range(1, world_size)]
        off_node = [r for r in after if node_of[r] != node_of[src]]
        on_node = [r for r in after if node_of[r] == node_of[src]]
        table.append((off_node + on_node)[:k])
    return table


def replica_holders(rank: int, world_size: int, k: int, node_of: Sequence[int]) -> List[int]:
    """The k ranks that hold copies of `rank`'s snapshot, in ring order."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside the world of size {world_size}")
    return placement(world_size, k, node_of)[rank]


def sources_held_by(rank: int, world_size: int, k: int, node_of: Sequence[int]) -> List[int]:
    """The source ranks whose snapshots `rank` holds, ascending."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside the world of size {world_size}")
    return [src for src, holders in enumerate(placement(world_size, k, node_of)) if rank in holders]


GB = 1_000_000_000  # max_host_memory_gb counts decimal gigabytes
REPLICA_BUFFERS = 3  # per held source: the two newest committed versions + the one in flight (receiver.py)


def check_memory(cfg, table: List[List[int]], sizes: Sequence[int]) -> None:
    """ConfigError naming the numbers when some rank's own snapshot buffers plus its replicas
    (REPLICA_BUFFERS each, for the placement `table`) exceed `cfg.max_host_memory_gb` (None: no check)."""
    budget = cfg.max_host_memory_gb
    if budget is None:
        return
    nbuf, world_size = cfg.max_snapshot_buffers, len(table)
    for r in range(world_size):
        held = [s for s in range(world_size) if r in table[s]]
        own, replicas = nbuf * sizes[r], REPLICA_BUFFERS * sum(sizes[s] for s in held)
        if own + replicas > budget * GB:
            raise ConfigError(
                f"fast_failover.max_host_memory_gb={budget}: rank {r} needs {(own + replicas) / GB:.3f} GB = "
                f"{nbuf} own snapshot buffers x {sizes[r]} bytes ({own / GB:.3f} GB) + {REPLICA_BUFFERS} buffers "
                f"for each of {len(held)} replicas at replication_factor={cfg.replication_factor} ({replicas / GB:.3f} GB)")
