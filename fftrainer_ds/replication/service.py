"""`ReplicationService`: stream this rank's snapshots to its k holders and keep its sources' replicas.

Call order (engine.py):

    svc = ReplicationService(cfg, rank, world, node_of, snapshot_bytes, generation)  # COLLECTIVE
    per step:  svc.set_window(True)                      # forward/backward: senders may send
               ... svc.offer(pool.acquire_committed())   # hands over the lease, never blocks
               svc.end_of_compute()                      # forward/backward over (may send, see below)
               svc.set_window(False)                     # optimizer step / its collectives
               svc.set_window(True); svc.on_step(step, step_time_s)
    any time:  svc.stats(), svc.local_inventory(), svc.replica(src) (a lease: release it)
    all ranks: svc.replica_inventory()                   # COLLECTIVE over the replication group
    end:       svc.close()                               # bounded; replicas stay readable after it

One service per process-group generation (the generation is in every header; a holder refuses
others). `end_of_compute` is a fence: the optimizer step waits until the latest offered version
reached every live holder, so a replica lags by at most one step (the failover guarantee). With
adaptive_throttle, after `warmup_steps` calls of `on_step`, senders are held during the compute of
`baseline_steps` steps (again every `rebaseline_every_steps`) to measure the baseline step time; such
a step sends its held-back version at the fence, outside its sample. No on_step calls: no AIMD.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import ops
from ..config import FastFailoverConfig
from ..errors import ConfigError
from .inventory import Inventory, Version, gather
from .placement import check_memory, placement, replica_holders, sources_held_by
from .receiver import ReceiverThread, ReplicaRef, SourceReplica
from .throttle import MB, AimdThrottle, TokenBucket
from .sender import SenderThread
from .transport import Channel, OutgoingVersion, TransportHooks, round_chunk_bytes

logger = logging.getLogger("fftrainer_ds.replication")

# Services still open at interpreter exit are closed while daemon threads can still run: a thread
# woken inside gloo during finalization would abort the process ("terminate called ...").
_live_services: "weakref.WeakSet[ReplicationService]" = weakref.WeakSet()
atexit.register(lambda: [s.close(timeout_s=1.0) for s in list(_live_services)])


class ReplicationService:
    """Shadow replicas of every rank's snapshot in k peers' host memory (see the module docstring).

    The constructor is collective over the default group when `group` is None: it creates the
    replication group, exchanges snapshot sizes and raises the same ConfigError on every rank when k
    does not fit or a rank's buffers exceed `max_host_memory_gb`. `rank`, `world_size`: in that group.
    """

    def __init__(self, cfg: FastFailoverConfig, rank: int, world_size: int, node_of: Sequence[int],
                 snapshot_bytes: int, generation: int = 0, group=None, *,
                 peer_timeout_s: Optional[float] = None, close_timeout_s: float = 5.0,
                 warmup_steps: int = 1, baseline_steps: int = 3, rebaseline_every_steps: int = 1000) -> None:
        self.cfg, self.rank, self.world_size, self.generation = cfg, rank, world_size, generation
        self.k = cfg.replication_factor if cfg.enabled else 0
        # A peer making no progress this long is dropped (its replica goes stale): a hung process is found
        # by heartbeats long before, so this only has to outlast a starved but live peer, like a collective.
        self.peer_timeout_s = float(peer_timeout_s if peer_timeout_s is not None else cfg.collective_timeout_s)
        self.close_timeout_s = close_timeout_s
        self.chunk_bytes = round_chunk_bytes(cfg.chunk_bytes)
        self.hooks = TransportHooks()  # replaced by fftrainer_ds.testing.faults
        self.holders: List[int] = []
        self.sources: List[int] = []
        self.group = None
        self._own_group = False
        self._closed = False
        self._lock = threading.Lock()
        self._gate_cond = threading.Condition()
        self._window_open = True
        self._paused = False
        self._held = False  # set_paused(): an explicit hold (benchmarks), on top of the throttle's
        self._counters = dict(bytes_sent=0, versions_committed=0, versions_dropped=0,
                              versions_superseded=0, fence_waits=0, fence_wait_ms=0.0)
        self._peer_errors: Dict[int, str] = {}
        self._first_offered: Optional[int] = None
        self._last_offered: Optional[Version] = None
        self._bytes_at_last_step = 0
        self._replicas: Dict[int, SourceReplica] = {}
        self._senders: Dict[int, SenderThread] = {}
        self._receivers: Dict[int, ReceiverThread] = {}
        self._abandoned: List[str] = []
        self._aimd: Optional[AimdThrottle] = None
        self._bucket: Optional[TokenBucket] = None
        if self.k == 0:
            return
        if cfg.replication_backend != "gloo":
            raise ConfigError(f"fast_failover.replication_backend={cfg.replication_backend!r} is not implemented "
                              "yet (NCCL send/recv from several threads needs per-pair communicators); use 'gloo'")
        self._join_group(group, node_of, int(snapshot_bytes))
        self._checksum = ops.get_backend("reference" if cfg.snapshot_backend == "reference" else "auto",
                                         threads=1).checksum
        fixed = cfg.max_bandwidth_mbps * MB if cfg.max_bandwidth_mbps else None
        self._bucket = TokenBucket(fixed, burst_bytes=self.chunk_bytes)
        self._aimd = AimdThrottle(cfg.max_overhead_pct, max_rate_bps=fixed, warmup_steps=warmup_steps,
                                  baseline_steps=baseline_steps, rebaseline_every_steps=rebaseline_every_steps) \
            if cfg.adaptive_throttle else None
        self._paused = False  # the baseline pause starts with the first on_step()
        self._catch_up_s = 0.0  # time the current step spent sending a held-back version
        self._last_version_bytes = 0
        self._warned_floor = False
        self._start_threads(generation)
        _live_services.add(self)

    # ---- construction helpers -------------------------------------------------------------
    def _join_group(self, group, node_of: Sequence[int], snapshot_bytes: int) -> None:
        """Placement, the dedicated group (collective) and the memory budget: the same ConfigError on
        every rank, before or right after the group exists."""
        table = placement(self.world_size, self.k, node_of)  # ConfigError before any collective
        self.holders = replica_holders(self.rank, self.world_size, self.k, node_of)
        self.sources = sources_held_by(self.rank, self.world_size, self.k, node_of)
        if group is None:
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.cfg.collective_timeout_s))
            self._own_group = True
        self.group = group
        # Sizes are only needed for the memory budget (every rank has the same config: same collectives).
        sizes = self._gather_sizes(snapshot_bytes) if self.cfg.max_host_memory_gb is not None else []
        try:
            check_memory(self.cfg, table, sizes)
        except ConfigError:
            if self._own_group:
                dist.destroy_process_group(group)
            raise

    def _start_threads(self, generation: int) -> None:
        channel = self._channel = Channel(self.group)
        for src in self.sources:
            self._replicas[src] = SourceReplica(src)
            self._receivers[src] = ReceiverThread(
                channel, src, generation, self._replicas[src], self.peer_timeout_s, self._checksum,
                lambda: self.hooks, self._on_commit, self._on_bad_version, self._on_drop)
        for dst in self.holders:
            self._senders[dst] = SenderThread(
                channel, self.rank, dst, generation, self.peer_timeout_s, self._gate, self._bucket.acquire,
                lambda: self.hooks, self._on_sent, self._on_drop, self._on_superseded)
        for t in list(self._receivers.values()) + list(self._senders.values()):
            t.start()
        self._watchdog_stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="ffrepl-watchdog", daemon=True)
        self._watchdog.start()

    def _gather_sizes(self, nbytes: int) -> List[int]:
        mine = torch.tensor([nbytes], dtype=torch.int64)
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        return [int(t.item()) for t in out]

    # ---- engine-facing calls -------------------------------------------------------------------
    def offer(self, ref) -> None:
        """Replicate `ref` (a SnapshotRef lease, handed over): never blocks; the lease is released
        when every live holder got it or a newer offer superseded it (immediately if none)."""
        if self.k == 0 or self._closed:
            ref.release()
            return
        if ref.buffer.dtype != torch.uint8 or ref.buffer.device.type != "cpu" or not ref.buffer.is_contiguous():
            ref.release()
            raise ValueError(f"offer: the snapshot buffer must be a contiguous uint8 CPU tensor, got "
                             f"{ref.buffer.dtype} on {ref.buffer.device}")
        v = OutgoingVersion(ref, self.chunk_bytes, self._checksum)
        self._last_version_bytes = v.total
        with self._lock:
            if self._first_offered is None:
                self._first_offered = v.step
            self._last_offered = (v.generation, v.step)
        for sender in self._senders.values():
            sender.submit(v)
        v.unref()

    def set_window(self, open: bool) -> None:
        """True while the engine computes (forward/backward); False around its optimizer step and
        collectives. Senders finish the chunk on the wire and wait while it is False."""
        with self._gate_cond:
            self._window_open = bool(open)
            self._gate_cond.notify_all()

    def set_paused(self, paused: bool) -> None:
        """Hold every sender between chunks (True) or let them go (False); used to pair measurements."""
        with self._gate_cond:
            self._held = paused
            self._gate_cond.notify_all()

    def end_of_compute(self) -> None:
        """The training thread, when a step's forward/backward is over and before its optimizer step
        (the window still open): wait until the latest offered version (normally the previous step's)
        has been sent to every live holder, for as long as bytes keep going out (`flush`).

        This fence is the failover guarantee: no optimizer step completes while the step before it has
        no replica, so a failure loses at most one completed step. It costs nothing while replication
        keeps up (the throttle never goes below the rate that lets it); a step that ran paused for the
        adaptive throttle's baseline sends its held-back version here, outside its sample. No wait while
        replication is explicitly held (set_paused).
        """
        if self.k == 0 or self._closed or self._held:
            return
        was_paused = self._aimd is not None and self._paused
        if was_paused:
            with self._gate_cond:
                self._paused = False
                self._gate_cond.notify_all()
        if self._all_sent():
            return
        t0 = time.perf_counter()
        if not self.flush(self.peer_timeout_s):
            with self._lock:
                last = self._last_offered
            logger.warning("replication: rank %d: sending the version of step %s made no progress for %.1f s; the "
                           "optimizer step goes on", self.rank, last[1] if last else "?", self.peer_timeout_s)
        waited = time.perf_counter() - t0
        if was_paused:
            self._catch_up_s += waited
        else:
            with self._lock:
                self._counters["fence_waits"] += 1
                self._counters["fence_wait_ms"] += 1e3 * waited

    def on_step(self, step: int, step_time_s: float) -> None:
        """Feed one optimizer step's wall time to the adaptive throttle (no-op without it). The time a
        baseline step spent sending its held-back version (end_of_compute) is not part of its sample."""
        if self._aimd is None:
            return
        with self._lock:
            sent = self._counters["bytes_sent"] - self._bytes_at_last_step
            self._bytes_at_last_step = self._counters["bytes_sent"]
        if self._catch_up_s:
            step_time_s, sent, self._catch_up_s = max(0.0, step_time_s - self._catch_up_s), 0, 0.0
        live = len(self._live_senders())
        if live and self._last_version_bytes and step_time_s > 0:
            # Every version to every live holder within about half a step: the replica lag stays at
            # one step even when the overhead budget cannot be met (that is counted and reported).
            self._aimd.set_floor(2.0 * live * self._last_version_bytes / step_time_s)
        limited = self._aimd.floor_limited
        self._aimd.observe(step_time_s, sent)
        if self._aimd.floor_limited > limited and not self._warned_floor:
            self._warned_floor = True
            logger.warning("replication: rank %d: replicating each step's snapshot costs more than "
                           "max_overhead_pct=%.1f%% of the step time here; keeping the one-step replica lag "
                           "(the failover guarantee) over the budget (stats: floor_limited)",
                           self.rank, self.cfg.max_overhead_pct)
        self._bucket.set_rate(self._aimd.rate_bps)
        with self._gate_cond:
            self._paused = self._aimd.paused
            self._gate_cond.notify_all()

    def flush(self, stall_s: float) -> bool:
        """Wait until every live holder was sent the latest offered version (the holder commits it
        right after); False once no byte went out for `stall_s`. The bound is on progress, not on the
        total: a starved machine sends slowly but keeps the one-step lag, and a holder that stalls is
        dropped by the watchdog after peer_timeout_s, which ends the wait too."""
        last = (self._bytes_sent(), time.monotonic())
        while not self._all_sent():
            now, sent = time.monotonic(), self._bytes_sent()
            if sent != last[0]:
                last = (sent, now)
            elif now - last[1] > stall_s:
                return False
            time.sleep(0.005)
        return True

    def _bytes_sent(self) -> int:
        with self._lock:
            return self._counters["bytes_sent"]

    # ---- queries -------------------------------------------------------------------------------
    def local_inventory(self) -> Dict[int, List[Version]]:
        """source rank -> committed (generation, step) versions held on this rank, oldest first."""
        return {src: rep.committed_versions() for src, rep in self._replicas.items()}

    def replica_inventory(self) -> Inventory:
        """source -> {holder -> versions} over all ranks. COLLECTIVE over the replication group
        (RecoverableError when a member is gone)."""
        if self.k == 0:
            return {src: {} for src in range(self.world_size)}
        return gather(self.local_inventory(), self.group, self.world_size, self.generation)

    def replica(self, src: int, step: Optional[int] = None) -> Optional[ReplicaRef]:
        """A lease on the newest committed replica of `src` held here (or the one of `step`); None if
        there is none. Release it."""
        rep = self._replicas.get(src)
        return rep.lease(step) if rep is not None else None

    def stats(self) -> Dict[str, Any]:
        """Counters: bytes_sent, versions_sent (summed over holders), versions_committed/_dropped (as a
        holder; each drop logged with its reason), versions_superseded, current_rate_mbps (None: no limit),
        lag_steps (latest offered step minus the oldest fully sent to a live holder), dropped_peers,
        peer_errors ({rank: reason}), phase, baseline_step_s, backoffs, floor_limited (back-offs cut short
        to keep the one-step lag), fence_waits / fence_wait_ms (optimizer steps that waited for the replica)."""
        with self._lock:
            out: Dict[str, Any] = dict(self._counters)
            out["peer_errors"] = dict(self._peer_errors)
        out["versions_sent"] = sum(s.versions_sent for s in self._senders.values())
        rate = self._bucket.rate_bps if self.k else None
        out["current_rate_mbps"] = None if rate is None else rate / MB
        out["lag_steps"] = self._lag_steps()
        out["dropped_peers"] = sorted(out["peer_errors"])
        out["phase"] = "off" if self.k == 0 else (self._aimd.phase if self._aimd else "fixed")
        out["baseline_step_s"] = self._aimd.baseline_s if self._aimd else None
        out["backoffs"] = self._aimd.backoffs if self._aimd else 0
        out["floor_limited"] = self._aimd.floor_limited if self._aimd else 0
        out["holders"], out["sources"] = list(self.holders), list(self.sources)
        return out

    def _live_senders(self) -> List[SenderThread]:
        return [t for t in self._senders.values() if t.dropped is None]

    def _all_sent(self) -> bool:
        """Every live holder was sent the latest offered version."""
        return all(t.idle() for t in self._live_senders())

    def _lag_steps(self) -> int:
        with self._lock:
            last, first = self._last_offered, self._first_offered
        if last is None:
            return 0
        lags = [last[1] - s.delivered[1] if s.delivered else last[1] - first + 1
                for s in self._live_senders()]
        return max(lags, default=0)

    # ---- shutdown -------------------------------------------------------------------------------
    def close(self, timeout_s: Optional[float] = None) -> None:
        """Stop every thread; returns within about `timeout_s` (default close_timeout_s) + 1 s whatever
        the peers do. Senders end their streams with CLOSE and receivers wait for their sources'
        CLOSE until the deadline; threads still blocked then (a silent, stalled or dropped peer) are
        woken by interrupting the whole replication group (peers still sending to this rank see
        their stream fail and drop it). Replicas stay readable. Also run at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + (self.close_timeout_s if timeout_s is None else timeout_s)
        if self.k == 0:
            return
        self._watchdog_stop.set()  # from here on blocked threads are woken, not reported
        threads = [(f"sender to {d}", t) for d, t in self._senders.items()] + \
                  [(f"receiver from {s}", t) for s, t in self._receivers.items()]
        for _, t in threads:
            t.stop()
        with self._gate_cond:
            self._gate_cond.notify_all()
        for _, t in threads:  # a dropped peer's thread may be blocked for good: do not wait for it
            t.join(0.0 if t.dropped is not None else max(0.0, deadline - time.monotonic()))
        blocked = [(n, t) for n, t in threads if t.thread.is_alive()]
        if blocked and self._channel.interrupt_all(self.rank, self.world_size):
            for _, t in blocked:
                t.join(1.0)
        self._abandoned = [n for n, t in blocked if t.thread.is_alive()]
        if self._abandoned:
            logger.warning("replication: close() left blocked threads behind (%s)", ", ".join(self._abandoned))
        elif self._own_group and self.group is not None:
            try:
                dist.destroy_process_group(self.group)
            except Exception as exc:  # the default group may already be gone
                logger.debug("replication: destroying the group failed: %s", exc)

    # ---- thread callbacks -----------------------------------------------------------------------
    def _watch(self) -> None:
        """Drop a peer whose send (holder side stalled) or data recv (source stalled) overruns
        peer_timeout_s; the thread blocked in it is abandoned (see transport.py)."""
        period = min(0.2, self.peer_timeout_s / 5)
        while not self._watchdog_stop.wait(period):
            now = time.monotonic()
            for t in list(self._senders.values()) + list(self._receivers.values()):
                if t.watch.overdue(now):
                    t.expire()

    def _gate(self, stop: threading.Event) -> bool:
        with self._gate_cond:
            while not stop.is_set() and not (self._window_open and not self._paused and not self._held):
                self._gate_cond.wait(0.2)
        return not stop.is_set()

    def _on_sent(self, nbytes: int) -> None:
        with self._lock:
            self._counters["bytes_sent"] += nbytes

    def _on_superseded(self) -> None:
        with self._lock:
            self._counters["versions_superseded"] += 1

    def _on_commit(self, src: int, version: Version) -> None:
        with self._lock:
            self._counters["versions_committed"] += 1

    def _on_bad_version(self, src: int, version: Version, reason: str) -> None:
        with self._lock:
            self._counters["versions_dropped"] += 1
        logger.warning("replication: version (generation %d, step %d) of source rank %d dropped on rank %d: %s",
                       version[0], version[1], src, self.rank, reason)

    def _on_drop(self, peer: int, reason: str) -> None:
        with self._lock:
            self._peer_errors.setdefault(peer, reason)
