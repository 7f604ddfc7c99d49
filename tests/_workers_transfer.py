"""Worker function of tests/test_recovery_transfer.py (run in real processes by run_ranks)."""
from typing import Dict, List, Optional

import torch.distributed as dist

from fftrainer_ds.errors import SnapshotError
from fftrainer_ds.failover.recovery import RankInfo, gather_infos, plan_recovery, transfer
from fftrainer_ds.testing import faults, worker_init_process_group
from tests._workers_replication import content, digest

STEP = 5
CHUNK = 64 * 1024
NBYTES = 5 * CHUNK + 13  # 6 chunks, the last one short
CHUNKS = 6


class Lease:
    """A held replica as `lease_replica` hands it out: only `.buffer` and `.release()`."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.released = False

    def release(self):
        self.released = True


def recover(infos: List[RankInfo], corrupt: Dict[int, List[dict]],
            forge: Optional[Dict[int, List[dict]]] = None) -> dict:
    """Plan from `infos` (this rank reports infos[rank]), then transfer with this rank's corrupt and
    forge rules (kwargs of ReplicationFaults.corrupt_chunk / forge_chunk); what arrived and what the
    hooks counted."""
    worker_init_process_group(timeout_s=20)  # a wait nobody answers fails the run well within its timeout
    rank = dist.get_rank()
    mine = infos[rank]
    plan = plan_recovery(gather_infos(mine), dist.get_world_size())
    hooks = faults.ReplicationFaults()
    for rule in corrupt.get(rank, []):
        hooks.corrupt_chunk(**rule)
    for rule in (forge or {}).get(rank, []):
        hooks.forge_chunk(**rule)
    leases: List[Lease] = []

    def lease_replica(src: int, step: int):
        if step not in mine.held.get(src, []):
            return None
        leases.append(Lease(content(src, step, NBYTES)))
        return leases[-1]

    out = {"holders": plan.holders, "digest": None, "error": None}
    try:
        data = transfer(plan, rank, lease_replica, hooks, chunk_bytes=CHUNK)
        out["digest"] = None if data is None else digest(data)
    except SnapshotError as exc:
        out["error"] = str(exc)
    out.update(sent=hooks.sent, received=hooks.received, corrupted=hooks.corrupted, forged=hooks.forged,
               leases=len(leases),
               unreleased=sum(not lease.released for lease in leases))
    dist.barrier()  # every rank got through its transfer: none is left waiting on another
    return out


def exchange_infos(infos: List[RankInfo], inventory: bool = False) -> dict:
    """gather_infos (or the replica inventory's gather) under this rank's FFTRAINER_SECRET_FILE: what
    came back, or the RecoverableError's text."""
    from fftrainer_ds.errors import RecoverableError
    from fftrainer_ds.replication.inventory import Version, gather

    worker_init_process_group(timeout_s=20)
    rank = dist.get_rank()
    try:
        if inventory:
            got = gather({src: [Version(0, s) for s in steps] for src, steps in infos[rank].held.items()},
                         dist.group.WORLD, dist.get_world_size())
        else:
            got = gather_infos(infos[rank])
        out = {"got": got, "error": None}
    except RecoverableError as exc:
        out = {"got": None, "error": str(exc)}
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads end here, not in the interpreter's exit
    return out
