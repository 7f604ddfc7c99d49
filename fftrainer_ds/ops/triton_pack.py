"""Triton fallback of the snapshot gather + FF31 checksum, for a GPU build without `_C`'s CUDA kernels.

Byte for byte the same as `reference.pack` / `reference.checksum` (docs/FORMAT.md): the tests compare
them. Importing this module raises ImportError when triton is missing (`ops.get_backend` handles it).

One launch covers every segment: the host builds a table with one row per chunk of `CHUNK_BYTES`
(source address relative to the lowest source, destination offset, length, index of the chunk's
first word in its segment); each program copies its chunk bytewise (any source alignment, any
size, the last word zero-padded) and writes its partial sums (a, b) reduced mod P (the prime
`reference.FF31_PRIME`, passed in as the constexpr PRIME); a torch `index_add_` then combines the
partials per segment on the device.

Overflow: a program sums 1024 words, so a < 2^42 and b = sum (j+1) w < 2^10 * 2^32 * 2^10 = 2^52
in int64 before the reduction mod P = 2^31 - 1; the re-basing product (first_word mod P) * a
is < 2^62; per-segment sums of reduced partials stay below 2^63 for fewer than 2^32 chunks.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .reference import FF31_PRIME, as_bytes, finish

BLOCK_WORDS = 1024
CHUNK_BYTES = 4 * BLOCK_WORDS


@triton.jit
def _gather_kernel(base_ptr, dst_ptr, table_ptr, part_ptr, STORE: tl.constexpr, BLOCK_WORDS: tl.constexpr,
                   PRIME: tl.constexpr):
    # PRIME is a constexpr argument, not a literal, so the modulus has one definition (reference.py);
    # constexpr specializes the kernel at compile time, so it still compiles to an immediate.
    pid = tl.program_id(0).to(tl.int64)
    row = table_ptr + pid * 4
    src_off = tl.load(row)          # bytes from base_ptr to the chunk's first byte (>= 0)
    dst_off = tl.load(row + 1)      # bytes from dst_ptr to where that byte goes
    nbytes = tl.load(row + 2)       # chunk length, <= 4 * BLOCK_WORDS
    first_word = tl.load(row + 3)   # index of the chunk's first word in its segment
    j = tl.arange(0, BLOCK_WORDS)
    k = tl.arange(0, 4)
    boff = j[:, None] * 4 + k[None, :]
    mask = boff < nbytes
    byt = tl.load(base_ptr + src_off + boff, mask=mask, other=0)
    if STORE:
        tl.store(dst_ptr + dst_off + boff, byt, mask=mask)
    # Little-endian words; the four shifted bytes have disjoint bits, so their sum is the word.
    w = tl.sum(byt.to(tl.int64) << (k[None, :] * 8).to(tl.int64), axis=1)
    a = tl.sum(w, axis=0)
    b = tl.sum((j + 1).to(tl.int64) * w, axis=0)
    a = a % PRIME
    b = (b % PRIME + (first_word % PRIME) * a) % PRIME
    tl.store(part_ptr + pid * 2, a)
    tl.store(part_ptr + pid * 2 + 1, b)


def _to(device: torch.device, values) -> torch.Tensor:
    """A small int64 host table on `device` without a host sync (pinned, non-blocking upload)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _launch(dst, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> torch.Tensor:
    """Gather byte views `srcs` into dst (None: checksum only); int64 checksums on the device, async."""
    device = srcs[0].device
    sizes = [s.numel() for s in srcs]
    counts = [(n + CHUNK_BYTES - 1) // CHUNK_BYTES for n in sizes]
    total = sum(counts)
    nbytes_dev = _to(device, sizes)
    if total == 0:
        zero = torch.zeros(len(srcs), dtype=torch.int64, device=device)
        return finish(zero, zero, nbytes_dev)
    live = [s for s in srcs if s.numel()]
    base = min(live, key=lambda s: s.data_ptr())
    base_addr = base.data_ptr()
    seg = _to(device, [[s.data_ptr() - base_addr if s.numel() else 0, off, n]
                       for s, off, n in zip(srcs, offsets, sizes)])
    counts_dev = _to(device, counts)
    starts = torch.cumsum(counts_dev, 0) - counts_dev
    seg_of = torch.repeat_interleave(torch.arange(len(srcs), device=device), counts_dev, output_size=total)
    local = (torch.arange(total, dtype=torch.int64, device=device) - starts[seg_of]) * CHUNK_BYTES
    table = torch.stack([seg[seg_of, 0] + local, seg[seg_of, 1] + local,
                         torch.clamp(seg[seg_of, 2] - local, max=CHUNK_BYTES), local // 4], dim=1).contiguous()
    parts = torch.empty((total, 2), dtype=torch.int64, device=device)
    _gather_kernel[(total,)](base, base if dst is None else dst, table, parts,
                             STORE=dst is not None, BLOCK_WORDS=BLOCK_WORDS, PRIME=FF31_PRIME)
    sums = torch.zeros((len(srcs), 2), dtype=torch.int64, device=device).index_add_(0, seg_of, parts) % FF31_PRIME
    return finish(sums[:, 0], sums[:, 1], nbytes_dev)


def _check(dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> List[torch.Tensor]:
    if dst.dtype != torch.uint8 or dst.dim() != 1 or not dst.is_contiguous():
        raise ValueError("pack: dst must be a contiguous 1-D uint8 tensor")
    if len(srcs) != len(offsets):
        raise ValueError("pack: srcs and offsets differ in length")
    views = []
    for i, (src, off) in enumerate(zip(srcs, offsets)):
        b = as_bytes(src)
        if off < 0 or off + b.numel() > dst.numel():
            raise ValueError(f"pack: segment at offset {off} of {b.numel()} bytes exceeds dst ({dst.numel()} bytes)")
        if b.device != srcs[0].device:
            raise ValueError(f"pack: srcs[{i}] is on {b.device} but srcs[0] is on {srcs[0].device}")
        views.append(b)
    return views


def pack_async(dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> torch.Tensor:
    """Launch the gather on the current stream; returns the int64 checksums on the sources' device.

    dst may be on the sources' device or pinned CPU memory (written directly, mapped); for pageable
    CPU memory use `pack`, which stages through the device.
    """
    views = _check(dst, srcs, offsets)
    if not views:
        return torch.zeros(0, dtype=torch.int64)
    if dst.device != views[0].device and not (dst.device.type == "cpu" and dst.is_pinned()):
        raise ValueError(f"pack_async: dst on {dst.device} must be on {views[0].device} or pinned CPU memory")
    return _launch(dst, views, [int(o) for o in offsets])


def pack(dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> List[int]:
    """Copy each source's bytes to dst[offset:] and return their FF31 checksums (synchronizes)."""
    views = _check(dst, srcs, offsets)
    if not views:
        return []
    device = views[0].device
    if dst.device == device or (dst.device.type == "cpu" and dst.is_pinned()):
        return _launch(dst, views, [int(o) for o in offsets]).tolist()
    # Pageable host memory: pack into a device copy of dst (so bytes between segments keep their
    # values, as with the reference) and copy it back.
    tmp = dst.to(device)
    sums = _launch(tmp, views, [int(o) for o in offsets]).tolist()
    dst.copy_(tmp)
    return sums


def checksum_async(data: torch.Tensor) -> torch.Tensor:
    """FF31 checksum of a contiguous tensor on a Triton device, as a 1-element int64 tensor (async)."""
    return _launch(None, [as_bytes(data)], [0])


def checksum_many_async(datas: Sequence[torch.Tensor]) -> torch.Tensor:
    """FF31 checksums of several contiguous tensors on one device, one launch (async, int64)."""
    return _launch(None, [as_bytes(d) for d in datas], [0] * len(datas))


def checksum(data: torch.Tensor) -> int:
    """FF31 checksum of a contiguous tensor's bytes (a CPU tensor is checksummed on the current GPU)."""
    b = as_bytes(data)
    if b.device.type == "cpu" and torch.cuda.is_available():
        b = b.to("cuda")
    return int(_launch(None, [b], [0]).item())
