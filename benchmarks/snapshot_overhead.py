"""Snapshot overhead: step time with vs without per-step snapshots, and pack bandwidth.

CPU (default): N ranks (gloo) train a small GPT with ZeRO-`--stage`; blocks of steps alternate
snapshots off/on in the same processes and the median of the paired block ratios is reported.
Then the native pack kernel (copy + checksum) is timed against plain torch copies of the same bytes.
`--device cuda` runs the GPU suite (benchmarks/_gpu_overhead.py) instead.

    python benchmarks/snapshot_overhead.py [--ranks 2] [--stage 2] [--pairs 8] [--block 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def rank_body(stage: int, pairs: int, block: int, d: int, layers: int, dtype: str, pack_threads: int):
    import torch
    import torch.distributed as dist

    import fftrainer_ds
    from fftrainer_ds.ds import adapter as ds_adapter
    from fftrainer_ds.testing import worker_init_process_group
    from fftrainer_ds.testing.models import TinyGPT, TokenDataset, ds_config

    from _common import timed_steps

    ds_adapter.skip_shm_comm_build()
    worker_init_process_group()
    torch.manual_seed(0)
    model = TinyGPT(d=d, layers=layers, seq=64, dropout=0.1)
    # Snapshots only (replication has its own benchmark); pack threads share the cores with compute here.
    cfg = ds_config(stage, dtype, micro_batch=4, fast_failover={"replication_factor": 0, "pack_threads": pack_threads})
    engine, _, loader, _ = fftrainer_ds.initialize(model=model, model_parameters=model.parameters(),
                                                   training_data=TokenDataset(n=8192, seq=64), config=cfg)
    it = iter(loader)

    def run_block(paused: bool) -> float:
        engine.snapshots_paused = paused
        return statistics.median(timed_steps(engine, it, block))

    run_block(False), run_block(True)  # warm-up
    off, on = [], []
    for i in range(pairs):
        order = (True, False) if i % 2 == 0 else (False, True)  # alternate which goes first
        for paused in order:
            (off if paused else on).append(run_block(paused))
    stats = engine.snapshot_stats()
    params = sum(p.numel() for p in model.parameters())
    engine.destroy()
    dist.destroy_process_group()
    return {"off": off, "on": on, "stats": stats, "params": params}


def pack_bandwidth(total_mb: int = 256, threads: int = 0):
    """GB/s of native pack (copy+FF31) vs torch copy_ of the same segments into one buffer."""
    import torch

    from fftrainer_ds import ops

    torch.manual_seed(0)
    sizes = [64 << 20, 32 << 20, 16 << 20] + [1 << 20] * 16 + [4096] * 64
    scale = total_mb * (1 << 20) / sum(sizes)
    srcs = [torch.randn(max(1, int(s * scale) // 4)) for s in sizes]
    nbytes = sum(s.numel() * 4 for s in srcs)
    offs, o = [], 0
    for s in srcs:
        offs.append(o)
        o += (s.numel() * 4 + 63) // 64 * 64
    dst = torch.zeros(o, dtype=torch.uint8)
    native = ops.get_backend("native", threads)

    def t_native():
        native.pack(dst, srcs, offs)

    def t_copy():
        for s, off in zip(srcs, offs):
            dst[off:off + s.numel() * 4].copy_(s.view(torch.uint8))

    out = {}
    for name, fn in (("native pack+checksum", t_native), ("torch copy_ only", t_copy)):
        fn()
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = nbytes / statistics.median(ts) / 1e9
    return out, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pack-threads", type=int, default=1)
    args = ap.parse_args()
    if args.device == "cuda":
        from _gpu_overhead import run_gpu

        run_gpu(args)
        return

    from _common import paired_overhead, table

    from fftrainer_ds.testing import run_ranks

    res = run_ranks("snapshot_overhead:rank_body", args.ranks,
                    dict(stage=args.stage, pairs=args.pairs, block=args.block, d=args.d, layers=args.layers,
                         dtype=args.dtype, pack_threads=args.pack_threads),
                    timeout_s=1800, env={"PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)])})
    r0 = res[0].value
    ov = paired_overhead(r0["off"], r0["on"])
    st = r0["stats"]
    bw, nbytes = pack_bandwidth()
    print(f"# snapshot_overhead (CPU, {args.ranks} ranks, ZeRO-{args.stage}, {args.dtype}, pack threads "
          f"{args.pack_threads}, "
          f"{r0['params'] / 1e6:.2f}M params, {args.pairs} pairs x {args.block} steps)")
    print(table([[f"{ov['off_s'] * 1e3:.1f}", f"{ov['on_s'] * 1e3:.1f}", f"{ov['overhead_pct']:+.2f}%",
                  f"{st['bytes'] / 1e6:.1f}", f"{st['pack_s'] * 1e3:.2f}", st["backend"]]],
                ["step ms (off)", "step ms (on)", "overhead", "snapshot MB/rank", "pack ms", "backend"]))
    print()
    print(f"# pack bandwidth, {nbytes / 1e6:.0f} MB in 83 segments, same process")
    print(table([[k, f"{v:.2f}"] for k, v in bw.items()] +
                [["ratio native/copy_", f"{bw['native pack+checksum'] / bw['torch copy_ only']:.2f}"]],
                ["kernel", "GB/s"]))


if __name__ == "__main__":
    main()
