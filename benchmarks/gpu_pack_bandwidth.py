"""GPU pack bandwidth: the CUDA gather+checksum kernel vs the pinned D2H `copy_` limit.

For snapshot sizes of 0.55 GB and 2.2 GB (a few large flats plus many small tensors, some at odd
sizes and unaligned), all in the same run: pinned D2H `copy_` of one contiguous buffer (the
limit: no gather, no checksum), per-segment `copy_` (naive), the kernel (gather + FF31 + D2H)
writing into mapped pinned memory (grid caps), through a device staging ring (CudaPacker
mode="staged"), CudaPacker as configured by default, the runtime's packer (DevicePacker:
CudaPacker plus its completion thread, what `fftrainer_ds.initialize` uses on a GPU shard), the
Triton fallback, and the kernel device-to-device. Then what stream priority buys: bf16 matmuls
alone, and with a concurrent pack on a priority-0 stream while compute runs at priority 0 and -1.

    python benchmarks/gpu_pack_bandwidth.py [--out DIR] [--sizes-gb 0.55 2.2] [--reps 5]
Writes DIR/gpu_pack_bandwidth.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402


def make_segments(total_bytes: int, seed: int = 0):
    """fp32 flats (70 %), bf16 mid-size tensors, and 300 tiny/odd ones (some unaligned views)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    big = int(total_bytes * 0.7)
    srcs = [torch.randn(big // 3 // 4, device="cuda", generator=g) for _ in range(3)]
    mid_total = total_bytes - big - 300 * 2048
    srcs += [torch.randn(mid_total // 64 // 2, device="cuda", generator=g).to(torch.bfloat16) for _ in range(64)]
    raw = torch.randint(0, 256, (300 * 4096,), dtype=torch.uint8, device="cuda", generator=g)
    srcs += [raw[i * 4096 + i % 16: i * 4096 + i % 16 + 1 + (i * 37) % 4000] for i in range(300)]
    offsets, o = [], 0
    for s in srcs:
        offsets.append(o)
        o += (s.numel() * s.element_size() + 63) // 64 * 64
    nbytes = sum(s.numel() * s.element_size() for s in srcs)
    return srcs, offsets, o, nbytes


def timed(fn, reps: int, sync=torch.cuda.synchronize) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bandwidth(total_gb: float, reps: int):
    from fftrainer_ds.ops.cuda_packer import CudaPacker

    srcs, offsets, total, nbytes = make_segments(int(total_gb * 1e9))
    dst = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev_dst = torch.empty(total, dtype=torch.uint8, device="cuda")
    rows = {}

    def d2h_contiguous():
        dst[:nbytes].copy_(flat, non_blocking=True)

    def naive():
        for s, off in zip(srcs, offsets):
            n = s.numel() * s.element_size()
            dst[off:off + n].copy_(s.reshape(-1).view(torch.uint8), non_blocking=True)

    rows["pinned D2H copy_ (one buffer) = limit"] = timed(d2h_contiguous, reps)
    rows["per-segment copy_ D2H (no checksum)"] = timed(naive, reps)
    from fftrainer_ds.ops import native

    _C = native.load_cuda()  # None: _C not built, or built without the CUDA kernels
    if _C is not None:
        for cap in (0, 264, 132, 66, 32, 16):
            rows[f"kernel -> mapped pinned, max_blocks={cap}"] = timed(
                lambda cap=cap: _C.pack_cuda(dst, srcs, offsets, None, cap), reps)
        rows["kernel -> device (HBM, no PCIe)"] = timed(lambda: _C.pack_cuda(dev_dst, srcs, offsets), reps)
        for slot_mb, slots in ((64, 2), (16, 4), (128, 2)):
            packer = CudaPacker(mode="staged", staging_bytes=slot_mb << 20, staging_slots=slots)

            def staged(packer=packer):
                packer.start(dst, srcs, offsets)
                packer.result()

            rows[f"kernel -> staging ring {slots}x{slot_mb} MiB -> D2H"] = timed(staged, reps)
        mapped = CudaPacker(mode="mapped")

        def packer_mapped():
            mapped.start(dst, srcs, offsets)
            mapped.result()

        rows["CudaPacker mapped (plan + kernel + checksums)"] = timed(packer_mapped, reps)
        rows["DevicePacker (the runtime's packer, completion thread)"] = timed(runtime_packer(dst, srcs, offsets), reps)
    try:
        from fftrainer_ds.ops import triton_pack

        rows["Triton -> mapped pinned"] = timed(lambda: triton_pack.pack_async(dst, srcs, offsets), reps)
    except ImportError as exc:
        rows["Triton (unavailable)"] = float("nan")
        print(f"triton unavailable: {exc}")
    limit = rows["pinned D2H copy_ (one buffer) = limit"]
    out = []
    for name, t in rows.items():
        gbs = nbytes / t / 1e9 if t == t else float("nan")
        out.append({"variant": name, "ms": t * 1e3, "GB/s": gbs, "pct_of_d2h": 100 * limit / t if t == t else None})
    return {"snapshot_gb": nbytes / 1e9, "segments": len(srcs), "rows": out}


def runtime_packer(dst, srcs, offsets):
    """One pack through the packer the runtime builds for a CUDA shard: start, fence, wait for the commit."""
    from fftrainer_ds import ops
    from fftrainer_ds.snapshot.device_packer import DevicePacker

    packer = DevicePacker(str(srcs[0].device), "native", ops.get_backend("auto"))

    def run():
        packer.start(dst, srcs, offsets, lambda sums: None)
        packer.fence()
        packer.wait()

    return run


def priority_effect(pack_mb: int = 288, reps: int = 5):
    """bf16 matmul time alone vs with a concurrent pack; compute stream at priority 0 and -1."""
    from fftrainer_ds.ops.cuda_packer import CudaPacker

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    srcs = [torch.randn(pack_mb * (1 << 20) // 4, device="cuda")]
    dst = torch.empty(pack_mb << 20, dtype=torch.uint8, pin_memory=True)
    res = {}
    for prio in (0, -1):
        compute = torch.cuda.Stream(priority=prio)
        packer = CudaPacker(mode="mapped")

        def mm():
            with torch.cuda.stream(compute):
                for _ in range(20):
                    a @ b

        def mm_with_pack():
            with torch.cuda.stream(compute):
                packer.start(dst, srcs, [0])
                for _ in range(20):
                    a @ b
            compute.synchronize()
            packer.result()

        sync = compute.synchronize
        alone = timed(mm, reps, sync)
        both = timed(mm_with_pack, reps, sync)
        res[f"compute priority {prio}"] = {"matmuls_ms": alone * 1e3, "with_pack_ms": both * 1e3,
                                           "slowdown_pct": 100 * (both / alone - 1)}
    lo, hi = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (None, None)
    res["priority_range"] = [lo, hi]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[0.55, 2.2])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sizes": []}
    for gb in args.sizes_gb:
        r = bandwidth(gb, args.reps)
        result["sizes"].append(r)
        print(f"\n# pack bandwidth, {r['snapshot_gb']:.2f} GB in {r['segments']} segments ({result['device']})")
        print(f"| {'variant':<52} | {'ms':>8} | {'GB/s':>7} | {'% of D2H':>8} |")
        for row in r["rows"]:
            pct = "" if row["pct_of_d2h"] is None else f"{row['pct_of_d2h']:.1f}"
            print(f"| {row['variant']:<52} | {row['ms']:8.2f} | {row['GB/s']:7.2f} | {pct:>8} |")
        torch.cuda.empty_cache()
    result["priority"] = priority_effect()
    print("\n# stream priority: bf16 matmuls with a concurrent 288 MiB pack on a priority-0 stream")
    for k, v in result["priority"].items():
        print(f"{k}: {v}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_pack_bandwidth.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
