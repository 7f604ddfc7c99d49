"""Choose the recovery step, move missing shards to replacements, restore every rank.

All functions here run on the new process-group generation, on every rank (survivors and
replacements) in the same order, after the engines were (re)built:

    infos = gather_infos(local_info(...))        # all_gather_object on the new default group
    plan  = plan_recovery(infos, world_size)     # pure: same answer on every rank
    data  = transfer(plan, rank, ...)            # point-to-point: holder -> replacement, verified
    engine.restore(data)                         # collective
"""
from __future__ import annotations

import enum
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import ops
from ..errors import RecoverableError, SnapshotError, TerminalError
from ..replication import direct
from ..replication.transport import StreamError, TransportError, TransportHooks

logger = logging.getLogger("fftrainer_ds")


@dataclass
class RankInfo:
    """What one rank can contribute: its own retained steps and the replicas it holds (src -> steps)."""

    rank: int
    replacement: bool
    own_steps: List[int]
    held: Dict[int, List[int]]
    disk_steps: List[int] = field(default_factory=list)


class Source(str, enum.Enum):
    """Where a rank's shard comes from in a recovery (a str: the timeline's JSON shows the word)."""

    OWN = "own"          # the rank's own snapshot in its host memory
    REPLICA = "replica"  # a peer's replica, moved by `transfer`
    DISK = "disk"        # the persisted snapshot (every in-memory copy of some shard is gone)


@dataclass
class Plan:
    """Recovery step and where each rank's shard comes from: (OWN, r), (REPLICA, holder) or (DISK, r).

    `holders[r]`, for each rank r whose source is a replica: every live rank holding r's replica
    of `step`, lowest rank first (the same list on every rank); `source[r]` names the first. The
    transfer asks them in this order until one delivers a verified copy.
    """

    step: int
    source: Dict[int, Tuple[Source, int]]
    holders: Dict[int, List[int]] = field(default_factory=dict)

    @property
    def from_disk(self) -> bool:
        return any(kind is Source.DISK for kind, _ in self.source.values())


def plan_recovery(infos: List[RankInfo], world_size: int) -> Plan:
    """The latest step for which every shard has a committed copy (own, or a replica on a live rank).

    When no such in-memory step exists, the latest step every rank has on disk; else TerminalError.
    """
    by_rank = {i.rank: i for i in infos}
    if sorted(by_rank) != list(range(world_size)):
        raise TerminalError(f"recovery: ranks {sorted(by_rank)} reported, expected 0..{world_size - 1}")
    candidates: Dict[int, Dict[int, Tuple[Source, int]]] = {}
    for r in range(world_size):
        options: Dict[int, Tuple[Source, int]] = {}
        for holder in sorted(by_rank):  # lowest holder first: deterministic on every rank
            for step in by_rank[holder].held.get(r, []):
                options.setdefault(step, (Source.REPLICA, holder))
        if not by_rank[r].replacement:
            for step in by_rank[r].own_steps:
                options[step] = (Source.OWN, r)  # own memory beats the network
        candidates[r] = options
    common = set.intersection(*(set(c) for c in candidates.values())) if candidates else set()
    if common:
        step = max(common)
        source = {r: candidates[r][step] for r in range(world_size)}
        holders = {r: [h for h in sorted(by_rank) if h != r and step in by_rank[h].held.get(r, [])]
                   for r, (kind, _) in source.items() if kind is Source.REPLICA}
        return Plan(step, source, holders)
    disk = set.intersection(*(set(by_rank[r].disk_steps) for r in range(world_size)))
    if disk:
        step = max(disk)
        logger.error("fftrainer_ds: NO IN-MEMORY COPY of some shard survived; falling back to the snapshot "
                     "persisted on disk at step %d", step)
        return Plan(step, {r: (Source.DISK, r) for r in range(world_size)})
    missing = [r for r in range(world_size) if not candidates[r]]
    raise TerminalError(f"recovery impossible: no surviving copy of the shards of ranks {missing} and no "
                        f"persisted snapshot that every rank has (set fast_failover.persist_dir and "
                        f"persist_interval_steps)")


def gather_infos(mine: RankInfo) -> List[RankInfo]:
    out: List[Optional[RankInfo]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out  # type: ignore[return-value]


def transfer(plan: Plan, rank: int, lease_replica: Callable[[int, int], Optional[object]],
             hooks: Optional[TransportHooks] = None, *,
             chunk_bytes: int = direct.DIRECT_CHUNK_BYTES) -> Optional[torch.Tensor]:
    """Move replicas to the ranks that restore from them; return this rank's verified bytes, if remote.

    `lease_replica(src, step)` returns a lease (`.buffer`, `.release()`) on a held replica, or None.
    Exchanges go in receiver rank order, each with its candidates in `plan.holders` order
    (replication/direct.py), on the default group; `hooks` sees every chunk (fault injection).
    A receiver that no holder could serve raises SnapshotError, after its part in the later
    exchanges (it may be a holder there, and its peers wait for it); a transport failure or an
    untrustworthy control message raises RecoverableError.
    """
    wire = direct.Wire.on(dist.group.WORLD, rank, hooks or TransportHooks(), ops.get_backend("auto").checksum)
    received: Optional[torch.Tensor] = None
    failure: Optional[SnapshotError] = None
    try:
        for dst in sorted(plan.source):
            kind, first = plan.source[dst]
            if kind is not Source.REPLICA:
                continue
            holders = plan.holders.get(dst) or [first]
            if rank == dst:
                try:
                    got = direct.fetch(wire, holders, plan.step)
                except SnapshotError as exc:
                    failure = exc
                    continue
                received = got.buffer
                logger.info("fftrainer_ds: rank %d received its shard of step %d from rank %d (%d chunk(s) "
                            "re-sent, holders that failed: %s)", rank, plan.step, got.holder, got.resent_chunks,
                            got.failed_holders)
            elif rank in holders:
                direct.serve(wire, dst, plan.step, functools.partial(lease_replica, dst, plan.step), chunk_bytes)
    except (TransportError, StreamError) as exc:
        raise RecoverableError(f"recovery transfer on rank {rank}: {exc}") from exc
    if failure is not None:
        raise failure
    return received
