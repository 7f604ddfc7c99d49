"""CI's check of the CUDA kernels without a GPU.

1. csrc/pack_kernels.cu compiles standalone for sm_90 (`nvcc -std=c++17
   -gencode=arch=compute_90,code=sm_90 -c`); skipped where nvcc is absent, fails on any error.
2. The kernels' per-thread code, run on the host by `fftrainer_pack_emulate_host` (same functions,
   threads one after another), produces buffers and checksums byte-identical to the pure-torch
   reference: odd sizes, every source misalignment, chunk ranges, staging windows.
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from fftrainer_ds.ops import reference
from fftrainer_ds.ops.cuda_packer import plan_windows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "pack_kernels.cu")
CHUNK = 64 * 1024  # kCudaChunkBytes in csrc/pack_kernels.h


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")
ARCH = ["-std=c++17", "-gencode=arch=compute_90,code=sm_90"]


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@needs_nvcc
def test_pack_kernels_compile_sm90(tmp_path):
    obj = tmp_path / "pack_kernels.o"
    proc = _run([NVCC, *ARCH, "-c", SRC, "-o", str(obj)])
    assert obj.stat().st_size > 0
    assert "error" not in proc.stderr.lower()


class Seg(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("dst_offset", ctypes.c_uint64), ("nbytes", ctypes.c_uint64)]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    d = tmp_path_factory.mktemp("ffpack")
    obj, lib = d / "pack_kernels.o", d / "libffpack.so"
    _run([NVCC, *ARCH, "-Xcompiler", "-fPIC", "-c", SRC, "-o", str(obj)])
    _run([NVCC, "-shared", str(obj), "-o", str(lib)])
    fn = ctypes.CDLL(str(lib)).fftrainer_pack_emulate_host
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64,
                   ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p]
    return fn


def make_sources(sizes, shifts, seed=0):
    """uint8 sources whose addresses are 16k + shift (shift in 0..15), random bytes."""
    g = torch.Generator().manual_seed(seed)
    srcs = []
    for n, sh in zip(sizes, shifts):
        raw = torch.randint(0, 256, (n + 32,), dtype=torch.uint8, generator=g)
        start = (-raw.data_ptr()) % 16 + sh
        srcs.append(raw[start:start + n])
    return srcs


def layout(sizes, gap=64):
    offs, o = [], 0
    for n in sizes:
        offs.append(o)
        o += (n + gap - 1) // gap * gap if n else 0
    return offs, o


def emulate(fn, dst, srcs, offsets, ranges=None, dst_base=0):
    segs = (Seg * max(1, len(srcs)))(*[Seg(s.data_ptr() if s.numel() else None, off, s.numel())
                                        for s, off in zip(srcs, offsets)])
    total = sum((s.numel() + CHUNK - 1) // CHUNK for s in srcs)
    parts = torch.zeros(max(1, total) * 2, dtype=torch.int32)
    out = (ctypes.c_uint64 * max(1, len(srcs)))()
    ranges = ranges or [(0, total)]
    for i, (lo, hi) in enumerate(ranges):
        got = fn(dst.data_ptr(), dst_base, segs, len(srcs), lo, hi, parts.data_ptr(),
                 out if i == len(ranges) - 1 else None)
        assert got == total or not srcs
    return list(out)[:len(srcs)]


def check_against_reference(fn, sizes, shifts, seed=0, ranges=None):
    srcs = make_sources(sizes, shifts, seed)
    offsets, end = layout(sizes)
    ref = torch.full((end + 64,), 0xA5, dtype=torch.uint8)  # bytes between segments must stay untouched
    dst = ref.clone()
    want = reference.pack(ref, srcs, offsets)
    got = emulate(fn, dst, srcs, offsets, ranges)
    assert torch.equal(dst, ref), "packed bytes differ from the reference"
    assert got == want


ODD = [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 4095, 65535, 65536, 65537, 3 * 65536 + 13]


def test_odd_sizes_every_alignment(emulator):
    for shift in range(16):
        check_against_reference(emulator, ODD, [shift] * len(ODD), seed=shift)


def test_mixed_alignments_and_empty_segments(emulator):
    sizes = [0, 9, 0, 0, 100, 0, 70000, 1, 0]
    check_against_reference(emulator, sizes, [3, 5, 0, 1, 15, 2, 7, 11, 4])


def test_many_tiny_segments_and_one_huge(emulator):
    sizes = [1 + (i * 7) % 23 for i in range(3000)] + [5 * 1024 * 1024 + 3]
    shifts = [(i * 5) % 16 for i in range(len(sizes))]
    check_against_reference(emulator, sizes, shifts, seed=1)


def test_chunk_ranges_in_several_launches(emulator):
    sizes = [65536 * 2 + 5, 3, 65536 * 4, 77]
    total = sum((n + CHUNK - 1) // CHUNK for n in sizes)
    assert total == 9
    check_against_reference(emulator, sizes, [1, 0, 4, 9], ranges=[(0, 1), (1, 4), (4, 4), (4, 8), (8, total)])


def test_staging_windows_with_dst_base(emulator):
    """The staged mode of CudaPacker: windows of chunks packed into a small buffer at dst_base."""
    sizes = [5, 65536 * 3 + 17, 0, 40, 65536 * 2, 1, 200001]
    shifts = [1, 2, 0, 3, 0, 7, 13]
    srcs = make_sources(sizes, shifts, seed=3)
    offsets, end = layout(sizes)
    ref = torch.zeros(end + 64, dtype=torch.uint8)
    want = reference.pack(ref, srcs, offsets)
    chunk_begin = [0]
    for n in sizes:
        chunk_begin.append(chunk_begin[-1] + (n + CHUNK - 1) // CHUNK)
    windows = plan_windows(chunk_begin, sizes, offsets, CHUNK, 3 * CHUNK)
    assert len(windows) > 2 and windows[0][0] == 0 and windows[-1][1] == chunk_begin[-1]
    segs = (Seg * len(srcs))(*[Seg(s.data_ptr() if s.numel() else None, off, s.numel())
                                for s, off in zip(srcs, offsets)])
    parts = torch.zeros(chunk_begin[-1] * 2, dtype=torch.int32)
    out = (ctypes.c_uint64 * len(srcs))()
    dst = torch.zeros_like(ref)
    slot = torch.empty(3 * CHUNK, dtype=torch.uint8)
    for i, (c0, c1, lo, hi) in enumerate(windows):
        assert hi - lo <= slot.numel()
        slot.fill_(0x5A)
        slot[:hi - lo].zero_()
        emulator(slot.data_ptr(), lo, segs, len(srcs), c0, c1, parts.data_ptr(),
                 out if i == len(windows) - 1 else None)
        assert torch.all(slot[hi - lo:] == 0x5A), "a window wrote past its span"
        dst[lo:hi].copy_(slot[:hi - lo])
    assert torch.equal(dst, ref)
    assert list(out) == want
