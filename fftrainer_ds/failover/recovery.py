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
from ..secret import Purpose
from ..secret import current as current_secret

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
    raise TerminalError(_impossible(candidates, world_size))


def _impossible(candidates: Dict[int, Dict[int, Tuple[Source, int]]], world_size: int) -> str:
    """Why no step can be restored: the shards with no copy left, or else every shard's steps."""
    missing = [r for r in range(world_size) if not candidates[r]]
    if missing:
        why = f"no surviving copy of the shards of ranks {missing}"
    else:
        held = "; ".join(f"rank {r}: {sorted(candidates[r])}" for r in range(world_size))
        why = f"no step is held for every shard (steps each shard has a copy of: {held})"
    return (f"recovery impossible: {why}, and no persisted snapshot that every rank has (set "
            f"fast_failover.persist_dir and persist_interval_steps)")


def gather_infos(mine: RankInfo, generation: Optional[int] = None) -> List[RankInfo]:
    """Every rank's RankInfo in rank order. COLLECTIVE on the default group: an authenticated JSON
    all-gather (replication/exchange.py; never pickle, so no peer's bytes can run code here), keyed
    with the job secret's RECOVERY_EXCHANGE key of `generation` (None: the job-wide key). A failed
    collective, a message that fails authentication, or one that is not exactly the RankInfo of the
    rank that sent it raises RecoverableError."""
    from ..replication.exchange import all_gather_json
    from ..secret import Purpose, current as job_secret

    key = job_secret().key(Purpose.RECOVERY_EXCHANGE, generation)
    docs = all_gather_json(_info_doc(mine), key, "recovery: rank infos")
    return [_info_from_doc(doc, r) for r, doc in enumerate(docs)]


_INFO_FIELDS = ("rank", "replacement", "own_steps", "held", "disk_steps")


def _info_doc(info: RankInfo) -> Dict[str, object]:
    """RankInfo as JSON-ready data (`held` as [source, steps] pairs: JSON object keys are strings)."""
    return {"rank": int(info.rank), "replacement": bool(info.replacement),
            "own_steps": [int(s) for s in info.own_steps],
            "held": [[int(src), [int(s) for s in steps]] for src, steps in sorted(info.held.items())],
            "disk_steps": [int(s) for s in info.disk_steps]}


def _info_from_doc(doc: object, rank: int) -> RankInfo:
    """The RankInfo rank `rank` sent; RecoverableError unless `doc` has exactly its fields and types."""
    from ..replication.exchange import int_list

    try:
        if type(doc) is not dict or sorted(doc) != sorted(_INFO_FIELDS):
            raise ValueError(f"fields {sorted(doc) if type(doc) is dict else type(doc).__name__}")
        if type(doc["rank"]) is not int or doc["rank"] != rank or type(doc["replacement"]) is not bool:
            raise ValueError(f"rank {doc['rank']!r:.20} / replacement {doc['replacement']!r:.20}")
        held: Dict[int, List[int]] = {}
        if type(doc["held"]) is not list:
            raise ValueError(f"held {doc['held']!r:.80}")
        for entry in doc["held"]:
            if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not int or entry[0] in held:
                raise ValueError(f"held entry {entry!r:.80}")
            held[entry[0]] = int_list(entry[1], "held steps")
        return RankInfo(rank, doc["replacement"], int_list(doc["own_steps"], "own_steps"), held,
                        int_list(doc["disk_steps"], "disk_steps"))
    except ValueError as exc:
        raise RecoverableError(f"recovery: malformed rank info from rank {rank} ({exc})") from None


def transfer(plan: Plan, rank: int, lease_replica: Callable[[int, int], Optional[object]],
             hooks: Optional[TransportHooks] = None, *, generation: Optional[int] = None,
             chunk_bytes: int = direct.DIRECT_CHUNK_BYTES) -> Optional[torch.Tensor]:
    """Move replicas to the ranks that restore from them; return this rank's verified bytes, if remote.

    `lease_replica(src, step)` returns a lease (`.buffer`, `.release()`) on a held replica, or None.
    Exchanges go in receiver rank order, each with its candidates in `plan.holders` order
    (replication/direct.py), on the default group; `hooks` sees every chunk (fault injection).
    A receiver that no holder could serve raises SnapshotError, after its part in the later
    exchanges (it may be a holder there, and its peers wait for it); a transport failure or an
    untrustworthy control message raises RecoverableError.
    """
    # Keyed per generation: a transfer recorded in an earlier recovery cannot be replayed into this one.
    key = current_secret().key(Purpose.RECOVERY_TRANSFER, generation)
    wire = direct.Wire.on(dist.group.WORLD, rank, hooks or TransportHooks(), ops.get_backend("auto").checksum, key)
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
