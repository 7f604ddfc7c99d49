"""Pack+checksum backends behind one interface.

`get_backend(name)` returns the backend for "auto", "native", "triton" or "reference" and logs
which one was chosen. "auto" prefers the native module and falls back to the pure-torch
reference; an explicit "native" that cannot be loaded raises with the import error chained.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from . import native, reference

logger = logging.getLogger("fftrainer_ds")

BACKENDS = ("auto", "native", "triton", "reference")


@dataclass(frozen=True)
class Backend:
    """A pack+checksum implementation. All backends produce byte-identical buffers."""

    name: str
    pack: Callable[[torch.Tensor, Sequence[torch.Tensor], Sequence[int]], List[int]]
    checksum: Callable[[torch.Tensor], int]


def _native(threads: int) -> Backend:
    _C = native.load()

    def pack(dst, srcs, offsets):
        srcs = [s.detach() for s in srcs]
        if srcs and srcs[0].is_cuda:  # device sources: one CUDA launch, checksums come back as int64
            sums = _C.pack_cuda(dst, srcs, [int(o) for o in offsets]).cpu().tolist()
            return [x & 0xFFFFFFFFFFFFFFFF for x in sums]
        return _C.pack(dst, srcs, [int(o) for o in offsets], threads)

    def checksum(data):
        return _C.checksum(data, threads)

    return Backend("native-cuda" if _C.has_cuda() else "native-cpu", pack, checksum)


def _triton() -> Backend:
    from . import triton_pack  # noqa: WPS433

    return Backend("triton", triton_pack.pack, triton_pack.checksum)


_REFERENCE = Backend("reference", reference.pack, reference.checksum)
_cache: dict = {}


def get_backend(name: str = "auto", threads: int = 0) -> Backend:
    """Return the named backend (see module docstring); the choice is logged once per name."""
    if name not in BACKENDS:
        raise ValueError(f"snapshot backend must be one of {BACKENDS}, got {name!r}")
    key = (name, threads)
    if key in _cache:
        return _cache[key]
    if name == "reference" or (name == "auto" and os.environ.get("FFTRAINER_FORCE_REFERENCE") == "1"):
        backend = _REFERENCE
    elif name == "native":
        try:
            backend = _native(threads)
        except ImportError as exc:
            raise ImportError("fast_failover.snapshot_backend='native' but fftrainer_ds._C is not built "
                              "(pip install --no-build-isolation -e .)") from exc
    elif name == "triton":
        try:
            backend = _triton()
        except ImportError as exc:
            raise ImportError("fast_failover.snapshot_backend='triton' but triton is not importable") from exc
    else:
        try:
            backend = _native(threads)
        except ImportError as exc:
            logger.warning("fftrainer_ds: native module unavailable (%s); using the pure-torch reference", exc)
            backend = _REFERENCE
    logger.info("fftrainer_ds: snapshot pack backend = %s", backend.name)
    _cache[key] = backend
    return backend


def pack(dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int],
         backend: Optional[str] = None) -> List[int]:
    """Gather srcs into dst at byte offsets; return FF31 checksums (docs/FORMAT.md)."""
    return get_backend(backend or "auto").pack(dst, srcs, offsets)


def checksum(data: torch.Tensor, backend: Optional[str] = None) -> int:
    """FF31 checksum of a contiguous uint8 tensor."""
    return get_backend(backend or "auto").checksum(data)
