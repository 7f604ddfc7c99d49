"""GPU packer: gather + checksum of step N's state on a low-priority stream, fenced without host sync.

Call order (snapshotter / engine):
```
start(dst, srcs, offsets)   after optimizer step N: event on the current stream; the pack stream
                            waits on it and begins (first piece)
issue_next()                optional, from hooks in step N+1's forward/backward: issue the next
                            piece, ordered after the compute queued so far (chunked issue)
fence()                     before optimizer step N+1: the current stream waits for the pack's last
                            read of the sources (an event; no host sync, no device-wide sync)
result() -> checksums       host waits on the pack's completion event only; `last_device_s` is then
                            the pack's duration timed on the device (start to completion event)
```
snapshot/device_packer.py drives it for the engine: start and fence on the training thread, result()
on a completion thread once every piece is issued (it fences with `sources_read`, not `fence()`).
`dst` is a pinned (page-locked) host uint8 buffer. Two ways to reach it, picked by `mode` and
measured by benchmarks/gpu_suite.sh (keep the faster as the default):
- "mapped": the kernel stores straight into the pinned buffer through its device address (UVA).
- "staged": the kernel packs windows into a small device ring (`staging_slots` x `staging_bytes`),
  each window copied to the pinned buffer by a copy engine on a second stream while the next one
  is packed. Bytes between segments inside a window are written as zeros (the format's padding).

Stream priority. CUDA priorities on the H100 range from 0 (the lowest, also the default of every
stream torch creates) to -3 (highest). The pack streams run at `priority` (default 0, the lowest
there is), so they only yield to compute when compute runs *above* the default, i.e. on a stream
made with a negative priority (`high_priority_stream()`); with compute on the default stream the
two simply share the GPU. The choice is explicit in the constructor and recorded in `priority`.

Sources must not change until `fence()` has been issued: the pack reads them asynchronously.
The GPU restore path (`unpack_to_device`) copies host bytes into device tensors on the same
low-priority stream and verifies them there against the manifest checksums.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import SnapshotError
from . import native
from .reference import as_bytes

logger = logging.getLogger("fftrainer_ds")

LOWEST_PRIORITY = 0
"""CUDA's lowest stream priority (and torch's default); larger values are clamped to it."""

MODES = ("mapped", "staged")


def high_priority_stream(device=None, priority: int = -1) -> "torch.cuda.Stream":
    """A compute stream above the default priority, so the pack stream (priority 0) yields to it."""
    return torch.cuda.Stream(device=device, priority=priority)


def split_even(total: int, pieces: int) -> List[Tuple[int, int]]:
    """[0, total) cut into at most `pieces` consecutive non-empty ranges of near-equal length."""
    pieces = max(1, min(pieces, total))
    return [(total * i // pieces, total * (i + 1) // pieces) for i in range(pieces) if total]


def plan_windows(chunk_begin: Sequence[int], sizes: Sequence[int], offsets: Sequence[int], chunk_bytes: int,
                 window_bytes: int) -> List[Tuple[int, int, int, int]]:
    """Staging windows (chunk_lo, chunk_hi, dst_lo, dst_hi): consecutive chunks whose destination
    bytes span at most `window_bytes`. Needs segments laid out in increasing, non-overlapping order."""
    if window_bytes < chunk_bytes:
        raise ValueError(f"staging window ({window_bytes} bytes) smaller than a chunk ({chunk_bytes} bytes)")
    windows: List[Tuple[int, int, int, int]] = []
    cur: Optional[List[int]] = None  # [chunk_lo, chunk_hi, dst_lo, dst_hi]
    for s, (n, off) in enumerate(zip(sizes, offsets)):
        c, end, seg_end = chunk_begin[s], chunk_begin[s + 1], off + n
        while c < end:
            first = off + (c - chunk_begin[s]) * chunk_bytes
            if cur is None:
                cur = [c, c, first, first]
            limit = cur[2] + window_bytes
            fit = end - c if seg_end <= limit else (limit - first) // chunk_bytes
            if fit <= 0:  # close this window; the next one starts at chunk c (and fits >= 1 chunk)
                windows.append((cur[0], cur[1], cur[2], cur[3]))
                cur = None
                continue
            cur[1], cur[3] = c + fit, min(seg_end, first + fit * chunk_bytes)
            c += fit
    if cur is not None:
        windows.append((cur[0], cur[1], cur[2], cur[3]))
    return windows


class CudaPacker:
    """Packs CUDA tensors into a pinned snapshot buffer on a low-priority stream (see module doc)."""

    def __init__(self, device=None, *, priority: int = LOWEST_PRIORITY, mode: str = "mapped", pieces: int = 1,
                 staging_bytes: int = 64 << 20, staging_slots: int = 2, max_blocks: int = 0,
                 backend: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"CudaPacker: mode must be one of {MODES}, got {mode!r}")
        if pieces < 1 or staging_slots < 1 or max_blocks < 0:
            raise ValueError("CudaPacker: pieces and staging_slots must be >= 1, max_blocks >= 0")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self._C = native.load_cuda() if backend in ("auto", "native") else None
        if backend == "native" and self._C is None:
            raise ImportError("CudaPacker(backend='native'): fftrainer_ds._C was built without CUDA kernels")
        if self._C is None:
            from ..ops import triton_pack  # noqa: WPS433 (raises ImportError without triton)
            self._triton = triton_pack
            if mode != "mapped" or pieces != 1:
                logger.info("fftrainer_ds: Triton pack path: one piece, mapped (mode=%s pieces=%d ignored)",
                            mode, pieces)
            mode, pieces = "mapped", 1
        self.backend_name = "native-cuda" if self._C is not None else "triton"
        self.priority = priority
        self.mode, self.pieces, self.max_blocks = mode, pieces, max_blocks
        self.staging_bytes, self.staging_slots = staging_bytes, staging_slots
        self.stream = torch.cuda.Stream(device=self.device, priority=priority)
        self.copy_stream = torch.cuda.Stream(device=self.device, priority=priority) if mode == "staged" else None
        self._slots: List[torch.Tensor] = []
        self._slot_free: List[Optional[torch.cuda.Event]] = []
        self._next_slot = 0
        # Pinned int64 checksums, reused by every pack (one in flight): no page-locked allocation per step.
        self._sums_pinned: Optional[torch.Tensor] = None
        self.last_device_s: Optional[float] = None
        self._reset()

    # ---- state of one pack ----
    def _reset(self) -> None:
        self._active = False
        self._plan = None
        self._dst: Optional[torch.Tensor] = None
        self._srcs: List[torch.Tensor] = []
        self._offsets: List[int] = []
        self._todo: List[list] = []     # pieces not yet issued: lists of (chunk_lo, chunk_hi, dst_lo, dst_hi)
        self._sources_done: Optional[torch.cuda.Event] = None
        self._began: Optional[torch.cuda.Event] = None
        self._done: Optional[torch.cuda.Event] = None
        self._host_sums: Optional[torch.Tensor] = None

    @property
    def busy(self) -> bool:
        """True from start() until the pack has completed on the device (result() not needed)."""
        if not self._active:
            return False
        return bool(self._todo) or not self._done.query()

    @property
    def sources_read(self) -> Optional["torch.cuda.Event"]:
        """Recorded after the pack's last read of its sources (None until every piece is issued). A caller
        that collects result() on another thread makes its compute stream wait on this event instead of
        calling fence(), which would touch the state that result() resets."""
        return self._sources_done if self._active else None

    def start(self, dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
        """Begin packing srcs into dst at byte offsets, ordered after the work queued on the current stream."""
        if self._active:
            raise RuntimeError("CudaPacker.start: the previous pack's result() has not been collected")
        if dst.dtype != torch.uint8 or dst.dim() != 1 or not dst.is_contiguous():
            raise ValueError("CudaPacker.start: dst must be a contiguous 1-D uint8 tensor")
        if dst.device.type == "cpu" and not dst.is_pinned():
            raise ValueError("CudaPacker.start: dst must be pinned host memory (pin_memory=True)")
        if dst.device.type != "cpu" and (self.mode == "staged" or dst.device != self.device):
            raise ValueError(f"CudaPacker.start: dst on {dst.device}: pinned CPU memory expected "
                             f"(mode={self.mode}; a CUDA dst on {self.device} only in mapped mode)")
        if len(srcs) != len(offsets):
            raise ValueError(f"CudaPacker.start: srcs ({len(srcs)}) and offsets ({len(offsets)}) differ in length")
        srcs = [s.detach() for s in srcs]
        offsets = [int(o) for o in offsets]
        for i, s in enumerate(srcs):
            if s.device != self.device:
                raise ValueError(f"CudaPacker.start: srcs[{i}] is on {s.device}, expected {self.device}")
        self._dst, self._srcs, self._offsets, self._active = dst, srcs, offsets, True
        try:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(ready)
            self._began = torch.cuda.Event(enable_timing=True)  # when the pack stream may begin: the timing base
            self._began.record(self.stream)
            self._plan_pieces(dst, srcs, offsets)
            self.issue_next(gate=False)
            if self.pieces == 1:
                self._issue_all()
        except BaseException:
            self._reset()
            raise

    def _plan_pieces(self, dst: torch.Tensor, srcs: List[torch.Tensor], offsets: List[int]) -> None:
        if self._C is None:
            self._todo = [[(0, 0, 0, 0)]]  # Triton: one launch
            return
        if not srcs:
            self._todo = [[]]
            return
        self._plan = self._C.CudaPackPlan(srcs, offsets, stream=self.stream.cuda_stream)
        total = self._plan.num_chunks
        if self.mode == "mapped":
            self._todo = [[(lo, hi, 0, 0)] for lo, hi in split_even(total, self.pieces)] or [[]]
            return
        sizes = [s.numel() * s.element_size() for s in srcs]
        order_ok = all(offsets[i] + sizes[i] <= offsets[i + 1] for i in range(len(srcs) - 1))
        if not order_ok:
            raise ValueError("CudaPacker(mode='staged'): segments must be in increasing, non-overlapping offsets")
        windows = plan_windows(self._plan.chunk_begin(), sizes, offsets, self._C.CUDA_CHUNK_BYTES, self.staging_bytes)
        self._todo = [windows[lo:hi] for lo, hi in split_even(len(windows), self.pieces)] or [[]]
        self._ensure_slots()

    def _ensure_slots(self) -> None:
        while len(self._slots) < self.staging_slots:
            with torch.cuda.stream(self.stream):
                slot = torch.empty(self.staging_bytes, dtype=torch.uint8, device=self.device)
            slot.record_stream(self.copy_stream)
            self._slots.append(slot)
            self._slot_free.append(None)

    def issue_next(self, gate: bool = True) -> bool:
        """Issue the next piece; with gate, it runs after the work queued so far on the current stream.
        Returns whether a piece was issued. The last piece also issues the checksum finalization."""
        if not self._active or not self._todo:
            return False
        if gate:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(ev)
        piece = self._todo.pop(0)
        if self._C is None:
            with torch.cuda.stream(self.stream):
                sums = self._triton.pack_async(self._dst, self._srcs, self._offsets)
            self._finish_issue(sums)
        else:
            for c0, c1, lo, hi in piece:
                if self.mode == "mapped":
                    self._plan.pack(self._dst, c0, c1, 0, self.stream.cuda_stream, self.max_blocks)
                else:
                    self._issue_window(c0, c1, lo, hi)
            if not self._todo:
                self._finish_issue(self._plan.finalize(self.stream.cuda_stream) if self._plan is not None
                                   else torch.zeros(0, dtype=torch.int64, device=self.device))
        return True

    def _issue_window(self, c0: int, c1: int, lo: int, hi: int) -> None:
        k = self._next_slot
        self._next_slot = (k + 1) % len(self._slots)
        slot = self._slots[k]
        if self._slot_free[k] is not None:
            self.stream.wait_event(self._slot_free[k])
        with torch.cuda.stream(self.stream):
            slot[:hi - lo].zero_()  # padding between segments inside the window
        self._plan.pack(slot, c0, c1, lo, self.stream.cuda_stream, self.max_blocks)
        packed = torch.cuda.Event()
        packed.record(self.stream)
        self.copy_stream.wait_event(packed)
        with torch.cuda.stream(self.copy_stream):
            self._dst[lo:hi].copy_(slot[:hi - lo], non_blocking=True)
        free = torch.cuda.Event()
        free.record(self.copy_stream)
        self._slot_free[k] = free

    def _finish_issue(self, sums_dev: torch.Tensor) -> None:
        """After the last piece: sources are no longer read; checksums to host; completion event."""
        self._sources_done = torch.cuda.Event()
        self._sources_done.record(self.stream)
        n = sums_dev.numel()
        if self._sums_pinned is None or self._sums_pinned.numel() < n:
            self._sums_pinned = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
        self._host_sums = self._sums_pinned[:n]
        with torch.cuda.stream(self.stream):
            self._host_sums.copy_(sums_dev, non_blocking=True)
        if self.copy_stream is not None:
            copies = torch.cuda.Event()
            copies.record(self.copy_stream)
            self.stream.wait_event(copies)
        self._done = torch.cuda.Event(blocking=True, enable_timing=True)
        self._done.record(self.stream)

    def _issue_all(self) -> None:
        while self.issue_next(gate=False):
            pass

    def fence(self) -> None:
        """Make the current stream wait until the pack has read every source (no host sync)."""
        if not self._active:
            return
        self._issue_all()
        torch.cuda.current_stream(self.device).wait_event(self._sources_done)

    def result(self) -> List[int]:
        """Wait (host) for this pack's completion event only and return the FF31 checksums."""
        if not self._active:
            raise RuntimeError("CudaPacker.result: no pack was started")
        self._issue_all()
        self._done.synchronize()
        sums = [int(x) for x in self._host_sums.tolist()]
        self.last_device_s = self._began.elapsed_time(self._done) / 1e3
        self._reset()
        return sums

    def close(self) -> None:
        """Wait for a pack in flight, if any, and drop it."""
        if self._active:
            self.result()

    # ---- restore ----
    def unpack_to_device(self, src: torch.Tensor, dsts: Sequence[torch.Tensor], offsets: Sequence[int],
                         expected_checksums: Sequence[int], names: Optional[Sequence[str]] = None) -> None:
        """Copy src[offsets[i]:] into each CUDA tensor dsts[i] (H2D on the pack stream) and verify its
        FF31 checksum on the device; raises SnapshotError naming the first mismatching segment.
        Blocks until verified; ordered after the work queued on the current stream."""
        if self._active:
            raise RuntimeError("CudaPacker.unpack_to_device: a pack is in flight; collect its result() first")
        if src.dtype != torch.uint8 or src.dim() != 1 or src.device.type != "cpu":
            raise ValueError("unpack_to_device: src must be a 1-D uint8 CPU tensor (pinned for an async copy)")
        if not (len(dsts) == len(offsets) == len(expected_checksums)):
            raise ValueError("unpack_to_device: dsts, offsets and expected_checksums differ in length")
        views = []
        for i, (d, off) in enumerate(zip(dsts, offsets)):
            if d.device != self.device:
                raise ValueError(f"unpack_to_device: dsts[{i}] is on {d.device}, expected {self.device}")
            v = as_bytes(d)
            if off < 0 or off + v.numel() > src.numel():
                raise SnapshotError(f"unpack_to_device: segment {self._name(names, i)} at offset {off} of "
                                    f"{v.numel()} bytes exceeds the snapshot buffer ({src.numel()} bytes)")
            views.append(v)
        if not views:
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            for v, off in zip(views, offsets):
                if v.numel():
                    v.copy_(src[int(off):int(off) + v.numel()], non_blocking=True)
            if self._C is not None:
                plan = self._C.CudaPackPlan(views, [0] * len(views), stream=self.stream.cuda_stream)
                plan.pack(None, 0, -1, 0, self.stream.cuda_stream, self.max_blocks)
                sums_dev = plan.finalize(self.stream.cuda_stream)
            else:
                sums_dev = self._triton.checksum_many_async(views)
            host = torch.empty(len(views), dtype=torch.int64, pin_memory=True)
            host.copy_(sums_dev, non_blocking=True)
            done = torch.cuda.Event(blocking=True)
            done.record(self.stream)
        done.synchronize()
        got = host.tolist()
        for i, (g, e) in enumerate(zip(got, expected_checksums)):
            if int(g) != int(e):
                raise SnapshotError(f"unpack_to_device: segment {self._name(names, i)} checksum mismatch after the "
                                    f"copy to {self.device}: got {int(g):016x}, manifest says {int(e):016x}")
        torch.cuda.current_stream(self.device).wait_event(done)

    @staticmethod
    def _name(names: Optional[Sequence[str]], i: int) -> str:
        return f"{i} ({names[i]!r})" if names is not None else str(i)
