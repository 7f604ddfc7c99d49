"""Rank bodies of the GPU engine tests (one CUDA rank each, run by fftrainer_ds.testing.run_ranks)."""
import os
import random

import numpy as np
import torch
import torch.distributed as dist

import fftrainer_ds
from fftrainer_ds.snapshot.format import read_snapshot
from fftrainer_ds.testing import worker_init_process_group
from fftrainer_ds.testing.digest import model_digest
from fftrainer_ds.testing.models import TinyGPT, TokenDataset, ds_config


def _deterministic() -> None:
    """Bitwise-repeatable CUDA training across processes: deterministic kernels, math attention."""
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "set before the first cuBLAS call (run_ranks env)"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cudnn.benchmark = False


def _engine(stage: int, dtype: str):
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _deterministic()
    worker_init_process_group("nccl")
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = TinyGPT(dropout=0.1)
    cfg = ds_config(stage, dtype, fast_failover={"replication_factor": 0})
    if dtype == "fp16":
        # A dynamic loss scale that moves within 20 steps: it grows every 3 clean steps (and halves on
        # an overflow), so the restored run diverges unless the scaler's counters came back too.
        cfg["fp16"].update({"initial_scale_power": 12, "loss_scale_window": 3, "hysteresis": 1})
    engine, _, loader, _ = fftrainer_ds.initialize(model=model, model_parameters=model.parameters(),
                                                   training_data=TokenDataset(), config=cfg)
    return engine, loader


def _loss_scale(engine) -> float:
    return float(engine.optimizer.loss_scale) if hasattr(engine.optimizer, "loss_scale") else 1.0


def _train(engine, it, until, syncs=None):
    """The documented loop (inputs moved to the engine's device); per step: losses, loss scale, skipped."""
    out = {}
    while engine.global_steps < until:
        step = engine.global_steps + 1
        loss = engine(next(it).to(engine.device))
        engine.backward(loss)
        engine.step()
        out[step] = (loss.item(), _loss_scale(engine), engine.skipped_steps)
    return out


class DeviceSyncCounter:
    """Counts torch.cuda.synchronize (device-wide) calls; DeepSpeed's accelerator calls it by name."""

    def __init__(self):
        self.count, self._orig = 0, torch.cuda.synchronize

    def __enter__(self):
        def counting(*args, **kwargs):
            self.count += 1
            return self._orig(*args, **kwargs)

        torch.cuda.synchronize = counting
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize = self._orig


def _finish(engine, out):
    ref = engine.latest_snapshot()
    try:
        read_snapshot(ref.buffer)  # the device-packed bytes pass the host's FF31 check as well
    finally:
        ref.release()
    out.update(digest=model_digest(engine), backend=engine.snapshot_stats()["backend"],
               on_device=engine.ff_runtime.snapshotter.on_device, scale=_loss_scale(engine))
    engine.destroy()
    dist.destroy_process_group()
    return out


def train_persist(stage, dtype, snap_dir, snap_step=10, steps=30):
    engine, loader = _engine(stage, dtype)
    it = iter(loader)
    steps_before = _train(engine, it, snap_step)
    engine.persist(snap_dir)
    engine.wait_persisted()
    with DeviceSyncCounter() as syncs:
        after = _train(engine, it, steps)
    return _finish(engine, {"steps": {**steps_before, **after}, "device_syncs": syncs.count})


def restore_train(stage, dtype, snap_dir, steps=30):
    engine, loader = _engine(stage, dtype)
    restored = engine.restore(snap_dir)
    with DeviceSyncCounter() as syncs:
        after = _train(engine, iter(loader), steps)
    return _finish(engine, {"restored_step": restored, "steps": after, "device_syncs": syncs.count})
