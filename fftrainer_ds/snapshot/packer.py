"""The packer interface, the host (CPU) packer, and the choice between it and the CUDA one.

`Snapshotter` drives one `Packer` per rank. Call order, all from the training thread:
```
start(dst, srcs, offsets, on_done)   after optimizer step N: returns at once; on_done(checksums)
                                     runs on the packer's own thread once every byte is in dst
fence()                              before optimizer step N+1: afterwards the sources may change
                                     (host packer: the pack thread is done with them; CUDA packer:
                                     the current stream waits for the pack's last read, the host
                                     does not wait)
wait()                               the host waits until on_done has run; re-raises its error
close()                              waits for a pack in flight, then stops the thread
```
`last_device_s` is the last pack's duration timed on the device where it ran (CUDA events), None
for the host packer; the "auto" interval uses it (snapshot/interval.py).

Which packer (`choose_packer`, pure, unit-tested on CPU): the one that sits where the shard lives.
The CUDA packer when most captured bytes are on a CUDA device and a CUDA kernel is usable (the
native module built with CUDA, else Triton); the host packer when the state is in host memory
(CPU training, ZeRO-Offload: optimizer state on the host even on a GPU machine), or when no CUDA
kernel or no page-locked buffer is available (then device tensors are copied to the host first).
"""
from __future__ import annotations

import enum
import importlib.util
import logging
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence

import torch

from .. import ops

logger = logging.getLogger("fftrainer_ds")
OnDone = Callable[[List[int]], None]


class Packer(Protocol):
    """What the Snapshotter needs of a packer (see the module docstring for the call order)."""

    name: str
    on_device: bool
    last_device_s: Optional[float]

    def start(self, dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int],
              on_done: OnDone) -> None: ...

    def fence(self) -> None: ...

    def wait(self) -> None: ...

    def close(self) -> None: ...


