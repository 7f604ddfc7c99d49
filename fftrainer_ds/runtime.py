"""Per-rank fast-failover runtime: snapshots, replication, persistence, metrics.

`FailoverEngine` owns one `FailoverRuntime` and calls its hooks; everything the engine does
beyond plain DeepSpeed lives here or below (snapshot/, replication/, failover/).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from . import ops
from .ds import adapter as ds_adapter
from .config import FastFailoverConfig
from .errors import ConfigError
from .ds import state as snap_state
from .snapshot.interval import make_interval_policy
from .snapshot.persist import Persister
from .snapshot.snapshotter import Snapshotter

logger = logging.getLogger("fftrainer_ds")


def node_map(world_size: int, known: Optional[Sequence[Any]] = None) -> List[int]:
    """Node index of every rank, numbered by first appearance.

    `known` (one node label per rank, from the supervisor's generation record) needs no communication;
    without it the launcher's FFTRAINER_NODE_RANK or the hostname is all-gathered (collective).
    """
    names: List[Any]
    if known is not None:
        names = list(known)
    else:
        names = [None] * world_size
        dist.all_gather_object(names, os.environ.get("FFTRAINER_NODE_RANK") or socket.gethostname())
    order = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return [order[n] for n in names]


def estimate_snapshot_bytes(engine) -> int:
    """fp32 master + two Adam moments per element, plus room for metadata (before the first step)."""
    elems = sum(int(torch.Size(s).numel()) for s in ds_adapter.shard_layout(engine))
    return 12 * elems + (1 << 20)


class FailoverRuntime:
    """Snapshotter + replication service + persister of one rank, for one process-group generation."""

    def __init__(self, engine, cfg: FastFailoverConfig, store=None, generation: int = 0,
                 snapshotter: Optional[Snapshotter] = None, nodes: Optional[Sequence[Any]] = None):
        stage = ds_adapter.zero_stage(engine)
        if stage not in (1, 2, 3):
            raise ConfigError(f"fast_failover needs zero_optimization.stage 1, 2 or 3 (got {stage})")
        self.cfg, self.store, self.generation = cfg, store, generation
        self.rank, self.world_size = engine.global_rank, engine.world_size
        if snapshotter is None:
            backend = ops.get_backend(cfg.snapshot_backend, cfg.pack_threads)
            snapshotter = Snapshotter(self.rank, self.world_size, stage, ds_adapter.dtype_config(engine), backend,
                                      pin=cfg.pin_memory, max_buffers=cfg.max_snapshot_buffers)
            logger.info("fftrainer_ds: rank %d fast failover on (ZeRO-%d, %s, pack backend %s, interval %s)",
                        self.rank, stage, ds_adapter.dtype_config(engine), backend.name, cfg.snapshot_interval_steps)
        self.snapshotter = snapshotter
        self.snapshotter.generation = generation
        self.persister = Persister()
        self.replication = None
        # Closed services of earlier generations with the last step still valid in each: their
        # replicas feed a recovery (a rollback to R makes their versions after R stale).
        self.old_replication: List[list] = []
        self.snapshotter.add_listener(self._offer)
        self.snapshotter.add_listener(self._maybe_persist)
        self._last_persisted = -1
        self._start_replication(engine, nodes)
        self.interval = make_interval_policy(cfg.snapshot_interval_steps, cfg.snapshot_overhead_budget_pct)
        self._in_flight = False
        self.paused = False
        self._last_step_end: Optional[float] = None

    def _start_replication(self, engine, nodes: Optional[Sequence[Any]] = None) -> None:
        """Collective (the replication group, and the node map unless `nodes` gives each rank's node):
        same order on every rank of a generation."""
        cfg = self.cfg
        if cfg.replication_factor == 0:
            return
        from .replication.service import ReplicationService

        if self.world_size <= cfg.replication_factor:
            raise ConfigError(f"fast_failover.replication_factor={cfg.replication_factor} needs more than "
                              f"{cfg.replication_factor} ranks (world size is {self.world_size})")
        self.node_of = node_map(self.world_size, nodes)
        self.replication = ReplicationService(cfg, self.rank, self.world_size, self.node_of,
                                              estimate_snapshot_bytes(engine), store=self.store,
                                              generation=self.generation)

    def _offer(self, ref) -> None:
        repl = self.replication
        if repl is None:
            ref.release()
        else:
            repl.offer(ref)

    def _maybe_persist(self, ref) -> None:
        """Commit listener: every persist_interval_steps, write the committed snapshot in the background
        (from the pack thread, so the training thread never waits for that pack)."""
        cfg = self.cfg
        due = cfg.persist_dir and cfg.persist_interval_steps and ref.step % cfg.persist_interval_steps == 0
        if due and ref.step > self._last_persisted:  # not a restored (adopted) or replayed older step
            self._last_persisted = ref.step
            self.persister.persist(ref, os.path.join(cfg.persist_dir, f"step{ref.step:08d}"))
        else:
            ref.release()

    def rebind(self, engine, generation: int, store=None, nodes: Optional[Sequence[Any]] = None) -> None:
        """After a regroup and engine rebuild: new generation, new replication service (collective).

        The old service is closed but kept: its committed replicas are what a recovery reads.
        """
        self.snapshotter.fence()
        old, self.replication = self.replication, None
        if old is not None:
            old.close(timeout_s=0.5)
            self.old_replication = (self.old_replication + [[old, float("inf")]])[-4:]
        self.generation = generation
        self.snapshotter.generation = generation
        self.store = store if store is not None else self.store
        self.rank, self.world_size = engine.global_rank, engine.world_size
        self._last_step_end = None
        self._start_replication(engine, nodes)

    def _services(self):
        """(service, last valid step) pairs, newest first."""
        live = [(self.replication, float("inf"))] if self.replication is not None else []
        return live + [(svc, valid) for svc, valid in reversed(self.old_replication)]

    def held_replica_steps(self) -> Dict[int, List[int]]:
        """source rank -> steps of the committed replicas held here (this and earlier generations)."""
        out: Dict[int, set] = {}
        for svc, valid in self._services():
            for src, versions in svc.local_inventory().items():
                out.setdefault(src, set()).update(step for _, step in versions if step <= valid)
        return {src: sorted(steps) for src, steps in out.items()}

    def lease_replica(self, src: int, step: int):
        """A lease on the held replica of `src` at `step`, or None."""
        for svc, valid in self._services():
            if step > valid:
                continue
            ref = svc.replica(src)
            if ref is not None and ref.step == step:
                return ref
            if ref is not None:
                ref.release()
        return None

    def rolled_back(self, step: int) -> None:
        """After a restore of `step`: later versions anywhere are a future that will not happen."""
        for entry in self.old_replication:
            entry[1] = min(entry[1], step)
        self.snapshotter.pool.drop_newer_than(step)

    # ---- hooks (called by the engine) -----------------------------------------------------------
    def before_optimizer_step(self) -> None:
        self.snapshotter.fence()  # step N's pack must be complete before this step changes that state
        if self.replication is not None:
            self.replication.end_of_compute()  # fence: step N's replica is out before step N+1 ends
            self.replication.set_window(False)

    def after_optimizer_step(self, engine) -> None:
        now = time.perf_counter()
        step_time = None if self._last_step_end is None else now - self._last_step_end
        self._last_step_end = now
        if step_time is not None:
            # step N's pack overlaps step N+1: this step carried a pack iff the previous one started one
            self.interval.observe_step(step_time, self._in_flight)
        step = engine.global_steps
        self._in_flight = not self.paused and self.interval.should_snapshot(step)
        if self._in_flight:
            self.snapshotter.begin(step, snap_state.capture(engine, engine._ff_data_position(), snap_state.fingerprint(engine)))
        if self.replication is not None:
            self.replication.set_window(True)
            if step_time is not None:
                self.replication.on_step(step, step_time)
        if engine.steps_per_print() and step % engine.steps_per_print() == 0:
            self.report(engine, step)

    # ---- metrics ----------------------------------------------------------------------------------
    def metrics(self) -> Dict[str, Any]:
        s = self.snapshotter
        out: Dict[str, Any] = {"snapshot_bytes": s.last_bytes, "pack_ms": 1e3 * s.last_pack_s,
                               "fence_wait_ms": 1e3 * s.last_fence_wait_s, "snapshots": s.snapshots_taken,
                               "snapshot_interval_steps": self.interval.interval, "rpo_steps": self.interval.rpo_steps}
        if self.replication is not None:
            st = self.replication.stats()
            out.update({f"replication_{k}": v for k, v in st.items() if isinstance(v, (int, float))})
        return out

    def report(self, engine, step: int) -> None:
        m = self.metrics()
        from deepspeed.utils import logger as ds_logger

        ds_logger.info("fftrainer_ds rank %d step %d: %s", self.rank, step,
                       ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
        monitor = getattr(engine, "monitor", None)
        if monitor is not None and monitor.enabled and self.rank == 0:
            monitor.write_events([(f"fftrainer/{k}", float(v), engine.global_samples) for k, v in m.items()])

    def close(self) -> None:
        try:
            self.snapshotter.fence()
        finally:
            for svc, _ in self._services():
                svc.close()
            self.persister.wait()
