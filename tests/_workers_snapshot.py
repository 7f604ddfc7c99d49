"""Rank bodies for the snapshot tests (run in real processes by fftrainer_ds.testing.run_ranks)."""
import hashlib
import os
import random

import numpy as np

import torch
import torch.distributed as dist

import fftrainer_ds
from fftrainer_ds.ds import adapter as ds_adapter
from fftrainer_ds.testing import worker_init_process_group
from fftrainer_ds.testing.models import TinyGPT, TokenDataset, ds_config


def _engine(stage, dtype, grad_accum, ff, spec_out=None):
    """`spec_out` (a list): receives the rebuild spec fftrainer-launch would capture before initialize."""
    ds_adapter.skip_shm_comm_build()
    worker_init_process_group()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)  # unseeded, numpy's state differs per process and is part of the snapshot
    model = TinyGPT(dropout=0.1)
    cfg = ds_config(stage, dtype, grad_accum=grad_accum, fast_failover=ff)
    params = list(model.parameters())
    if spec_out is not None:
        from fftrainer_ds.failover.rebuild import RebuildSpec

        spec = RebuildSpec(dict(args=None, model=model, optimizer=None, model_parameters=params, lr_scheduler=None,
                                mpu=None, dist_init_required=None, collate_fn=None, config=cfg))
        spec.prepare()
        spec_out.append(spec)
    engine, _, loader, _ = fftrainer_ds.initialize(model=model, model_parameters=params,
                                                   training_data=TokenDataset(), config=cfg)
    return engine, loader


def _digest(engine, detail=False):
    """sha256 of this rank's fp32 shard + optimizer state + low-precision params."""
    h = hashlib.sha256()
    parts = []
    ref = engine.latest_snapshot()
    from fftrainer_ds.snapshot.format import read_snapshot

    snap = read_snapshot(ref.buffer)
    for seg in snap.segments:
        if seg.name != "meta":
            h.update(bytes(snap.segment_bytes(seg).numpy()))
            parts.append((seg.name, seg.dtype, seg.shape, hashlib.sha256(bytes(snap.segment_bytes(seg).numpy())).hexdigest()[:8]))
    ref.release()
    for t in ds_adapter.local_param_tensors(engine):
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        parts.append(hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:8])
    return (h.hexdigest(), parts) if detail else h.hexdigest()


def _train(engine, it, until):
    """The documented user loop; returns {global_step: [micro-batch losses]}."""
    losses = {}
    while engine.global_steps < until:
        step = engine.global_steps + 1
        loss = engine(next(it))
        engine.backward(loss)
        engine.step()
        losses.setdefault(step, []).append(loss.item())
    return losses


def train_with_snapshot(stage, dtype="fp32", grad_accum=1, steps=20, snap_step=10, snap_dir=None, ff=None):
    engine, loader = _engine(stage, dtype, grad_accum, ff if ff is not None else {})
    it = iter(loader)
    losses = _train(engine, it, snap_step)
    engine.persist(snap_dir)
    engine.wait_persisted()
    losses.update(_train(engine, it, steps))
    out = {"losses": losses, "digest": _digest(engine), "stats": engine.snapshot_stats()}
    engine.destroy()
    dist.destroy_process_group()
    return out


def resume_from(stage, dtype="fp32", grad_accum=1, steps=20, snap_dir=None, ff=None):
    engine, loader = _engine(stage, dtype, grad_accum, ff if ff is not None else {})
    step = engine.restore(snap_dir)
    losses = _train(engine, iter(loader), steps)
    out = {"restored_step": step, "losses": losses, "digest": _digest(engine)}
    engine.destroy()
    dist.destroy_process_group()
    return out



def make_snapshots(stage, snap_dir, steps=3, dtype="fp32"):
    """Train a few steps and persist: real snapshots for the reader tests."""
    engine, loader = _engine(stage, dtype, 1, {})
    _train(engine, iter(loader), steps)
    engine.persist(snap_dir)
    engine.destroy()
    dist.destroy_process_group()
    return True


def restore_error(stage, snap_dir, model_d=64, dtype="fp32"):
    """Try to restore into a possibly different job; return the error text (None if it loaded)."""
    ds_adapter.skip_shm_comm_build()
    worker_init_process_group()
    torch.manual_seed(0)
    model = TinyGPT(d=model_d)
    cfg = ds_config(stage, dtype, fast_failover={})
    engine, _, _, _ = fftrainer_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    try:
        engine.restore(snap_dir)
        msg = None
    except fftrainer_ds.SnapshotError as exc:
        msg = str(exc)
    engine.destroy()
    dist.destroy_process_group()
    return msg


def plain_vs_disabled(stage, use_ff, steps=6):
    """Losses and digest of plain deepspeed.initialize vs fftrainer_ds.initialize with the section disabled."""
    import deepspeed

    ds_adapter.skip_shm_comm_build()
    worker_init_process_group()
    torch.manual_seed(0)
    model = TinyGPT()
    cfg = ds_config(stage, fast_failover={"enabled": False} if use_ff else None)
    init = fftrainer_ds.initialize if use_ff else deepspeed.initialize
    engine, _, loader, _ = init(model=model, model_parameters=model.parameters(), training_data=TokenDataset(),
                                config=cfg)
    losses = _train(engine, iter(loader), steps)
    h = hashlib.sha256()
    for t in ds_adapter.local_param_tensors(engine):
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    out = {"losses": losses, "params": h.hexdigest(), "cls": type(engine).__name__,
           "is_ds": isinstance(engine, deepspeed.DeepSpeedEngine)}
    engine.destroy()
    dist.destroy_process_group()
    return out
