"""GPU pack paths against the pure-torch reference, byte for byte (run on the lent GPU machine).

CUDA kernels (`_C` built with CUDA) and the Triton fallback; odd sizes, unaligned sources, many
tiny segments and one large one, device and pinned destinations; CudaPacker (mapped and staged,
chunked issue, fence without host sync, result) and the verified GPU restore.
"""
import time

import pytest
import torch

from fftrainer_ds.errors import SnapshotError
from fftrainer_ds.ops import native as ops_native
from fftrainer_ds.ops import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"


def native():
    _C = ops_native.load()  # not built at all on the GPU machine: an error, not a skip
    if not _C.has_cuda():
        pytest.skip("fftrainer_ds._C was built without CUDA kernels")
    return _C


def triton_pack():
    pytest.importorskip("triton")
    from fftrainer_ds.ops import triton_pack as tp

    return tp


def odd_case(seed=0, huge=64 << 20, tiny=500):
    """CUDA sources: odd sizes at every misalignment, 1-element tensors, bf16 views, many tiny, one huge."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    srcs = []
    for i, n in enumerate([1, 2, 3, 4, 5, 15, 16, 17, 31, 33, 4095, 65535, 65536, 65537, 1000003, 0]):
        raw = torch.randint(0, 256, (n + 16,), dtype=torch.uint8, device=DEV, generator=g)
        srcs.append(raw[i % 16:i % 16 + n])
    srcs += [torch.tensor(2.5, device=DEV), torch.ones(1, dtype=torch.int8, device=DEV),
             torch.randn(4097, device=DEV, generator=g).to(torch.bfloat16)[1:],
             torch.randn(37, 3, device=DEV, generator=g)]
    srcs += [torch.randint(0, 256, (1 + i % 13,), dtype=torch.uint8, device=DEV, generator=g) for i in range(tiny)]
    if huge:
        raw = torch.randint(0, 256, (huge + 8,), dtype=torch.uint8, device=DEV, generator=g)
        srcs.append(raw[5:5 + huge + 3])
    offsets, o = [], 0
    for s in srcs:
        offsets.append(o)
        o += (s.numel() * s.element_size() + 63) // 64 * 64
    return srcs, offsets, o + 64


def reference_of(srcs, offsets, total, fill=0):
    ref = torch.full((total,), fill, dtype=torch.uint8)
    return ref, reference.pack(ref, [s.cpu() for s in srcs], offsets)


@pytest.mark.parametrize("where", ["cuda", "pinned"])
@pytest.mark.parametrize("max_blocks", [0, 7])
def test_cuda_kernel_matches_reference(where, max_blocks):
    _C = native()
    srcs, offsets, total = odd_case()
    ref, want = reference_of(srcs, offsets, total, fill=0xA5)
    dst = ref.clone().fill_(0xA5)
    dst = dst.to(DEV) if where == "cuda" else dst.pin_memory()
    sums = _C.pack_cuda(dst, srcs, offsets, None, max_blocks)
    torch.cuda.synchronize()
    assert sums.tolist() == want
    assert torch.equal(dst.cpu(), ref)
    for s in srcs[:20]:
        b = reference.as_bytes(s)
        assert int(_C.checksum_cuda(b).item()) == reference.checksum(b.cpu().clone())


def test_cuda_plan_chunk_ranges_and_windows():
    _C = native()
    srcs, offsets, total = odd_case(seed=1, huge=8 << 20, tiny=50)
    ref, want = reference_of(srcs, offsets, total)
    dst = torch.zeros(total, dtype=torch.uint8).pin_memory()
    plan = _C.CudaPackPlan(srcs, offsets)
    n = plan.num_chunks
    assert plan.chunk_begin()[-1] == n and plan.num_segments == len(srcs)
    for lo, hi in [(0, 1), (1, n // 3), (n // 3, n // 3), (n // 3, n)]:
        plan.pack(dst, lo, hi)
    sums = plan.finalize()
    torch.cuda.synchronize()
    assert sums.tolist() == want and torch.equal(dst, ref)
    # a window into a small device buffer at dst_base
    lo, hi = plan.dst_range(0, n)
    assert (lo, hi) == (0, offsets[-1] + srcs[-1].numel())
    with pytest.raises(RuntimeError, match="dst covers"):
        plan.pack(torch.empty(16, dtype=torch.uint8, device=DEV), 0, n)


def test_cuda_argument_errors_name_the_argument():
    _C = native()
    a = torch.zeros(8, device=DEV)
    with pytest.raises(RuntimeError, match=r"srcs\[1\]"):
        _C.CudaPackPlan([a, torch.zeros(8)], [0, 64])
    with pytest.raises(RuntimeError, match=r"offsets\[0\]"):
        _C.CudaPackPlan([a], [-1])
    with pytest.raises(RuntimeError, match="pinned"):
        _C.pack_cuda(torch.zeros(64, dtype=torch.uint8), [a], [0])


@pytest.mark.parametrize("where", ["cuda", "pinned", "pageable"])
def test_triton_matches_reference(where):
    tp = triton_pack()
    srcs, offsets, total = odd_case(seed=2, huge=16 << 20, tiny=100)
    ref, want = reference_of(srcs, offsets, total, fill=0x3C)
    dst = torch.full((total,), 0x3C, dtype=torch.uint8)
    dst = {"cuda": dst.to(DEV), "pinned": dst.pin_memory(), "pageable": dst}[where]
    assert tp.pack(dst, srcs, offsets) == want
    assert torch.equal(dst.cpu(), ref)
    b = reference.as_bytes(srcs[-1])
    assert tp.checksum(b) == reference.checksum(b.cpu().clone())


def test_native_and_triton_buffers_identical():
    _C = native()
    tp = triton_pack()
    srcs, offsets, total = odd_case(seed=3, huge=4 << 20, tiny=30)
    d1 = torch.zeros(total, dtype=torch.uint8, device=DEV)
    d2 = torch.zeros_like(d1)
    s1 = _C.pack_cuda(d1, srcs, offsets).tolist()
    s2 = tp.pack(d2, srcs, offsets)
    assert s1 == s2 and torch.equal(d1, d2)


def packer_cls():
    from fftrainer_ds.ops.cuda_packer import CudaPacker

    return CudaPacker


@pytest.mark.parametrize("mode, pieces", [("mapped", 1), ("mapped", 4), ("staged", 1), ("staged", 3)])
def test_cuda_packer_fence_and_result(mode, pieces):
    native()
    srcs, offsets, total = odd_case(seed=4, huge=32 << 20, tiny=200)  # views: unaligned sources stay unaligned
    ref, want = reference_of(srcs, offsets, total)
    dst = torch.zeros(total, dtype=torch.uint8).pin_memory()
    packer = packer_cls()(mode=mode, pieces=pieces, staging_bytes=4 << 20)
    assert packer.priority == 0 and not packer.busy
    packer.start(dst, srcs, offsets)  # warm-up: staging ring and pinned blocks get allocated and cached
    assert packer.result() == want and torch.equal(dst, ref)
    dst.zero_()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # keep the current stream busy: start/fence must not wait for it
    t0 = time.perf_counter()
    packer.start(dst, srcs, offsets)
    while packer.issue_next():
        pass
    packer.fence()
    host_s = time.perf_counter() - t0
    assert packer.busy
    # after the fence, the current stream may modify the sources: the snapshot must not see it
    for s in srcs:
        if s.numel():
            s.add_(1)
    sums = packer.result()
    assert not packer.busy
    assert sums == want and torch.equal(dst, ref)
    assert host_s < 0.05, f"start+fence blocked the host for {host_s:.3f} s"
    with pytest.raises(RuntimeError):
        packer.result()


def test_cuda_packer_rejects_pageable_dst_and_unreaped_start():
    native()
    packer = packer_cls()()
    src = [torch.ones(10, device=DEV)]
    with pytest.raises(ValueError, match="pinned"):
        packer.start(torch.zeros(64, dtype=torch.uint8), src, [0])
    dst = torch.zeros(64, dtype=torch.uint8).pin_memory()
    packer.start(dst, src, [0])
    with pytest.raises(RuntimeError, match="result"):
        packer.start(dst, src, [0])
    assert packer.result() == reference.pack(torch.zeros(64, dtype=torch.uint8), [src[0].cpu()], [0])


def test_unpack_to_device_verifies():
    native()
    srcs, offsets, total = odd_case(seed=5, huge=8 << 20, tiny=20)
    ref, want = reference_of(srcs, offsets, total)
    host = ref.pin_memory()
    dsts = [torch.zeros_like(s) for s in srcs]
    packer = packer_cls()()
    packer.unpack_to_device(host, dsts, offsets, want)
    for s, d in zip(srcs, dsts):
        assert torch.equal(s, d)
    host[offsets[7] + 3] ^= 0x10  # flip a bit inside segment 7
    with pytest.raises(SnapshotError, match=r"segment 7 \('seven'\)"):
        names = [f"s{i}" for i in range(len(srcs))]
        names[7] = "seven"
        packer.unpack_to_device(host, dsts, offsets, want, names=names)


def test_no_device_sync_skips_side_streams():
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    from fftrainer_ds.ds.sync import no_device_sync

    acc = get_accelerator()
    side = torch.cuda.Stream(priority=0)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s on the side stream
    t0 = time.perf_counter()
    with no_device_sync():
        acc.synchronize()
    patched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc.synchronize()
    full_s = time.perf_counter() - t0
    assert "synchronize" not in vars(acc)
    assert patched_s < 0.05 < full_s, (patched_s, full_s)
