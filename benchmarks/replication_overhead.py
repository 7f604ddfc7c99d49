"""Replication overhead on CPU: training throughput with shadow replicas flowing vs held, same processes.

4 ranks (gloo) train a small GPT with ZeRO-2 and per-step snapshots (in both arms); blocks of steps
alternate replication held (`ReplicationService.set_paused(True)`) and flowing, and the median of the
paired block ratios is the overhead. Also reports the replica lag in steps and the achieved rate.

    python benchmarks/replication_overhead.py [--ranks 4] [--k 1] [--pairs 8] [--block 6]
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


def rank_body(stage, k, pairs, block, d, layers, adaptive):
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
    cfg = ds_config(stage, micro_batch=4, fast_failover={"replication_factor": k, "adaptive_throttle": adaptive})
    engine, _, loader, _ = fftrainer_ds.initialize(model=model, model_parameters=model.parameters(),
                                                   training_data=TokenDataset(n=8192, seq=64), config=cfg)
    svc = engine.ff_runtime.replication
    it = iter(loader)
    lags = []

    def run_block(held: bool):
        svc.set_paused(held)
        sent0, t0 = svc.stats()["bytes_sent"], time.perf_counter()
        times = timed_steps(engine, it, block, after=None if held else lambda: lags.append(svc.stats()["lag_steps"]))
        rate = (svc.stats()["bytes_sent"] - sent0) / (time.perf_counter() - t0)
        return statistics.median(times), rate

    for _ in range(2):  # warm-up, and the adaptive throttle's baseline
        run_block(False)
    off, on, rates = [], [], []
    for i in range(pairs):
        for held in ((True, False) if i % 2 == 0 else (False, True)):
            med, rate = run_block(held)
            if held:
                off.append(med)
            else:
                on.append(med)
                rates.append(rate)
    svc.set_paused(False)
    stats = svc.stats()
    out = {"off": off, "on": on, "rate_MBps": statistics.median(rates) / 1e6, "lag_max": max(lags),
           "lag_median": statistics.median(lags), "snapshot_bytes": engine.ff_runtime.snapshotter.last_bytes,
           "versions_committed": stats["versions_committed"], "versions_dropped": stats["versions_dropped"],
           "backoffs": stats.get("backoffs", 0), "floor_limited": stats.get("floor_limited", 0),
           "fence_waits": stats.get("fence_waits", 0), "fence_wait_ms": stats.get("fence_wait_ms", 0.0),
           "steps": engine.global_steps}
    engine.destroy()
    dist.destroy_process_group()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--block", type=int, default=6)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--no-adaptive", action="store_true")
    args = ap.parse_args()

    from _common import paired_overhead, table

    from fftrainer_ds.testing import run_ranks

    res = run_ranks("replication_overhead:rank_body", args.ranks,
                    dict(stage=args.stage, k=args.k, pairs=args.pairs, block=args.block, d=args.d,
                         layers=args.layers, adaptive=not args.no_adaptive),
                    timeout_s=1800, env={"PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)])})
    v = [r.value for r in res]
    ov = paired_overhead(v[0]["off"], v[0]["on"])
    print(f"# replication_overhead (CPU, {args.ranks} ranks, ZeRO-{args.stage}, k={args.k}, adaptive throttle "
          f"{'off' if args.no_adaptive else 'on'}, {args.pairs} pairs x {args.block} steps)")
    print(table([[f"{ov['off_s'] * 1e3:.1f}", f"{ov['on_s'] * 1e3:.1f}", f"{ov['overhead_pct']:+.2f}%",
                  f"{v[0]['snapshot_bytes'] / 1e6:.1f}", f"{statistics.median(x['rate_MBps'] for x in v):.1f}",
                  max(x["lag_max"] for x in v), sum(x["versions_committed"] for x in v),
                  sum(x["versions_dropped"] for x in v), sum(x["backoffs"] for x in v),
                  sum(x["floor_limited"] for x in v),
                  f"{sum(x['fence_waits'] for x in v)}/{sum(x['steps'] for x in v)}, "
                  f"{sum(x['fence_wait_ms'] for x in v) / max(1, sum(x['fence_waits'] for x in v)):.1f} ms"]],
                ["step ms (held)", "step ms (flowing)", "overhead", "snapshot MB/rank", "rate MB/s/rank",
                 "max lag (steps)", "versions committed", "dropped", "back-offs", "held at the 1-step-lag floor",
                 "steps that waited at the fence, mean wait"]))


if __name__ == "__main__":
    main()