class PackThread:
    """One background thread and the job in flight on it: where both packers finish and commit."""

    def __init__(self, thread_name: str):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._pending: Optional[Future] = None

    def _submit(self, job: Callable[[], None]) -> None:
        self._pending = self._thread.submit(job)

    def wait(self) -> None:
        """The host waits for the job in flight (pack and on_done); re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._thread.shutdown(wait=True)


class ThreadPacker(PackThread):
    """Host packer: one background thread runs the native (or reference) pack kernel, GIL released."""

    on_device = False
    last_device_s: Optional[float] = None

    def __init__(self, backend: ops.Backend, stage_to_host: bool = False):
        super().__init__("fftrainer-pack")
        self.backend = backend
        self.name = f"host-thread ({backend.name})"
        # Device tensors in a host-packed shard (module buffers under ZeRO-Offload, or no CUDA kernel):
        # copied to the host on the training thread, so the pack thread never issues device work.
        self._stage = stage_to_host

    def start(self, dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int],
              on_done: OnDone) -> None:
        if self._stage:
            srcs = [s if s.device.type == "cpu" else s.to("cpu") for s in srcs]

        def job():
            on_done(self.backend.pack(dst, srcs, offsets))

        self._submit(job)

    def fence(self) -> None:
        """The host sources change at the next optimizer step: wait for the whole pack."""
        self.wait()


class PackerKind(str, enum.Enum):
    HOST_THREAD = "host-thread"
    CUDA_STREAM = "cuda-stream"


@dataclass(frozen=True)
class Availability:
    """What this process can run: a CUDA device, the native CUDA kernels, Triton."""

    cuda: bool
    native_cuda: bool
    triton: bool

    @classmethod
    def detect(cls) -> "Availability":
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, native_cuda=cuda and ops.native.load_cuda() is not None,
                   triton=cuda and importlib.util.find_spec("triton") is not None)


@dataclass(frozen=True)
class PackerChoice:
    """The packer for one rank and why (logged once)."""

    kind: PackerKind
    reason: str
    device: Optional[str] = None   # the CUDA device of the shard (CUDA_STREAM)
    kernel: Optional[str] = None   # "native" or "triton" (CUDA_STREAM)
    stage_to_host: bool = False    # HOST_THREAD with device tensors among the sources

    def describe(self) -> str:
        where = f" on {self.device}, {self.kernel} kernel" if self.kind is PackerKind.CUDA_STREAM else ""
        return f"{self.kind.value}{where}: {self.reason}"


def bytes_by_device(tensors: Sequence[torch.Tensor]) -> Dict[str, int]:
    """Captured bytes per device ("cpu", "cuda:0", ...)."""
    out: Dict[str, int] = defaultdict(int)
    for t in tensors:
        out[str(t.device)] += t.numel() * t.element_size()
    return dict(out)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def choose_packer(placement: Mapping[str, int], have: Availability, backend: str = "auto",
                  pinned: bool = True) -> PackerChoice:
    """The packer for a shard whose bytes lie on `placement`'s devices (see the module docstring).

    An explicit snapshot_backend "native" or "triton" whose CUDA kernel is unusable raises ImportError
    (never a silent fallback); "auto" falls back to the host packer and says why."""
    host = sum(n for d, n in placement.items() if d == "cpu")
    on_dev = {d: n for d, n in placement.items() if d != "cpu"}
    if not on_dev:
        why = ("the captured state is in host memory (ZeRO-Offload or a CPU engine): host copy on the pack thread"
               if have.cuda else "no CUDA device: the state is in host memory")
        return PackerChoice(PackerKind.HOST_THREAD, why)
    device, dev_bytes = max(on_dev.items(), key=lambda kv: kv[1])
    fallback = PackerChoice(PackerKind.HOST_THREAD, "", stage_to_host=True)
    if dev_bytes <= host:
        return _with_reason(fallback, f"most of the shard is in host memory ({_mb(host)} vs {_mb(dev_bytes)} on "
                                      f"{device}; ZeRO-Offload): host copy, device tensors staged to the host")
    if not have.cuda or not device.startswith("cuda"):
        return _with_reason(fallback, f"the shard is on {device} but no CUDA device is usable: staged to the host")
    if backend == "reference":
        return _with_reason(fallback, "snapshot_backend='reference': the pure-torch reference on the pack thread")
    if not pinned:
        return _with_reason(fallback, "pin_memory is false: the CUDA packer writes page-locked buffers only")
    if backend in ("auto", "native") and have.native_cuda:
        return PackerChoice(PackerKind.CUDA_STREAM, f"the shard is on {device} ({_mb(dev_bytes)}): pack on the "
                            "lowest-priority stream, fenced by an event", device, "native")
    if backend == "native":
        raise ImportError("fast_failover.snapshot_backend='native': the shard is on a CUDA device but "
                          "fftrainer_ds._C was built without CUDA kernels (FFTRAINER_BUILD_CUDA=1)")
    if have.triton:
        return PackerChoice(PackerKind.CUDA_STREAM, f"the shard is on {device} ({_mb(dev_bytes)}) and _C has no "
                            "CUDA kernels: the Triton kernel on the lowest-priority stream", device, "triton")
    if backend == "triton":
        raise ImportError("fast_failover.snapshot_backend='triton': the shard is on a CUDA device but triton "
                          "is not importable")
    return _with_reason(fallback, "no CUDA pack kernel (_C built without CUDA, triton not importable): "
                                  "device tensors are copied to the host, then packed on the pack thread")


def _with_reason(choice: PackerChoice, reason: str) -> PackerChoice:
    return PackerChoice(choice.kind, reason, choice.device, choice.kernel, choice.stage_to_host)


def make_packer(tensors: Sequence[torch.Tensor], backend: ops.Backend, backend_name: str, pinned: bool,
                rank: int, have: Optional[Availability] = None) -> Packer:
    """Choose (from where `tensors` live), log the choice once with its reason, and build the packer."""
    placement = bytes_by_device(tensors)
    if have is None:
        # A CPU-only shard needs no probing of the CUDA build (no import of triton on CPU machines).
        on_dev = any(d != "cpu" for d in placement)
        have = Availability.detect() if on_dev else Availability(torch.cuda.is_available(), False, False)
    choice = choose_packer(placement, have, backend_name, pinned)
    logger.info("fftrainer_ds: rank %d snapshot packer = %s", rank, choice.describe())
    if choice.kind is PackerKind.CUDA_STREAM:
        from .device_packer import DevicePacker  # noqa: WPS433 (CUDA only)

        return DevicePacker(choice.device, choice.kernel, host_backend(backend))
    return ThreadPacker(backend, stage_to_host=choice.stage_to_host)


def host_backend(backend: ops.Backend) -> ops.Backend:
    """A backend that packs host tensors (Triton's kernel runs on the device only)."""
    return ops.get_backend("auto") if backend.name == "triton" else backend
