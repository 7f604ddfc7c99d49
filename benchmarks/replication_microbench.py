"""Replication micro-benchmark: raw stream throughput, and how much it slows a compute loop.

    python benchmarks/replication_microbench.py [--mb 64] [--chunk-mb 4] [--versions 8] [--rate-mbps 200]

Two ranks on loopback, k=1 (each streams to the other). Reports per rank: MB/s of back-to-back
versions (offer -> every chunk sent), and the time of a fixed single-threaded matmul loop with
replication idle, streaming unthrottled and streaming at --rate-mbps. Numbers only: no pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Ref:
    def __init__(self, step, rank, buffer):
        self.step, self.rank, self.buffer, self.generation = step, rank, buffer, 0

    def release(self):
        pass


def _compute(iters: int) -> float:
    import torch
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    for _ in range(iters):
        a = torch.tanh(a @ a * 0.01)
    return time.perf_counter() - t0


def worker(mb: float, chunk_mb: float, versions: int, rate_mbps: float) -> dict:
    import torch
    import torch.distributed as dist
    from fftrainer_ds.config import FastFailoverConfig
    from fftrainer_ds.replication import ReplicationService
    from fftrainer_ds.testing import worker_init_process_group

    torch.set_num_threads(1)
    worker_init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = torch.randint(0, 256, (int(mb * (1 << 20)),), dtype=torch.uint8)
    out = {}
    for label, rate in (("unthrottled", None), (f"{rate_mbps:g} MB/s", rate_mbps)):
        cfg = FastFailoverConfig(replication_factor=1, chunk_mb=chunk_mb, adaptive_throttle=False,
                                 max_bandwidth_mbps=rate)
        svc = ReplicationService(cfg, rank, world, [0] * world, buf.numel(), peer_timeout_s=60)
        dist.barrier()
        if rate is None:
            t0 = time.perf_counter()
            for step in range(1, versions + 1):
                svc.offer(_Ref(step, rank, buf))
                svc.flush(600)
            out["stream_MBps"] = round(versions * buf.numel() / 1e6 / (time.perf_counter() - t0), 1)
            dist.barrier()
            out["compute_idle_s"] = round(_compute(300), 3)
            dist.barrier()
        step, t_compute = versions, None
        done = []
        # keep the stream busy while the compute loop runs
        import threading

        def feed():
            nonlocal step
            while not done:
                step += 1
                svc.offer(_Ref(step, rank, buf))
                svc.flush(600)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        t_compute = _compute(300)
        done.append(True)
        feeder.join(60)
        out[f"compute_streaming_{label}_s"] = round(t_compute, 3)
        out[f"bytes_sent_{label}"] = svc.stats()["bytes_sent"]
        dist.barrier()
        svc.close()
        dist.barrier()
    dist.destroy_process_group()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=64)
    p.add_argument("--chunk-mb", type=float, default=4)
    p.add_argument("--versions", type=int, default=8)
    p.add_argument("--rate-mbps", type=float, default=200)
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from fftrainer_ds.testing import run_ranks
    res = run_ranks("benchmarks.replication_microbench:worker", 2,
                    dict(mb=args.mb, chunk_mb=args.chunk_mb, versions=args.versions, rate_mbps=args.rate_mbps),
                    env={"PYTHONPATH": ROOT}, timeout_s=600)
    for r in res:
        print(json.dumps({"rank": r.rank, **r.value}))


if __name__ == "__main__":
    main()
