"""`FailoverEngine`: a DeepSpeedEngine that snapshots every step. Thin: it wires hooks only."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Union

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from .config import FastFailoverConfig, parse_config
from .ds.data import ResumableDataLoader
from .errors import SnapshotError
from .failover.controller import build_context
from .failover.sockets import opened_since
from .failover.rebuild import RebuildSpec
from .runtime import FailoverRuntime
from .ds import state as snap_state
from .snapshot.codec import decode_tree
from .snapshot.format import read_snapshot
from .snapshot.persist import read_file, resolve
from .snapshot.pool import SnapshotRef

logger = logging.getLogger("fftrainer_ds")
SnapshotLike = Union[str, os.PathLike, SnapshotRef, torch.Tensor, bytes, bytearray]


class FailoverEngine(DeepSpeedEngine):
    """DeepSpeedEngine plus per-step snapshots, replicas, persistence and restore (see README)."""

    def __init__(self, **kwargs):
        ff_config = parse_config(kwargs.get("config"))
        ctx = build_context() if ff_config.enabled else None  # set under fftrainer-launch
        spec = None
        if ff_config.enabled:  # captured before DeepSpeed wraps the model (reused when failover_initialize made it)
            spec = ctx["spec"] if ctx and ctx["spec"].model_id == id(kwargs["model"]) else RebuildSpec(kwargs)
            if ctx:
                spec.prepare()  # only a job under fftrainer-launch ever rebuilds
        super().__init__(**kwargs)
        self.ff_config: FastFailoverConfig = ff_config
        self._ff_spec = spec
        self._ff_ctl = ctx["controller"] if ctx else None
        if ctx:  # sockets of the training groups (DeepSpeed's), before the replication group exists
            self._ff_ctl.generation_sockets = opened_since(ctx["sockets_before"])
        self._ff: Optional[FailoverRuntime] = None
        if ff_config.enabled:
            self._ff = FailoverRuntime(self, ff_config, store=ctx["agent"].store if ctx else None,
                                       generation=ctx["generation"] if ctx else 0,
                                       nodes=ctx["agent"].nodes() if ctx else None)

    # ---- hooks: failover guard (only under fftrainer-launch) ------------------------------------
    def forward(self, *inputs, **kwargs):
        if self._ff_ctl is None:
            return super().forward(*inputs, **kwargs)
        return self._ff_ctl.guard(self, "forward", lambda: super(FailoverEngine, self).forward(*inputs, **kwargs))

    def backward(self, loss, *args, **kwargs):
        if self._ff_ctl is None:
            return super().backward(loss, *args, **kwargs)
        return self._ff_ctl.guard(self, "backward", lambda: super(FailoverEngine, self).backward(loss, *args, **kwargs))

    def deepspeed_io(self, dataset, batch_size=None, route="train", pin_memory=True, data_sampler=None,
                     collate_fn=None, num_local_io_workers=None):
        loader = super().deepspeed_io(dataset, batch_size, route, pin_memory, data_sampler, collate_fn,
                                      num_local_io_workers)
        return ResumableDataLoader.adopt(loader) if route == "train" else loader

    # ---- hooks --------------------------------------------------------------------------------
    def step(self, lr_kwargs=None):
        if self._ff_ctl is not None:
            return self._ff_ctl.guard(self, "step", lambda: self._ff_step(lr_kwargs))
        return self._ff_step(lr_kwargs)

    def _ff_step(self, lr_kwargs):
        if self._ff is None:
            return super().step(lr_kwargs)
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            self._ff.before_optimizer_step()
        out = super().step(lr_kwargs)
        if boundary:
            self._ff.after_optimizer_step(self)
            if self._ff_ctl is not None:
                self._ff_ctl.after_step(self)
        return out

    def _ff_data_position(self) -> Any:
        loader = self.training_dataloader
        return loader.state_dict() if isinstance(loader, ResumableDataLoader) else None

    # ---- public API ---------------------------------------------------------------------------
    @property
    def snapshots_paused(self) -> bool:
        """Benchmarks pair steps with and without snapshots in the same processes."""
        return self._require_ff().paused

    @snapshots_paused.setter
    def snapshots_paused(self, value: bool) -> None:
        self._require_ff().paused = value

    def latest_snapshot(self) -> Optional[SnapshotRef]:
        """Lease this rank's last committed snapshot (release it when done)."""
        return self._require_ff().snapshotter.latest()

    def persist(self, path: str) -> str:
        """Write this rank's latest committed snapshot under directory `path` in the background.

        Every rank calls it; each writes `rank{r:05d}.ffsnap` atomically. Returns the file path.
        """
        ref = self.latest_snapshot()
        if ref is None:
            raise SnapshotError(f"persist({path!r}): no snapshot committed yet (take an optimizer step first)")
        return self._ff.persister.persist(ref, path)

    def wait_persisted(self) -> None:
        """Block until every background write of this rank is on disk."""
        self._require_ff().persister.wait()

    def restore(self, snapshot: SnapshotLike) -> int:
        """Load a snapshot (a directory from persist(), a file, a SnapshotRef or bytes); returns its step.

        Collective: every rank restores its own snapshot at the same time, right after initialize.
        """
        ff = self._require_ff()
        ff.snapshotter.fence()
        if isinstance(snapshot, (str, os.PathLike)):
            source = resolve(os.fspath(snapshot), self.global_rank)
            data = read_file(source)
        elif isinstance(snapshot, SnapshotRef):
            source, data = f"snapshot of rank {snapshot.rank} step {snapshot.step}", snapshot.buffer
        else:
            source, data = "<in-memory snapshot>", snapshot
        parsed = read_snapshot(data, source, backend=self.ff_config.snapshot_backend)
        snap_state.check_compatible(self, parsed, snap_state.fingerprint(self), source)
        position = snap_state.apply(self, decode_tree(parsed))
        if position is not None and isinstance(self.training_dataloader, ResumableDataLoader):
            self.training_dataloader.load_state_dict(position)
        ff.rolled_back(parsed.step)
        if ff.snapshotter.pool.committed_step != parsed.step:  # restored from elsewhere: hold it as our own
            ff.snapshotter.adopt(parsed.buffer, parsed.step)
        ff._last_step_end = None
        logger.info("fftrainer_ds: rank %d restored step %d from %s", self.global_rank, parsed.step, source)
        return parsed.step

    @property
    def recoveries(self) -> list:
        """Timelines of the recoveries this process took part in (empty without fftrainer-launch)."""
        return [] if self._ff_ctl is None else self._ff_ctl.recoveries

    def replica_inventory(self) -> Dict[int, Dict[int, list]]:
        """source rank -> {holder rank -> committed (generation, step) versions}. Collective."""
        ff = self._require_ff()
        return {} if ff.replication is None else ff.replication.replica_inventory()

    def snapshot_stats(self) -> dict:
        """Size and timing of the last snapshot, replication counters, pack backend."""
        ff = self._require_ff()
        return dict(ff.metrics(), bytes=ff.snapshotter.last_bytes, pack_s=ff.snapshotter.last_pack_s,
                    backend=ff.snapshotter.packer.backend.name)

    def destroy(self):
        if self._ff_ctl is not None:
            self._ff_ctl.agent.finish()  # teardown may take seconds without heartbeats: not a hang
        if self._ff is not None:
            self._ff.close()
        return super().destroy()

    def _require_ff(self) -> FailoverRuntime:
        if self._ff is None:
            raise RuntimeError("fast_failover is disabled for this engine (set \"fast_failover\": {\"enabled\": true})")
        return self._ff
