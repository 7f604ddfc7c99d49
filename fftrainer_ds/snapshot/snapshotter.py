"""Asynchronous per-step snapshots: pack step N while step N+1 runs forward/backward.

Call order (engine.py): `begin(step)` right after an optimizer step; `fence()` right before the
next optimizer step (waits for that pack only); `latest()` leases the last committed version.
On CPU the native pack runs on a worker thread with the GIL released; on CUDA a
`CudaPacker` (snapshot/cuda_packer.py) issues it on a low-priority stream instead.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence

import torch

from .. import ops
from .format import Layout, plan_layout, write_header
from .pool import SnapshotPool, SnapshotRef
from .codec import Captured, named_segments

logger = logging.getLogger("fftrainer_ds")


class ThreadPacker:
    """CPU packer: one background thread runs the native (or reference) pack kernel."""

    def __init__(self, backend: ops.Backend):
        self.backend = backend
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fftrainer-pack")

    def start(self, dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int],
              on_done: Callable[[List[int]], None]) -> Future:
        def job():
            sums = self.backend.pack(dst, srcs, offsets)
            on_done(sums)
            return sums

        return self._pool.submit(job)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Snapshotter:
    """Owns the pool and the in-flight pack of this rank; notifies listeners on each commit."""

    def __init__(self, rank: int, world_size: int, zero_stage: int, dtype_config: str, backend: ops.Backend,
                 pin: bool = True, max_buffers: int = 3):
        self.rank, self.world_size, self.zero_stage, self.dtype_config = rank, world_size, zero_stage, dtype_config
        self.pool = SnapshotPool(rank, pin=pin, max_buffers=max_buffers)
        self.packer = ThreadPacker(backend)
        self.generation = 0
        self._pending: Optional[Future] = None
        self._listeners: List[Callable[[SnapshotRef], None]] = []
        self.last_bytes = 0
        self.last_pack_s = 0.0
        self.last_fence_wait_s = 0.0
        self.snapshots_taken = 0

    def add_listener(self, fn: Callable[[SnapshotRef], None]) -> None:
        """fn(ref) is called on the pack thread after each commit; it must release the lease."""
        self._listeners.append(fn)

    def begin(self, step: int, cap: Captured) -> None:
        """Start packing `cap` (taken after optimizer step `step`) into a free pool slot."""
        self.fence()
        named = named_segments(cap)
        layout = plan_layout(named, cap.fingerprint, self.dtype_config)
        slot = self.pool.writable(layout.total_bytes)
        dst = slot.buffer
        srcs = [t for _, t in named]
        offsets = [layout.payload_off + s.offset for s in layout.segments]
        t0 = time.perf_counter()

        def on_done(sums: List[int]) -> None:
            try:
                self._finish(slot, layout, sums, step, t0)
            except BaseException:
                self.pool.abandon(slot)
                raise

        try:
            self._pending = self.packer.start(dst, srcs, offsets, on_done)
        except BaseException:
            self.pool.abandon(slot)
            raise

    def _finish(self, slot, layout: Layout, sums: List[int], step: int, t0: float) -> None:
        write_header(slot.buffer, layout, sums, step=step, generation=self.generation, rank=self.rank,
                     world_size=self.world_size, zero_stage=self.zero_stage)
        self.pool.commit(slot, layout.total_bytes, step, self.generation)
        self.last_bytes = layout.total_bytes
        self.last_pack_s = time.perf_counter() - t0
        self.snapshots_taken += 1
        self._notify()

    def _notify(self) -> None:
        for fn in self._listeners:
            ref = self.pool.acquire_committed()
            try:
                fn(ref)
            except Exception:  # a listener must never break snapshotting
                ref.release()
                logger.exception("fftrainer_ds: snapshot listener failed")

    def adopt(self, data: torch.Tensor, step: int) -> None:
        """Make verified snapshot bytes obtained elsewhere (a replica, a file) this rank's committed
        version, and hand it to the listeners: a replacement re-replicates its shard at once."""
        self.fence()
        slot = self.pool.writable(data.numel())
        try:
            slot.buffer[:data.numel()].copy_(data)
        except BaseException:
            self.pool.abandon(slot)
            raise
        self.pool.commit(slot, data.numel(), step, self.generation)
        self._notify()

    def fence(self) -> None:
        """Block until the in-flight pack (if any) is committed; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            t0 = time.perf_counter()
            pending.result()
            self.last_fence_wait_s = time.perf_counter() - t0

    def latest(self) -> Optional[SnapshotRef]:
        """Lease the last committed snapshot (after fencing the one in flight)."""
        self.fence()
        return self.pool.acquire_committed()

    def close(self) -> None:
        try:
            self.fence()
        finally:
            self.packer.close()
