"""`RankRuntime`: the per-rank facade of fast failover, the one object the engine and failover use.

It owns this rank's snapshotter (capture after each optimizer step, async pack, fence), its
replicas (the live replication service and those of earlier generations), the persister, the
generation it is in, and restore. `FailoverEngine` calls its hooks; the recovery controller calls
only the public methods below (own/held steps, leases, fence, restore, rebind).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import ops
from .config import FastFailoverConfig
from .ds import adapter
from .ds import state as ds_state
from .ds.data import ResumableDataLoader
from .ds.sync import deepspeed_streams, no_device_sync
from .errors import ConfigError, SnapshotError
from .replication.holdings import Holdings
from .snapshot.codec import decode_tree
from .snapshot.format import read_snapshot, snapshot_key
from .snapshot.interval import make_interval_policy
from .snapshot.persist import Persister, read_file, resolve, step_dir
from .snapshot.pool import SnapshotRef
from .snapshot.snapshotter import Snapshotter

logger = logging.getLogger("fftrainer_ds")
SnapshotLike = Union[str, os.PathLike, SnapshotRef, torch.Tensor, bytes, bytearray]
_CLOSE_OLD_SERVICE_S = 0.5  # a regroup must not wait long for peers of a dead generation


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
    elems = sum(int(torch.Size(s).numel()) for s in adapter.shard_layout(engine))
    return 12 * elems + (1 << 20)


@dataclass(frozen=True)
class GenerationView:
    """The process-group generation a runtime works in: its number (in every snapshot and replica
    header) and, under fftrainer-launch, the node of each rank from the generation record (without it
    the node map is all-gathered)."""

    generation: int = 0
    nodes: Optional[Sequence[Any]] = None


class RankRuntime:
    """Snapshots, replicas, persistence and restore of one rank (see the module docstring)."""

    def __init__(self, engine, cfg: FastFailoverConfig, view: GenerationView = GenerationView()):
        stage = adapter.zero_stage(engine)
        if stage not in (1, 2, 3):
            raise ConfigError(f"fast_failover needs zero_optimization.stage 1, 2 or 3 (got {stage})")
        self.cfg, self.generation = cfg, view.generation
        self.rank, self.world_size = engine.global_rank, engine.world_size
        backend = ops.get_backend(cfg.snapshot_backend, cfg.pack_threads)
        self.snapshotter = Snapshotter(self.rank, self.world_size, stage, adapter.dtype_config(engine), backend,
                                       pin=cfg.pin_memory, max_buffers=cfg.max_snapshot_buffers,
                                       backend_name=cfg.snapshot_backend)
        logger.info("fftrainer_ds: rank %d fast failover on (ZeRO-%d, %s, pack backend %s, interval %s)",
                    self.rank, stage, adapter.dtype_config(engine), backend.name, cfg.snapshot_interval_steps)
        self.snapshotter.generation = view.generation
        self.persister = Persister()
        self.holdings = Holdings()
        # The user's iterator lives in this loader; a rebuilt engine gets the same object back.
        self.loader = engine.training_dataloader
        self._fingerprint = ds_state.fingerprint(engine)
        # The packer follows the shard (GPU, host, ZeRO-Offload): probe where a capture's tensors live,
        # now, so that a restore right after initialize and the first step already use it.
        probe = ds_state.capture(engine, None, self._fingerprint).tensors if torch.cuda.is_available() else []
        self.snapshotter.choose_packer(probe)
        self.snapshotter.add_listener(self._offer)
        self.snapshotter.add_listener(self._maybe_persist)
        self._last_persisted = -1
        self._start_replication(engine, view.nodes)
        self.interval = make_interval_policy(cfg.snapshot_interval_steps, cfg.snapshot_overhead_budget_pct)
        self._in_flight = False
        self.paused = False
        self._last_step_end: Optional[float] = None

    @property
    def replication(self):
        """The live replication service of this generation (None with replication_factor 0)."""
        return self.holdings.live

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
        self.holdings.live = ReplicationService(cfg, self.rank, self.world_size, node_map(self.world_size, nodes),
                                                estimate_snapshot_bytes(engine), generation=self.generation)

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
            self.persister.persist(ref, step_dir(cfg.persist_dir, ref.step))
        else:
            ref.release()

    # ---- hooks (called by the engine) -----------------------------------------------------------
    def before_optimizer_step(self) -> None:
        if self.replication is None:
            self.snapshotter.release_sources()  # step N's pack has read the state this step changes
            return
        self.snapshotter.fence()  # ... and is committed: its replica must be out before this step ends
        self.replication.end_of_compute()  # fence: step N's replica is out before step N+1 ends
        self.replication.set_window(False)

    def device_sync_scope(self, engine):
        """Where the engine runs its hooks: inside ds/sync.no_device_sync while the CUDA packer is in
        use (DeepSpeed's device-wide synchronizes would wait for the pack stream), else nothing."""
        if not self.snapshotter.on_device:
            return contextlib.nullcontext()
        return no_device_sync(deepspeed_streams(engine.__dict__.get("optimizer")))

    def after_optimizer_step(self, engine) -> None:
        now = time.perf_counter()
        step_time = None if self._last_step_end is None else now - self._last_step_end
        self._last_step_end = now
        pack_s = self.snapshotter.take_device_pack_s()  # timed on the GPU by the CUDA packer (None on the host)
        if pack_s is not None:
            self.interval.observe_pack(pack_s)
        if step_time is not None:
            # step N's pack overlaps step N+1: this step carried a pack iff the previous one started one
            self.interval.observe_step(step_time, self._in_flight)
        step = engine.global_steps
        self._in_flight = not self.paused and self.interval.should_snapshot(step)
        if self._in_flight:
            self.snapshotter.begin(step, ds_state.capture(engine, self._data_position(), self._fingerprint))
        if self.replication is not None:
            self.replication.set_window(True)
            if step_time is not None:
                self.replication.on_step(step, step_time)
        if engine.steps_per_print() and step % engine.steps_per_print() == 0:
            adapter.report_metrics(engine, self.rank, step, self.metrics())

    def _data_position(self) -> Any:
        return self.loader.state_dict() if isinstance(self.loader, ResumableDataLoader) else None

    # ---- what this rank holds (recovery reads these) ---------------------------------------------
    def fence(self) -> None:
        """Wait for the pack in flight (it is local: let it finish and commit)."""
        self.snapshotter.fence()

    def latest(self) -> Optional[SnapshotRef]:
        """Lease the last committed own snapshot (after the pack in flight), or None."""
        return self.snapshotter.latest()

    def own_steps(self) -> List[int]:
        """Steps of the own snapshots still held in host memory."""
        return self.snapshotter.pool.steps()

    def lease_own(self, step: int) -> Optional[SnapshotRef]:
        return self.snapshotter.pool.acquire_step(step)

    def held_replica_steps(self) -> Dict[int, List[int]]:
        """source rank -> steps of the committed replicas held here (this and earlier generations)."""
        return self.holdings.steps()

    def lease_replica(self, src: int, step: int):
        """A lease on the held replica of `src` at `step`, or None."""
        return self.holdings.lease(src, step)

    # ---- persistence and restore -----------------------------------------------------------------
    def persist(self, path: str) -> str:
        """Write the latest committed own snapshot under directory `path` in the background."""
        ref = self.latest()
        if ref is None:
            raise SnapshotError(f"persist({path!r}): no snapshot committed yet (take an optimizer step first)")
        return self.persister.persist(ref, path)

    def restore(self, engine, snapshot: SnapshotLike) -> int:
        """Verify, check against this engine and apply a snapshot; returns its step. Collective.

        Afterwards the restored step is this rank's committed own snapshot (a replacement re-replicates
        it at once) and every later version anywhere is dropped (a future that will not happen)."""
        self.fence()
        source, data = self._open(engine, snapshot)
        to_device = self.snapshotter.device_loader(source)  # GPU shard: unpacked and verified on the device
        parsed = read_snapshot(data, source, backend=self.cfg.snapshot_backend, verify=to_device is None,
                               key=snapshot_key())  # the job secret's: refuses other jobs' and edited files
        ds_state.check_compatible(engine, parsed, self._fingerprint, source)
        position = ds_state.apply(engine, decode_tree(parsed, to_device))
        if position is not None and isinstance(self.loader, ResumableDataLoader):
            self.loader.load_state_dict(position)
        self.holdings.rolled_back(parsed.step)
        self.snapshotter.pool.drop_newer_than(parsed.step)
        if self.snapshotter.pool.committed_step != parsed.step:  # restored from elsewhere: hold it as our own
            self.snapshotter.adopt(parsed.buffer, parsed.step)
        self._last_step_end = None  # the next step's time includes the restore: not a sample
        logger.info("fftrainer_ds: rank %d restored step %d from %s", self.rank, parsed.step, source)
        return parsed.step

    def restore_from_disk(self, engine, step: int) -> int:
        return self.restore(engine, step_dir(self.cfg.persist_dir, step))

    @staticmethod
    def _open(engine, snapshot: SnapshotLike):
        if isinstance(snapshot, (str, os.PathLike)):
            path = resolve(os.fspath(snapshot), engine.global_rank)
            return path, read_file(path)
        if isinstance(snapshot, SnapshotRef):
            return f"snapshot of rank {snapshot.rank} step {snapshot.step}", snapshot.buffer
        if isinstance(snapshot, (torch.Tensor, bytes, bytearray)):
            return "<in-memory snapshot>", snapshot
        raise SnapshotError(f"restore: cannot read a snapshot from a {type(snapshot).__name__}")

    # ---- generations -----------------------------------------------------------------------------
    def set_generation(self, generation: int) -> None:
        """Versions packed from now on carry `generation` (a replacement joining generation g)."""
        self.generation = self.snapshotter.generation = generation

    def rebind(self, engine, view: GenerationView) -> None:
        """After a regroup and engine rebuild: new generation, new replication service (collective).

        The old service is closed but kept in the holdings: its committed replicas are what a recovery reads.
        """
        self.fence()
        self.holdings.retire_live(_CLOSE_OLD_SERVICE_S)
        self.set_generation(view.generation)
        self.rank, self.world_size = engine.global_rank, engine.world_size
        self._last_step_end = None
        engine.training_dataloader = self.loader  # the rebuilt engine was given no training data
        self._start_replication(engine, view.nodes)

    # ---- metrics and shutdown ------------------------------------------------------------------------
    def metrics(self) -> Dict[str, Any]:
        s = self.snapshotter
        out: Dict[str, Any] = {"snapshot_bytes": s.last_bytes, "pack_ms": 1e3 * s.last_pack_s,
                               "fence_wait_ms": 1e3 * s.last_fence_wait_s, "snapshots": s.snapshots_taken,
                               "snapshot_interval_steps": self.interval.interval, "rpo_steps": self.interval.rpo_steps}
        if self.replication is not None:
            st = self.replication.stats()
            out.update({f"replication_{k}": v for k, v in st.items() if isinstance(v, (int, float))})
        return out

    def stats(self) -> Dict[str, Any]:
        """Size and timing of the last snapshot, replication counters, pack backend."""
        s = self.snapshotter
        return dict(self.metrics(), bytes=s.last_bytes, pack_s=s.last_pack_s, backend=s.packer_name)

    def close(self) -> None:
        try:
            self.snapshotter.close()
        finally:
            self.holdings.close()
            self.persister.wait()
