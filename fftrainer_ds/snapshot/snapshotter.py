"""Asynchronous per-step snapshots: pack step N while step N+1 runs forward/backward.

Call order (runtime.py): `begin(step)` right after an optimizer step; `release_sources()` right
before the next optimizer step (its sources are then safe to change); `fence()` where the pack must
be committed (before replication's fence, a recovery, a lease); `latest()` leases the last
committed version. The packer (snapshot/packer.py) follows the shard: the host thread packer (native
kernel, GIL released) when the state is in host memory, the CUDA stream packer
(snapshot/device_packer.py) when it is on a GPU; chosen once from the captured tensors' devices.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Sequence

import torch

from .. import ops
from .codec import Captured, SegmentLoader, named_segments
from .format import Layout, plan_layout, write_header
from .packer import Packer, make_packer
from .pool import SnapshotPool, SnapshotRef

logger = logging.getLogger("fftrainer_ds")


class Snapshotter:
    """Owns the pool, the packer and the in-flight pack of this rank; notifies listeners on each commit."""

    def __init__(self, rank: int, world_size: int, zero_stage: int, dtype_config: str, backend: ops.Backend,
                 pin: bool = True, max_buffers: int = 3, backend_name: str = "auto"):
        self.rank, self.world_size, self.zero_stage, self.dtype_config = rank, world_size, zero_stage, dtype_config
        self.pool = SnapshotPool(rank, pin=pin, max_buffers=max_buffers)
        self.backend, self.backend_name = backend, backend_name
        self.packer: Optional[Packer] = None  # chosen by choose_packer (the runtime probes at init)
        self.generation = 0
        self._busy = False  # a pack was started and not yet waited for
        self._listeners: List[Callable[[SnapshotRef], None]] = []
        self.last_bytes = 0
        self.last_pack_s = 0.0
        self.last_fence_wait_s = 0.0
        self.snapshots_taken = 0
        self._device_pack_s: Optional[float] = None

    # ---- the packer ----
    def choose_packer(self, tensors: Sequence[torch.Tensor]) -> Packer:
        """Pick the packer once, from the devices of `tensors` (a capture); logged with the reason."""
        if self.packer is None:
            pinned = self.pool.pin and torch.cuda.is_available()  # the pool's CUDA-pinned buffers
            self.packer = make_packer(tensors, self.backend, self.backend_name, pinned, self.rank)
        return self.packer

    @property
    def on_device(self) -> bool:
        """Whether the CUDA stream packer is in use (the engine then runs in no_device_sync)."""
        return self.packer is not None and self.packer.on_device

    @property
    def packer_name(self) -> str:
        return self.packer.name if self.packer is not None else f"not chosen yet ({self.backend.name})"

    def device_loader(self, source: str) -> Optional[SegmentLoader]:
        """decode_tree's hook for restoring onto the device (None: restore on the host)."""
        if not self.on_device:
            return None
        self.fence()
        return self.packer.restorer(source)

    def take_device_pack_s(self) -> Optional[float]:
        """The newest pack's device-timed duration, once (None on the host path or if already taken)."""
        value, self._device_pack_s = self._device_pack_s, None
        return value

    def add_listener(self, fn: Callable[[SnapshotRef], None]) -> None:
        """fn(ref) is called on the pack thread after each commit; it must release the lease."""
        self._listeners.append(fn)

    def begin(self, step: int, cap: Captured) -> None:
        """Start packing `cap` (taken after optimizer step `step`) into a free pool slot."""
        self.fence()
        packer = self.choose_packer(cap.tensors)
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
            packer.start(dst, srcs, offsets, on_done)
        except BaseException:
            self.pool.abandon(slot)
            raise
        self._busy = True

    def _finish(self, slot, layout: Layout, sums: List[int], step: int, t0: float) -> None:
        write_header(slot.buffer, layout, sums, step=step, generation=self.generation, rank=self.rank,
                     world_size=self.world_size, zero_stage=self.zero_stage)
        self.pool.commit(slot, layout.total_bytes, step, self.generation)
        self.last_bytes = layout.total_bytes
        device_s = self.packer.last_device_s  # the CUDA packer's events: the pack itself, not the host's wait
        self.last_pack_s = time.perf_counter() - t0 if device_s is None else device_s
        self._device_pack_s = device_s
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

    def release_sources(self) -> None:
        """Before the next optimizer step: afterwards the captured tensors may change. Host packer: the
        same as fence(); CUDA packer: the current stream waits for the pack's reads, the host goes on."""
        if not self.on_device:
            self.fence()
        elif self._busy:
            self.packer.fence()

    def fence(self) -> None:
        """Block until the in-flight pack (if any) is committed; re-raise its error."""
        if self._busy:
            self._busy = False
            t0 = time.perf_counter()
            self.packer.fence()
            self.packer.wait()
            self.last_fence_wait_s = time.perf_counter() - t0

    def latest(self) -> Optional[SnapshotRef]:
        """Lease the last committed snapshot (after fencing the one in flight)."""
        self.fence()
        return self.pool.acquire_committed()

    def close(self) -> None:
        try:
            self.fence()
        finally:
            if self.packer is not None:
                self.packer.close()
