"""Rank bodies for the in-place regroup tests: rebuild engines on a new process-group generation."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from fftrainer_ds.ds import adapter as ds_adapter
from fftrainer_ds.runtime import GenerationView
from tests._workers_snapshot import _digest, _engine, _train


def _new_generation(gen: int) -> None:
    ds_adapter.release_groups()
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["FFTRAINER_STORE_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"test/gen{gen}", store), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=60))


def regroup_midway(stage, dtype="fp32", grad_accum=1, steps=20, at_step=10, rollback=0):
    """Train; at `at_step` regroup in place, rebuild engines, restore own snapshot, continue."""
    specs = []
    engine, loader = _engine(stage, dtype, grad_accum, {}, spec_out=specs)
    spec = specs[0]
    it = iter(loader)
    losses = _train(engine, it, at_step)
    ref = engine.latest_snapshot()
    assert ref.step == at_step
    # A copy of the bytes: the rebuilt engine's restore must not depend on the pool slot.
    snap = ref.buffer.clone()
    ref.release()
    if rollback:  # train past the snapshot, so the restore really rolls back
        _train(engine, it, at_step + rollback)
    engine.release_deepspeed()
    _new_generation(1)
    engine.rebuild_deepspeed(spec)
    engine.ff_runtime.rebind(engine, GenerationView(1))
    assert engine.restore(snap) == at_step
    losses.update(_train(engine, it, steps))
    out = {"losses": losses, "digest": _digest(engine)}
    engine.destroy()
    dist.destroy_process_group()
    return out


def uninterrupted(stage, dtype="fp32", grad_accum=1, steps=20):
    engine, loader = _engine(stage, dtype, grad_accum, {})
    losses = _train(engine, iter(loader), steps)
    out = {"losses": losses, "digest": _digest(engine)}
    engine.destroy()
    dist.destroy_process_group()
    return out
