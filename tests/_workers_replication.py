"""Worker functions of tests/test_replication_service.py (run in real processes by run_ranks)."""
import hashlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from fftrainer_ds.config import FastFailoverConfig
from fftrainer_ds.errors import RecoverableError
from fftrainer_ds.replication import ReplicationService
from fftrainer_ds.testing import faults, worker_init_process_group

WAIT_S = 30.0  # generous bound for "eventually"; never an assertion about speed


class FakeRef:
    """Stands in for snapshot.pool.SnapshotRef: a lease whose release is counted."""

    def __init__(self, step, rank, buffer, generation=0):
        self.step, self.rank, self.buffer, self.generation = step, rank, buffer, generation
        self.released = 0

    def release(self):
        self.released += 1


def content(src, step, nbytes):
    g = torch.Generator().manual_seed(src * 100_003 + step)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def size_of(src, base):
    return base + 4093 * src + 13  # uneven: the last chunk is partial


def digest(t):
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _setup(k, collective_timeout_s=30.0, **cfg):
    worker_init_process_group()
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["FFTRAINER_STORE_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    cfg = FastFailoverConfig(replication_factor=k, collective_timeout_s=collective_timeout_s, **cfg)
    return dist.get_rank(), dist.get_world_size(), store, cfg


def _wait(pred, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _committed_step(svc, src):
    inv = svc.local_inventory()[src]
    return inv[-1][1] if inv else 0


def _held_record(svc, src, at_step):
    with svc.replica(src) as r:
        return {"src": src, "at_step": at_step, "step": r.step, "generation": r.generation,
                "digest": digest(r.buffer)}


def replicate_steps(k, steps, base_bytes, node_of, gating, chunk_mb=1.0):
    """Each rank offers `steps` versions; after each step every holder checks its replicas."""
    rank, world, store, cfg = _setup(k, chunk_mb=chunk_mb, adaptive_throttle=False)
    nbytes = size_of(rank, base_bytes)
    svc = ReplicationService(cfg, rank, world, node_of, nbytes, peer_timeout_s=15)
    refs, own, held, waited = [], {}, [], 0
    for step in range(1, steps + 1):
        buf = content(rank, step, nbytes)
        own[step] = digest(buf)
        ref = FakeRef(step, rank, buf)
        refs.append(ref)
        if gating:
            svc.set_window(False)  # the engine's optimizer step
        svc.offer(ref)
        if gating:
            svc.set_window(True)  # forward/backward of the next step
        time.sleep(0.03)
        if gating:
            svc.set_window(False)
        dist.all_reduce(torch.ones(1))  # a training collective on the default group, beside the p2p threads
        if gating:
            svc.set_window(True)
        if step == steps // 2:  # a collective on the replication group while its p2p threads run
            mid_inventory = svc.replica_inventory()
        for src in svc.sources:
            if _committed_step(svc, src) < step - 1:
                waited += 1
                assert _wait(lambda: _committed_step(svc, src) >= step - 1), f"no replica of {src} step {step - 1}"
            if _committed_step(svc, src) > 0:  # at step 1, lag <= 1 allows no replica yet
                held.append(_held_record(svc, src, step))
    assert svc.flush(WAIT_S)
    dist.barrier()
    for src in svc.sources:
        assert _wait(lambda: _committed_step(svc, src) >= steps), f"source {src} never reached step {steps}"
        held.append(_held_record(svc, src, steps))
    inventory = svc.replica_inventory()
    dist.barrier()
    stats = svc.stats()
    svc.close()
    dist.barrier()
    dist.destroy_process_group()
    return {"own": own, "held": held, "inventory": inventory, "stats": stats,
            "released": [r.released for r in refs], "waited": waited, "mid_inventory": mid_inventory}


def corrupt_run(steps, corrupt_step, base_bytes, fault="corrupt"):
    """2 ranks, k=1: rank 0 corrupts chunk 1 of `corrupt_step` on its way to rank 1 ("corrupt"), or
    replaces it by a forgery made without the job's key: FF31 recomputed ("forge"), or bytes with the
    same FF31 under the genuine header ("collide")."""
    rank, world, store, cfg = _setup(1, chunk_mb=0.25, adaptive_throttle=False)
    nbytes = size_of(rank, base_bytes)
    svc = ReplicationService(cfg, rank, world, [0] * world, nbytes, peer_timeout_s=15)
    fi = faults.install(svc)
    if rank == 0 and fault == "corrupt":
        fi.corrupt_chunk(dst=1, step=corrupt_step, chunk_index=1)
    elif rank == 0:
        fi.forge_chunk(dst=1, step=corrupt_step, chunk_index=1, collide=fault == "collide")
    own, held, refs = {}, [], []
    for step in range(1, steps + 1):
        buf = content(rank, step, nbytes)
        own[step] = digest(buf)
        refs.append(FakeRef(step, rank, buf))
        svc.offer(refs[-1])
        assert svc.flush(WAIT_S)
        dist.barrier()
        (src,) = svc.sources
        seen = lambda: svc.stats()["versions_committed"] + svc.stats()["versions_dropped"] >= step  # noqa: E731
        assert _wait(seen), "the holder never finished a version"
        held.append(_held_record(svc, src, step))
        dist.barrier()
    stats = svc.stats()
    svc.close()
    dist.barrier()
    dist.destroy_process_group()
    return {"own": own, "held": held, "stats": stats, "corrupted": fi.corrupted, "forged": fi.forged,
            "released": [r.released for r in refs]}


def faulty_receiver_run(fault, steps, fault_step, base_bytes):
    """3 ranks, k=1 (0->1->2->0): rank 2's receiver of source 1 stalls or dies at `fault_step`."""
    rank, world, store, cfg = _setup(1, chunk_mb=0.25, adaptive_throttle=False)
    nbytes = size_of(rank, base_bytes)
    svc = ReplicationService(cfg, rank, world, [0] * world, nbytes, peer_timeout_s=3.0,
                             close_timeout_s=1.5)
    fi = faults.install(svc)
    own, held, offer_s, refs = {}, [], [], []
    for step in range(1, steps + 1):
        if rank == 2 and step == fault_step:
            (fi.stall_receiver(seconds=120, src=1) if fault == "stall" else fi.kill_receiver(src=1))
        buf = content(rank, step, nbytes)
        own[step] = digest(buf)
        refs.append(FakeRef(step, rank, buf))
        t0 = time.perf_counter()
        svc.offer(refs[-1])
        offer_s.append(time.perf_counter() - t0)
        time.sleep(0.25)  # compute
        dist.all_reduce(torch.ones(1))  # training goes on, on the default group
        (src,) = svc.sources
        if not (rank == 2 and step >= fault_step):
            assert _wait(lambda: _committed_step(svc, src) >= step - 1), f"no replica of {src} step {step - 1}"
            if _committed_step(svc, src) > 0:
                held.append(_held_record(svc, src, step))
    if rank == 1:
        assert _wait(lambda: 2 in svc.stats()["dropped_peers"]), "the faulty holder was never dropped"
    else:
        assert svc.flush(WAIT_S)
    dist.barrier()
    if rank != 2:
        (src,) = svc.sources
        assert _wait(lambda: _committed_step(svc, src) >= steps)
        held.append(_held_record(svc, src, steps))
    stats = svc.stats()
    t0 = time.perf_counter()
    svc.close()
    close_s = time.perf_counter() - t0
    dist.barrier()
    dist.destroy_process_group()
    return {"own": own, "held": held, "stats": stats, "offer_s": offer_s, "close_s": close_s,
            "released": [r.released for r in refs], "fired": fi.stalled + fi.killed}


def dead_peer_run(steps, die_after, base_bytes):
    """3 ranks, k=1: rank 2 exits hard after `die_after`; ranks 0 and 1 go on without it."""
    rank, world, store, cfg = _setup(1, collective_timeout_s=5.0, chunk_mb=0.25, adaptive_throttle=False)
    nbytes = size_of(rank, base_bytes)
    svc = ReplicationService(cfg, rank, world, [0] * world, nbytes, peer_timeout_s=3)
    own, held, refs = {}, [], []
    (src,) = svc.sources
    for step in range(1, steps + 1):
        buf = content(rank, step, nbytes)
        own[step] = digest(buf)
        refs.append(FakeRef(step, rank, buf))
        svc.offer(refs[-1])
        if step <= die_after:
            assert svc.flush(WAIT_S)
            dist.barrier()
            assert _wait(lambda: _committed_step(svc, src) >= step)
            dist.barrier()
            if rank == 2 and step == die_after:
                os._exit(17)
        else:
            time.sleep(0.2)
        held.append(_held_record(svc, src, step))
    if rank == 1:
        assert _wait(lambda: 2 in svc.stats()["dropped_peers"]), "the dead holder was never dropped"
    if rank == 0:
        assert _wait(lambda: 2 in svc.stats()["dropped_peers"]), "the dead source was never noticed"
    else:
        assert _wait(lambda: _committed_step(svc, src) >= steps)
        held.append(_held_record(svc, src, steps))
    try:
        svc.replica_inventory()  # rank 2 is dead: the collective fails, with a RecoverableError
        gather_error = None
    except RecoverableError as exc:
        gather_error = str(exc)
    inventory = svc.local_inventory()
    stats = svc.stats()
    svc.close(timeout_s=3.0)
    return {"own": own, "held": held, "stats": stats, "inventory": inventory, "gather_error": gather_error,
            "released": [r.released for r in refs]}


def memory_budget_error(base_bytes, budget_gb):
    """Every rank must raise the same ConfigError from the constructor."""
    rank, world, store, cfg = _setup(1, max_host_memory_gb=budget_gb)
    try:
        ReplicationService(cfg, rank, world, [0] * world, size_of(rank, base_bytes))
    except Exception as exc:  # noqa: BLE001 (the test checks the type)
        dist.destroy_process_group()
        return (type(exc).__name__, str(exc))
    dist.destroy_process_group()
    return None


class _CountStarts(faults.ReplicationFaults):
    """Counts chunks put on the wire."""

    def __init__(self):
        super().__init__()
        self.started = 0

    def before_send(self, dst, header, data):
        self.started += 1
        return data


def adaptive_run(steps, base_bytes):
    """2 ranks, adaptive throttle: sending pauses for the baseline steps, then resumes, rate-capped."""
    rank, world, store, cfg = _setup(1, chunk_mb=0.25, adaptive_throttle=True, max_bandwidth_mbps=200.0)
    nbytes = size_of(rank, base_bytes)
    svc = ReplicationService(cfg, rank, world, [0] * world, nbytes, peer_timeout_s=15, warmup_steps=1,
                             baseline_steps=2)
    counter = svc.hooks = _CountStarts()
    own, refs, trace = {}, [], []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        buf = content(rank, step, nbytes)  # the version of the step before this one's compute
        own[step] = digest(buf)
        refs.append(FakeRef(step, rank, buf))
        svc.offer(refs[-1])
        time.sleep(0.1)  # compute
        dist.all_reduce(torch.ones(1))
        before = counter.started
        svc.end_of_compute()
        flushed, lag = counter.started, svc.stats()["lag_steps"]
        svc.set_window(False)  # optimizer step
        svc.set_window(True)
        svc.on_step(step, time.perf_counter() - t0)
        trace.append({"before": before, "flushed": flushed, "lag_flushed": lag, "after": counter.started,
                      "phase": svc.stats()["phase"]})
    assert svc.flush(WAIT_S)
    dist.barrier()
    (src,) = svc.sources
    assert _wait(lambda: _committed_step(svc, src) >= steps)
    held = _held_record(svc, src, steps)
    stats = svc.stats()
    svc.close()
    dist.barrier()
    dist.destroy_process_group()
    return {"own": own, "held": held, "stats": stats, "trace": trace, "released": [r.released for r in refs]}
