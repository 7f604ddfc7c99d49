"""The GPU path of snapshots: pack on the device into page-locked host memory, restore onto the device.

`DevicePacker` is the `Packer` (snapshot/packer.py) for a shard on a CUDA device. The bulk is
gathered and checksummed by `ops.cuda_packer.CudaPacker` on the lowest-priority stream, ordered
after the optimizer step that produced it; the training thread never waits for it:
- `start` (training thread): host-resident sources (optimizer step counters, RNG states, the meta
  segment: small) are copied now, because the next optimizer step may change them before the pack
  completes; then the device pack is issued whole and handed to a completion thread.
- the completion thread waits for the pack's completion event only (never the device), packs the
  host copies after it (the staged mode zero-fills gaps between device segments), reads the
  device-timed duration and runs `on_done` (header, commit, listeners).
- `fence` (training thread, before the next optimizer step): the current stream waits for the
  pack's last read of its sources: an event, no host wait, no device-wide synchronize. The engine
  runs its hooks inside `ds/sync.no_device_sync` while this packer is in use (runtime.py), so
  DeepSpeed's own synchronizes do not wait for the pack stream either.

`DeviceRestore` is `codec.decode_tree`'s hook on such a rank: the bulk of the shard (`goes_to_device`)
is copied back to the device on the same stream and verified there against the manifest checksums
(`CudaPacker.unpack_to_device`) before anything is applied; the rest is verified on the host.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import ops
from ..errors import SnapshotError
from ..ops.cuda_packer import CudaPacker
from .format import _DTYPES as MANIFEST_DTYPES  # the manifest's dtype table (format.py owns it)
from .format import ParsedSnapshot, SegmentInfo
from .packer import OnDone, PackThread


class DevicePacker(PackThread):
    """Packer for a CUDA shard (see the module docstring); one pack in flight at a time."""

    on_device = True

    def __init__(self, device: str, kernel: str, host_backend: ops.Backend):
        super().__init__("fftrainer-pack-done")
        self.cuda = CudaPacker(device, backend=kernel)  # lowest priority, mapped, issued whole
        self.device = self.cuda.device
        self.host_backend = host_backend
        self.name = (f"cuda-stream ({self.cuda.backend_name}, {self.cuda.mode}, priority {self.cuda.priority}) "
                     f"on {self.device}")
        self.last_device_s: Optional[float] = None
        self._sources_read: Optional[torch.cuda.Event] = None

    def start(self, dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int],
              on_done: OnDone) -> None:
        if self._pending is not None:
            raise RuntimeError("DevicePacker.start: the previous pack was not waited for")
        on_dev = [i for i, s in enumerate(srcs) if self._on_device(s)]
        on_host = [i for i, s in enumerate(srcs) if not self._on_device(s)]
        host_copies = [srcs[i].to("cpu", copy=True) for i in on_host]
        self.cuda.start(dst, [srcs[i] for i in on_dev], [offsets[i] for i in on_dev])
        # After this the completion thread owns self.cuda until wait(): fence() uses this event only.
        self._sources_read = self.cuda.sources_read

        def job():
            sums = [0] * len(srcs)
            for i, s in zip(on_dev, self.cuda.result()):  # the pack's completion event, not the device
                sums[i] = s
            self.last_device_s = self.cuda.last_device_s
            if on_host:
                host_sums = self.host_backend.pack(dst, host_copies, [offsets[i] for i in on_host])
                for i, s in zip(on_host, host_sums):
                    sums[i] = s
            on_done(sums)

        self._submit(job)

    def _on_device(self, t: torch.Tensor) -> bool:
        return t.device == self.device

    def fence(self) -> None:
        """The current stream waits for the pack's last read of its sources; the host goes on. (After
        wait() the event has long completed: waiting on it again costs nothing.)"""
        if self._sources_read is not None:
            torch.cuda.current_stream(self.device).wait_event(self._sources_read)

    def restorer(self, source: str) -> "DeviceRestore":
        """decode_tree's hook for one restore (no pack may be in flight: the caller fences first)."""
        return DeviceRestore(self.cuda, self.host_backend, source)


# What a GPU restore puts on the device: the bulk of the shard (fp32 partitions, optimizer moments),
# i.e. floating tensors of at least this many bytes with at least one dimension. Everything else stays
# on the host as before: step counters (0-dim; torch's Adam keeps them on the host), RNG states
# (uint8), small buffers. Where a tensor ends up is then DeepSpeed's and torch's business, as on the
# host path: DeepSpeed copies into its partitions, torch's optimizer casts state to its parameter's
# device, buffers are copied into the module's own.
DEVICE_MIN_BYTES = 64 << 10
_FLOATING = ("float32", "float64", "float16", "bfloat16")


def goes_to_device(seg: SegmentInfo) -> bool:
    return seg.dtype in _FLOATING and len(seg.shape) >= 1 and seg.nbytes >= DEVICE_MIN_BYTES


class DeviceRestore:
    """Verified tensors for `codec.decode_tree` on a CUDA rank (codec.py `SegmentLoader`)."""

    def __init__(self, cuda: Optional[CudaPacker], host_backend: ops.Backend, source: str):
        self.cuda, self.host_backend, self.source = cuda, host_backend, source

    def load(self, snap: ParsedSnapshot, segs: Sequence[SegmentInfo]) -> List[torch.Tensor]:
        """Tensors for `segs`: the bulk on the device (verified there), the rest on the host; every other
        segment of `snap` (meta) verified on the host, as read_snapshot(verify=False) left them."""
        bulk = [i for i, seg in enumerate(segs) if goes_to_device(seg)]
        placed = dict(zip(bulk, self.to_device(snap, [segs[i] for i in bulk])))
        moved = {segs[i].name for i in bulk}
        self.verify_host(snap, [seg for seg in snap.segments if seg.name not in moved])
        return [placed[i] if i in placed else snap.tensor(seg) for i, seg in enumerate(segs)]

    def verify_host(self, snap: ParsedSnapshot, segs: Sequence[SegmentInfo]) -> None:
        """The FF31 check read_snapshot(verify=False) left out, for segments that stay on the host."""
        for seg in segs:
            got = self.host_backend.checksum(snap.segment_bytes(seg))
            if got != seg.checksum:
                raise SnapshotError(f"{self.source}: checksum mismatch in segment {seg.name!r} "
                                    f"(stored {seg.checksum:016x}, computed {got:016x})")

    def to_device(self, snap: ParsedSnapshot, segs: Sequence[SegmentInfo]) -> List[torch.Tensor]:
        """Fresh device tensors holding `segs`, copied on the pack stream and verified on the device."""
        if not segs:
            return []
        dsts = [torch.empty(seg.shape, dtype=MANIFEST_DTYPES[seg.dtype], device=self.cuda.device) for seg in segs]
        try:
            self.cuda.unpack_to_device(snap.buffer, dsts, [snap.payload_off + seg.offset for seg in segs],
                                       [seg.checksum for seg in segs], names=[seg.name for seg in segs])
        except SnapshotError as exc:
            raise SnapshotError(f"{self.source}: {exc}") from None
        return dsts
