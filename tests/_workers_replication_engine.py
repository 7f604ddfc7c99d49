"""Rank body: real DeepSpeed engines replicating every step; report own and held snapshot hashes."""
import hashlib
import time

import torch.distributed as dist

from tests._workers_snapshot import _engine


def _h(buf) -> str:
    return hashlib.sha256(buf.numpy().tobytes()).hexdigest()


def replicate_and_report(stage, k, steps=8):
    ff = {"replication_factor": k, "adaptive_throttle": False, "chunk_mb": 0.25}
    engine, loader = _engine(stage, "fp32", 1, ff)
    it = iter(loader)
    rows = []
    for _ in range(steps):
        loss = engine(next(it))
        engine.backward(loss)
        engine.step()
        ff_rt = engine.ff_runtime
        lag_sent = ff_rt.replication.stats()["lag_steps"]  # sender side, right after the step
        ref = engine.latest_snapshot()
        own = (ref.step, _h(ref.buffer))
        ref.release()
        # The previous version was fully sent before this step's optimizer step (the fence); its holder
        # commits it on a receiver thread after verifying it: give that thread a moment on a busy CPU.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(
                not v or v[-1][1] < engine.global_steps - 1
                for v in ff_rt.replication.local_inventory().values()):
            time.sleep(0.005)
        held = {}
        for src, versions in ff_rt.replication.local_inventory().items():
            rep = ff_rt.replication.replica(src)
            if rep is not None:
                held[src] = (rep.step, _h(rep.buffer))
                rep.release()
        rows.append({"step": engine.global_steps, "own": own, "held": held, "lag_sent": lag_sent})
        # Also keep every own version's hash (a replica may land one step later).
    inventory = engine.replica_inventory()
    stats = engine.ff_runtime.replication.stats()
    engine.destroy()
    dist.destroy_process_group()
    return {"rows": rows, "inventory": inventory, "stats": stats}
