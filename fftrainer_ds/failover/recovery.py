"""Choose the recovery step, move missing shards to replacements, restore every rank.

All functions here run on the new process-group generation, on every rank (survivors and
replacements) in the same order, after the engines were (re)built:

    infos = gather_infos(local_info(...))        # all_gather_object on the new default group
    plan  = plan_recovery(infos, world_size)     # pure: same answer on every rank
    data  = transfer(plan, rank, ...)            # point-to-point: holder -> replacement
    engine.restore(data)                         # collective
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..errors import SnapshotError, TerminalError

logger = logging.getLogger("fftrainer_ds")


@dataclass
class RankInfo:
    """What one rank can contribute: its own retained steps and the replicas it holds (src -> steps)."""

    rank: int
    replacement: bool
    own_steps: List[int]
    held: Dict[int, List[int]]
    disk_steps: List[int] = field(default_factory=list)


@dataclass
class Plan:
    """Recovery step and where each rank's shard comes from: ("own", r), ("replica", holder) or ("disk", r)."""

    step: int
    source: Dict[int, Tuple[str, int]]

    @property
    def from_disk(self) -> bool:
        return any(kind == "disk" for kind, _ in self.source.values())


def plan_recovery(infos: List[RankInfo], world_size: int) -> Plan:
    """The latest step for which every shard has a committed copy (own, or a replica on a live rank).

    When no such in-memory step exists, the latest step every rank has on disk; else TerminalError.
    """
    by_rank = {i.rank: i for i in infos}
    if sorted(by_rank) != list(range(world_size)):
        raise TerminalError(f"recovery: ranks {sorted(by_rank)} reported, expected 0..{world_size - 1}")
    candidates: Dict[int, Dict[int, Tuple[str, int]]] = {}
    for r in range(world_size):
        options: Dict[int, Tuple[str, int]] = {}
        for holder in sorted(by_rank):  # lowest holder first: deterministic on every rank
            for step in by_rank[holder].held.get(r, []):
                options.setdefault(step, ("replica", holder))
        if not by_rank[r].replacement:
            for step in by_rank[r].own_steps:
                options[step] = ("own", r)  # own memory beats the network
        candidates[r] = options
    common = set.intersection(*(set(c) for c in candidates.values())) if candidates else set()
    if common:
        step = max(common)
        return Plan(step, {r: candidates[r][step] for r in range(world_size)})
    disk = set.intersection(*(set(by_rank[r].disk_steps) for r in range(world_size)))
    if disk:
        step = max(disk)
        logger.error("fftrainer_ds: NO IN-MEMORY COPY of some shard survived; falling back to the snapshot "
                     "persisted on disk at step %d", step)
        return Plan(step, {r: ("disk", r) for r in range(world_size)})
    missing = [r for r in range(world_size) if not candidates[r]]
    raise TerminalError(f"recovery impossible: no surviving copy of the shards of ranks {missing} and no "
                        f"persisted snapshot that every rank has (set fast_failover.persist_dir and "
                        f"persist_interval_steps)")


def gather_infos(mine: RankInfo) -> List[RankInfo]:
    out: List[Optional[RankInfo]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out  # type: ignore[return-value]


def transfer(plan: Plan, rank: int, lease_replica) -> Optional[torch.Tensor]:
    """Send replicas to the ranks that need them; return the bytes this rank must restore from, if remote.

    `lease_replica(src, step)` returns a lease (with `.buffer`) on a held replica. Sends happen in
    rank order of the receivers so that every pair agrees on the sequence.
    """
    received = None
    for dst in sorted(plan.source):
        kind, holder = plan.source[dst]
        if kind != "replica":
            continue
        if rank == holder:
            ref = lease_replica(dst, plan.step)
            if ref is None:
                raise SnapshotError(f"recovery: rank {rank} lost its replica of rank {dst} step {plan.step}")
            try:
                dist.send(torch.tensor([ref.buffer.numel()], dtype=torch.int64), dst)
                dist.send(ref.buffer, dst)
            finally:
                ref.release()
        elif rank == dst:
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, holder)
            received = torch.empty(int(size.item()), dtype=torch.uint8)
            dist.recv(received, holder)
    return received
