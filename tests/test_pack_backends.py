"""Pack backends agree with the pure-torch reference byte for byte on odd cases (CPU).

The native C++ kernel (skipped when `_C` is not built) and, where triton is installed, the Triton
kernel run by Triton's CPU interpreter; plus the chunk/window planning of the CUDA packer.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fftrainer_ds.ops import reference
from fftrainer_ds.ops.cuda_packer import plan_windows, split_even

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ODD_SIZES = [1, 2, 3, 5, 15, 16, 17, 33, 4095, 4097, (1 << 20) + 3, 0, 7]


def odd_sources(seed=0):
    """Tensors of odd byte sizes at every misalignment, plus 0-dim / 1-element / bf16 ones."""
    g = torch.Generator().manual_seed(seed)
    srcs = []
    for i, n in enumerate(ODD_SIZES):
        raw = torch.randint(0, 256, (n + 16,), dtype=torch.uint8, generator=g)
        srcs.append(raw[i % 13:i % 13 + n])
    srcs += [torch.tensor(3.25), torch.tensor([7], dtype=torch.int8),
             torch.randn(1001, generator=g).to(torch.bfloat16)[1:],  # 2-byte aligned view
             torch.randn(3, 5, generator=g)]
    offsets, o = [], 0
    for s in srcs:
        offsets.append(o)
        o += (reference.as_bytes(s).numel() + 63) // 64 * 64
    return srcs, offsets, o + 64


def native():
    from fftrainer_ds.ops import native as loader

    try:
        return loader.load()
    except ImportError as exc:
        pytest.skip(f"fftrainer_ds._C not built: {exc}")


@pytest.mark.parametrize("threads", [1, 2])
def test_native_cpu_matches_reference(threads):
    _C = native()
    srcs, offsets, total = odd_sources()
    ref = torch.full((total,), 0xA5, dtype=torch.uint8)
    dst = ref.clone()
    want = reference.pack(ref, srcs, offsets)
    got = _C.pack(dst, srcs, offsets, threads)
    assert torch.equal(dst, ref)
    assert got == want
    for s in srcs:
        b = reference.as_bytes(s)
        # clone(): reference.checksum views the bytes as int32, which needs a 4-aligned storage offset
        assert _C.checksum(b, threads) == reference.checksum(b.clone())


def test_many_tiny_segments_native():
    _C = native()
    g = torch.Generator().manual_seed(5)
    srcs = [torch.randint(0, 256, (1 + i % 9,), dtype=torch.uint8, generator=g) for i in range(2000)]
    offsets = [64 * i for i in range(len(srcs))]
    ref = torch.zeros(64 * len(srcs), dtype=torch.uint8)
    dst = ref.clone()
    assert _C.pack(dst, srcs, offsets, 2) == reference.pack(ref, srcs, offsets)
    assert torch.equal(dst, ref)


TRITON_SCRIPT = r"""
import torch
from fftrainer_ds.ops import reference, triton_pack
from tests.test_pack_backends import odd_sources
srcs, offsets, total = odd_sources(1)
ref = torch.full((total,), 0xA5, dtype=torch.uint8); dst = ref.clone()
want = reference.pack(ref, srcs, offsets)
got = triton_pack.pack(dst, srcs, offsets)
assert torch.equal(dst, ref), "bytes differ"
assert got == want, (got, want)
for s in srcs:
    assert triton_pack.checksum(s) == reference.checksum(reference.as_bytes(s).clone())
print("triton-interpreter-ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton not installed: `make install` puts it in (Makefile DEPS), or pip install triton")
def test_triton_interpreter_matches_reference():
    """The Triton kernel itself, run by Triton's CPU interpreter: a few seconds (13 s on 2 cores)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "triton-interpreter-ok" in proc.stdout, proc.stdout + proc.stderr


def test_split_even():
    assert split_even(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split_even(2, 5) == [(0, 1), (1, 2)]
    assert split_even(0, 4) == []


def test_plan_windows_cover_every_chunk_once_within_the_window():
    C, W = 16, 48
    sizes = [3, 0, 100, 16, 0, 47, 1]
    offsets, o = [], 0
    for n in sizes:
        offsets.append(o)
        o += (n + 63) // 64 * 64
    chunk_begin = [0]
    for n in sizes:
        chunk_begin.append(chunk_begin[-1] + (n + C - 1) // C)
    windows = plan_windows(chunk_begin, sizes, offsets, C, W)
    assert windows[0][0] == 0 and windows[-1][1] == chunk_begin[-1]
    for (a0, a1, lo, hi), nxt in zip(windows, windows[1:] + [None]):
        assert a0 < a1 and 0 < hi - lo <= W
        if nxt:
            assert nxt[0] == a1 and nxt[2] >= hi
    # every segment byte lies in the window of its chunk
    for s, (n, off) in enumerate(zip(sizes, offsets)):
        for c in range(chunk_begin[s], chunk_begin[s + 1]):
            first = off + (c - chunk_begin[s]) * C
            last = min(first + C, off + n)
            (w,) = [w for w in windows if w[0] <= c < w[1]]
            assert w[2] <= first and last <= w[3]
    with pytest.raises(ValueError):
        plan_windows(chunk_begin, sizes, offsets, C, C - 1)
