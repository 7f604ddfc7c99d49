"""`FailoverEngine`: a DeepSpeedEngine that snapshots every step. Hooks and one-line delegations only:
the per-rank work is in runtime.py (`RankRuntime`), recovery in failover/controller.py."""
from __future__ import annotations

import functools
import logging
from typing import Any, Dict, List, Optional

from .config import FastFailoverConfig, parse_config
from .ds.adapter import DeepSpeedEngine
from .ds.data import ResumableDataLoader
from .failover.controller import Hook, RecoveryController, engine_context
from .failover.rebuild import RebuildSpec, rebuild_in_place, release_engine
from .failover.timeline import RecoveryTimeline
from .replication.inventory import Inventory
from .runtime import GenerationView, RankRuntime, SnapshotLike
from .snapshot.pool import SnapshotRef

logger = logging.getLogger("fftrainer_ds")
# What this class adds to DeepSpeed's engine; a rebuild keeps these and drops everything else.
_OWN_ATTRS = ("ff_config", "ff_runtime", "_ff_ctl")


def _off_snapshot_stream(hook):
    """Run a hook inside RankRuntime.device_sync_scope: with the CUDA packer, DeepSpeed's device-wide
    synchronizes (forward, overlap_comm in backward, step) must not wait for the pack stream."""
    @functools.wraps(hook)
    def wrapped(self, *args, **kwargs):
        runtime = self.__dict__.get("ff_runtime")
        if runtime is None:
            return hook(self, *args, **kwargs)
        with runtime.device_sync_scope(self):
            return hook(self, *args, **kwargs)

    return wrapped


class FailoverEngine(DeepSpeedEngine):
    """DeepSpeedEngine plus per-step snapshots, replicas, persistence and restore (see README)."""

    def __init__(self, **kwargs):
        ff_config = parse_config(kwargs.get("config"))
        ctx = engine_context(ff_config.enabled, kwargs)  # under fftrainer-launch; before DeepSpeed wraps the model
        super().__init__(**kwargs)
        self.ff_config: FastFailoverConfig = ff_config
        self._ff_ctl: Optional[RecoveryController] = ctx.engine_built() if ctx else None
        self.ff_runtime: Optional[RankRuntime] = None
        if ff_config.enabled:
            self.ff_runtime = RankRuntime(self, ff_config, ctx.view() if ctx else GenerationView())

    # ---- hooks ------------------------------------------------------------------------------
    @_off_snapshot_stream
    def forward(self, *inputs, **kwargs):
        if self._ff_ctl is None:
            return super().forward(*inputs, **kwargs)
        return self._ff_ctl.guard(self, Hook.FORWARD, lambda: super(FailoverEngine, self).forward(*inputs, **kwargs))

    @_off_snapshot_stream
    def backward(self, loss, *args, **kwargs):
        if self._ff_ctl is None:
            return super().backward(loss, *args, **kwargs)
        return self._ff_ctl.guard(self, Hook.BACKWARD,
                                  lambda: super(FailoverEngine, self).backward(loss, *args, **kwargs))

    @_off_snapshot_stream
    def step(self, lr_kwargs=None):
        if self._ff_ctl is not None:
            return self._ff_ctl.guard(self, Hook.STEP, lambda: self._ff_step(lr_kwargs))
        return self._ff_step(lr_kwargs)

    def _ff_step(self, lr_kwargs):
        if self.ff_runtime is None or not self.is_gradient_accumulation_boundary():
            return super().step(lr_kwargs)
        self.ff_runtime.before_optimizer_step()
        out = super().step(lr_kwargs)
        self.ff_runtime.after_optimizer_step(self)
        if self._ff_ctl is not None:
            self._ff_ctl.after_step(self)
        return out

    def deepspeed_io(self, dataset, batch_size=None, route="train", pin_memory=True, data_sampler=None,
                     collate_fn=None, num_local_io_workers=None):
        loader = super().deepspeed_io(dataset, batch_size, route, pin_memory, data_sampler, collate_fn,
                                      num_local_io_workers)
        return ResumableDataLoader.adopt(loader) if route == "train" else loader

    # ---- rebuild (called by the recovery controller) ------------------------------------------
    def release_deepspeed(self) -> None:
        """Drop DeepSpeed's state and process groups after a failure; keep fast failover's."""
        release_engine(self, self._ff_own())

    def rebuild_deepspeed(self, spec: RebuildSpec) -> None:
        """Construct DeepSpeed's engine again, in place, on the current default group."""
        rebuild_in_place(self, spec, self._ff_own())

    def _ff_own(self) -> Dict[str, Any]:
        return {k: self.__dict__[k] for k in _OWN_ATTRS if k in self.__dict__}

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
        return self._require_ff().latest()

    def persist(self, path: str) -> str:
        """Write this rank's latest committed snapshot to `path/rankNNNNN.ffsnap` in the background
        (every rank calls it; atomic rename). Returns the file path."""
        return self._require_ff().persist(path)

    def wait_persisted(self) -> None:
        """Block until every background write of this rank is on disk."""
        self._require_ff().persister.wait()

    def restore(self, snapshot: SnapshotLike) -> int:
        """Load a snapshot (a directory from persist(), a file, a SnapshotRef or bytes); returns its step.

        Collective: every rank restores its own snapshot at the same time, right after initialize.
        """
        return self._require_ff().restore(self, snapshot)

    @property
    def recoveries(self) -> List[RecoveryTimeline]:
        """Timelines of the recoveries this process took part in (empty without fftrainer-launch)."""
        return [] if self._ff_ctl is None else list(self._ff_ctl.recoveries)

    def replica_inventory(self) -> Inventory:
        """source rank -> {holder rank -> committed (generation, step) versions}. Collective."""
        repl = self._require_ff().replication
        return {} if repl is None else repl.replica_inventory()

    def snapshot_stats(self) -> dict:
        """Size and timing of the last snapshot, replication counters, pack backend."""
        return self._require_ff().stats()

    def destroy(self):
        if self._ff_ctl is not None:
            self._ff_ctl.agent.finish()  # teardown may take seconds without heartbeats: not a hang
        if self.ff_runtime is not None:
            self.ff_runtime.close()
        return super().destroy()

    def _require_ff(self) -> RankRuntime:
        if self.ff_runtime is None:
            raise RuntimeError("fast_failover is disabled for this engine (set \"fast_failover\": {\"enabled\": true})")
        return self.ff_runtime
