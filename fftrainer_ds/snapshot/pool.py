"""Host buffers for snapshots: page-locked where possible, double-buffered, leased to readers.

Invariants: a slot being written is never the committed one; the committed version is replaced
only by `commit()` of a complete, checksummed one; a slot with live leases is never rewritten.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from typing import List, Optional

import torch

logger = logging.getLogger("fftrainer_ds")
_libc = None


def _mlock(t: torch.Tensor) -> bool:
    """Page-lock a CPU tensor's memory; False (and a log line once) where the OS refuses."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return _libc.mlock(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.numel())) == 0
    except OSError:
        return False


def alloc_host(nbytes: int, pin: bool) -> torch.Tensor:
    """A host uint8 buffer: CUDA-pinned when CUDA is available, else mlock'ed when permitted."""
    # Zeroed: packers write segments only, and the format requires zero padding between them;
    # zeroing also faults the pages in now rather than during the first pack.
    # Called only when SnapshotPool creates a slot (at most max_buffers) or grows one (a bigger
    # snapshot, with 1/8 slack), never per step: page-locking costs milliseconds per GB, and the
    # slots are reused for the job's lifetime. On CUDA this is torch's caching host allocator, so even
    # a grown slot's old buffer is kept and reused rather than unpinned. The CUDA packer keeps its
    # pinned checksum buffer across packs (ops/cuda_packer.py); the few-KB segment tables the native
    # plan and the Triton kernel upload per pack come from the same caching allocator, which hands
    # back its cached page-locked blocks: after the first steps no page is locked per step.
    if pin and torch.cuda.is_available():
        return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    if pin and not _mlock(buf) and not getattr(alloc_host, "_warned", False):
        alloc_host._warned = True
        logger.info("fftrainer_ds: mlock refused (RLIMIT_MEMLOCK); snapshot buffers are pageable")
    return buf


@dataclass(eq=False)
class _Slot:
    buffer: torch.Tensor
    leases: int = 0
    writing: bool = False
    nbytes: int = 0
    step: int = -1
    generation: int = 0


@dataclass(eq=False)
class SnapshotRef:
    """A lease on one committed snapshot: `buffer` holds exactly its bytes until `release()`."""

    step: int
    generation: int
    rank: int
    buffer: torch.Tensor
    _pool: Optional["SnapshotPool"] = field(default=None, repr=False)
    _slot: Optional[_Slot] = field(default=None, repr=False)

    def release(self) -> None:
        if self._pool is not None:
            self._pool._release(self._slot)
            self._pool = None

    def __enter__(self) -> "SnapshotRef":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class SnapshotPool:
    """Up to `max_buffers` host slots; one committed, at most one being written, the rest free or leased."""

    def __init__(self, rank: int, pin: bool = True, max_buffers: int = 3):
        self.rank = rank
        self.pin = pin
        self.max_buffers = max_buffers
        self._slots: List[_Slot] = []
        self._committed: Optional[_Slot] = None
        self._cv = threading.Condition()

    def writable(self, nbytes: int, timeout_s: float = 600.0) -> _Slot:
        """A slot of at least nbytes that is neither committed nor leased (allocating if needed).

        The oldest free version is reused first, so the previous committed versions stay readable
        (a recovery may roll back to the step before the last one).
        """
        with self._cv:
            while True:
                if len(self._slots) < self.max_buffers:
                    s = _Slot(alloc_host(nbytes + nbytes // 8, self.pin), writing=True)
                    self._slots.append(s)
                    return s
                for s in sorted(self._slots, key=lambda x: x.step):
                    if s is not self._committed and s.leases == 0 and not s.writing:
                        if s.buffer.numel() < nbytes:
                            s.buffer = alloc_host(nbytes + nbytes // 8, self.pin)
                        s.writing = True
                        s.step = -1
                        return s
                # Every spare slot is leased by a slow reader: wait rather than overwrite.
                if not self._cv.wait(timeout=timeout_s):
                    raise TimeoutError(f"snapshot pool of rank {self.rank}: no free slot after {timeout_s}s")

    def commit(self, slot: _Slot, nbytes: int, step: int, generation: int) -> None:
        """Make a fully packed and checksummed slot the committed version."""
        with self._cv:
            slot.writing = False
            slot.nbytes, slot.step, slot.generation = nbytes, step, generation
            self._committed = slot
            self._cv.notify_all()

    def abandon(self, slot: _Slot) -> None:
        """Give back a slot whose write failed; the committed version is untouched."""
        with self._cv:
            slot.writing = False
            self._cv.notify_all()

    def acquire_committed(self) -> Optional[SnapshotRef]:
        """Lease the latest committed snapshot (None before the first commit)."""
        with self._cv:
            s = self._committed
            if s is None:
                return None
            s.leases += 1
            return SnapshotRef(s.step, s.generation, self.rank, s.buffer[:s.nbytes], self, s)

    def steps(self) -> List[int]:
        """Steps of every complete version held (the committed one and older retained ones)."""
        with self._cv:
            return sorted(s.step for s in self._slots if not s.writing and s.step >= 0)

    def acquire_step(self, step: int) -> Optional[SnapshotRef]:
        """Lease the complete version of `step`, if still held."""
        with self._cv:
            for s in self._slots:
                if not s.writing and s.step == step:
                    s.leases += 1
                    return SnapshotRef(s.step, s.generation, self.rank, s.buffer[:s.nbytes], self, s)
            return None

    def drop_newer_than(self, step: int) -> None:
        """Forget versions after `step` (a rollback made them a future that will not happen)."""
        with self._cv:
            for s in self._slots:
                if s.step > step and s.leases == 0 and not s.writing:
                    s.step = -1
                    if s is self._committed:
                        self._committed = None
            if self._committed is None:
                held = [s for s in self._slots if s.step >= 0 and not s.writing]
                self._committed = max(held, key=lambda x: x.step) if held else None

    @property
    def committed_step(self) -> Optional[int]:
        with self._cv:
            return None if self._committed is None else self._committed.step

    def _release(self, slot: _Slot) -> None:
        with self._cv:
            slot.leases -= 1
            self._cv.notify_all()
