"""Pure-torch reference of the pack+checksum op (docs/FORMAT.md, checksum "FF31").

Slow but exact: every native backend (C++, CUDA, Triton) must produce byte-identical buffers
and identical checksums; the tests compare them.
"""
from __future__ import annotations

from typing import List, Sequence, TypeVar

import torch

FF31_PRIME = (1 << 31) - 1
"""The modulus of FF31's two running sums (docs/FORMAT.md)."""
_CHUNK_WORDS = 1 << 20  # bounds the int64 temporaries to 8 MiB per chunk


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (0-dim and empty tensors included)."""
    t = t.detach()
    if not t.is_contiguous():
        raise ValueError("as_bytes: tensor must be contiguous")
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.reshape(-1).view(torch.uint8)


def checksum_parts(data: torch.Tensor, first_word: int = 0) -> tuple[int, int]:
    """Partial sums (a, b) of FF31 over a uint8 tensor whose first word has index first_word."""
    data = data.reshape(-1).cpu()
    if data.storage_offset() % 4:
        data = data.clone()  # an int32 view needs 4-byte aligned storage
    nbytes = data.numel()
    pad = (-nbytes) % 4
    if pad:
        data = torch.cat([data, torch.zeros(pad, dtype=torch.uint8)])
    words = data.view(torch.int32)
    a = b = 0
    for start in range(0, words.numel(), _CHUNK_WORDS):
        w = words[start:start + _CHUNK_WORDS].to(torch.int64) & 0xFFFFFFFF
        w = w % FF31_PRIME
        idx = torch.arange(first_word + start + 1, first_word + start + 1 + w.numel(), dtype=torch.int64) % FF31_PRIME
        a = (a + int(w.sum())) % FF31_PRIME
        b = (b + int(((idx * w) % FF31_PRIME).sum())) % FF31_PRIME
    return a, b


Sum = TypeVar("Sum", int, torch.Tensor)


def finish(a: Sum, b: Sum, nbytes: Sum) -> Sum:
    """The FF31 checksum from partial sums (a, b) reduced mod FF31_PRIME and the data's length.

    Python ints or int64 tensors (elementwise, on any device): the Triton path finishes a whole
    batch of segments on the GPU without a host round trip.
    """
    a = (1 + a) % FF31_PRIME
    b = (nbytes % FF31_PRIME + b) % FF31_PRIME
    return (b << 32) | a


def checksum(data: torch.Tensor) -> int:
    """FF31 checksum of a uint8 tensor (see docs/FORMAT.md)."""
    a, b = checksum_parts(data)
    return finish(a, b, data.numel())


def pack(dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> List[int]:
    """Copy each source's bytes to dst[offset:] and return their checksums (reference path)."""
    if dst.dtype != torch.uint8 or dst.dim() != 1:
        raise ValueError("pack: dst must be a 1-D uint8 tensor")
    if len(srcs) != len(offsets):
        raise ValueError("pack: srcs and offsets differ in length")
    sums = []
    for src, off in zip(srcs, offsets):
        b = as_bytes(src)
        if off < 0 or off + b.numel() > dst.numel():
            raise ValueError(f"pack: segment at offset {off} of {b.numel()} bytes exceeds dst ({dst.numel()} bytes)")
        region = dst[off:off + b.numel()]
        region.copy_(b)
        sums.append(checksum(region))
    return sums
