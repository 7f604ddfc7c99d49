"""`FailoverEngine`: a DeepSpeedEngine that snapshots every step. Thin: it wires hooks only."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Union

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from . import ds_adapter, ops
from .config import FastFailoverConfig, parse_config
from .data import ResumableDataLoader
from .errors import ConfigError, SnapshotError
from .failover.rebuild import RebuildSpec
from .snapshot import state as snap_state
from .snapshot.format import read_snapshot
from .snapshot.persist import Persister, read_file, resolve
from .snapshot.pool import SnapshotRef
from .snapshot.snapshotter import Snapshotter

logger = logging.getLogger("fftrainer_ds")
SnapshotLike = Union[str, os.PathLike, SnapshotRef, torch.Tensor, bytes, bytearray]


class FailoverEngine(DeepSpeedEngine):
    """DeepSpeedEngine plus per-step snapshots, persistence and restore (see README)."""

    def __init__(self, **kwargs):
        ff_config = parse_config(kwargs.get("config"))
        spec = RebuildSpec(kwargs) if ff_config.enabled else None  # before DeepSpeed wraps the model
        super().__init__(**kwargs)
        self.ff_config: FastFailoverConfig = ff_config
        self._ff_spec = spec
        self._ff: Optional[Snapshotter] = None
        self._persister = Persister()
        self.step_times_s: list = []
        self.snapshots_paused = False  # benchmarks pair steps with and without snapshots
        self._last_step_end: Optional[float] = None
        if self.ff_config.enabled:
            self._ff_setup()

    # ---- set-up -------------------------------------------------------------------------------
    def _ff_setup(self) -> None:
        cfg = self.ff_config
        stage = ds_adapter.zero_stage(self)
        if stage not in (1, 2, 3):
            raise ConfigError(f"fast_failover needs zero_optimization.stage 1, 2 or 3 (got {stage})")
        backend = ops.get_backend(cfg.snapshot_backend, cfg.pack_threads)
        self._ff = Snapshotter(self.global_rank, self.world_size, stage, ds_adapter.dtype_config(self), backend,
                               pin=cfg.pin_memory, max_buffers=cfg.max_snapshot_buffers)
        logger.info("fftrainer_ds: rank %d fast failover on (ZeRO-%d, %s, backend %s, interval %s)",
                    self.global_rank, stage, ds_adapter.dtype_config(self), backend.name,
                    cfg.snapshot_interval_steps)

    def deepspeed_io(self, dataset, batch_size=None, route="train", pin_memory=True, data_sampler=None,
                     collate_fn=None, num_local_io_workers=None):
        loader = super().deepspeed_io(dataset, batch_size, route, pin_memory, data_sampler, collate_fn,
                                      num_local_io_workers)
        if type(loader) is not ResumableDataLoader and isinstance(loader, ResumableDataLoader.__bases__[0]):
            loader.__class__ = ResumableDataLoader  # same object, plus position tracking
            loader.passes, loader.consumed, loader._resume = 0, 0, None
        return loader

    # ---- hooks --------------------------------------------------------------------------------
    def step(self, lr_kwargs=None):
        if self._ff is None:
            return super().step(lr_kwargs)
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            self._ff.fence()  # step N's pack must be complete before this optimizer step
        out = super().step(lr_kwargs)
        if boundary:
            now = time.perf_counter()
            if self._last_step_end is not None:
                self.step_times_s.append(now - self._last_step_end)
            self._last_step_end = now
            if self._snapshot_due():
                self._ff.begin(self.global_steps, snap_state.capture(self, self._data_position()))
        return out

    def _snapshot_due(self) -> bool:
        if self.snapshots_paused:
            return False
        interval = self.ff_config.snapshot_interval_steps
        interval = 1 if interval == "auto" else interval  # CPU: packing overlaps; GPU policy in interval.py
        return self.global_steps % interval == 0

    def _data_position(self) -> Any:
        loader = self.training_dataloader
        return loader.state_dict() if isinstance(loader, ResumableDataLoader) else None

    # ---- public API ---------------------------------------------------------------------------
    def latest_snapshot(self) -> Optional[SnapshotRef]:
        """Lease this rank's last committed snapshot (release it when done)."""
        self._require_ff()
        return self._ff.latest()

    def persist(self, path: str) -> str:
        """Write this rank's latest committed snapshot under directory `path` in the background.

        Every rank calls it; each writes `rank{r:05d}.ffsnap` atomically. Returns the file path.
        """
        ref = self.latest_snapshot()
        if ref is None:
            raise SnapshotError(f"persist({path!r}): no snapshot committed yet (take an optimizer step first)")
        return self._persister.persist(ref, path)

    def wait_persisted(self) -> None:
        """Block until every background write of this rank is on disk."""
        self._persister.wait()

    def restore(self, snapshot: SnapshotLike) -> int:
        """Load a snapshot (a directory from persist(), a file, a SnapshotRef or bytes); returns its step.

        Collective: every rank restores its own snapshot at the same time, right after initialize.
        """
        self._require_ff()
        self._ff.fence()
        if isinstance(snapshot, (str, os.PathLike)):
            source = resolve(os.fspath(snapshot), self.global_rank)
            data = read_file(source)
        elif isinstance(snapshot, SnapshotRef):
            source, data = f"snapshot of rank {snapshot.rank} step {snapshot.step}", snapshot.buffer
        else:
            source, data = "<in-memory snapshot>", snapshot
        parsed = read_snapshot(data, source, backend=self.ff_config.snapshot_backend)
        snap_state.check_compatible(self, parsed, self.global_rank, self.world_size, source)
        tree = snap_state.load_tree(parsed)
        position = snap_state.apply(self, tree)
        if position is not None and isinstance(self.training_dataloader, ResumableDataLoader):
            self.training_dataloader.load_state_dict(position)
        self._last_step_end = None
        logger.info("fftrainer_ds: rank %d restored step %d from %s", self.global_rank, parsed.step, source)
        return parsed.step

    def snapshot_stats(self) -> dict:
        """Size and timing of the last snapshot (bytes, pack seconds, fence wait seconds, count)."""
        self._require_ff()
        s = self._ff
        return {"bytes": s.last_bytes, "pack_s": s.last_pack_s, "fence_wait_s": s.last_fence_wait_s,
                "snapshots": s.snapshots_taken, "backend": s.packer.backend.name}

    def destroy(self):
        if self._ff is not None:
            self._ff.close()
            self._persister.wait()
        return super().destroy()

    def _require_ff(self) -> None:
        if self._ff is None:
            raise RuntimeError("fast_failover is disabled for this engine (set \"fast_failover\": {\"enabled\": true})")
