"""GPU snapshot overhead (`python benchmarks/snapshot_overhead.py --device cuda` dispatches here).

A 735M-parameter GPT (12 layers, d=2048, vocab 32000, seq 1024, micro-batch 8), ZeRO-2 bf16 on one
GPU, built through `fftrainer_ds.initialize` (no "fast_failover" section: the benchmark drives the
snapshots itself) or plain `deepspeed.initialize`. The snapshot is a shard fraction of the rank's
fp32 master + Adam state (1/16, 1/4, 1: what one rank of a 16-, 4- or 1-way ZeRO-2 job holds;
1/16 = 0.55 GB, 1/4 = 2.2 GB), taken after every optimizer step and fenced before the next one.

Variants, each paired with plain training (no snapshot) in alternating blocks; the overhead is the
median of the per-pair ratios:
- naive:          per-tensor `copy_` to pinned memory on a side stream (DeepSpeed's device-wide
                  synchronizes wait for it: the +8.9 % case)
- naive+nosync:   the same inside `no_device_sync` (DeepSpeed's syncs wait for the current stream)
- packer-mapped:  CudaPacker, kernel writing mapped pinned memory, inside `no_device_sync`
- packer-staged:  CudaPacker through a 2 x 64 MiB device ring, inside `no_device_sync`
- packer-mapped+prio: packer-mapped with training on a priority -1 stream (pack at 0, the lowest)
- nosync-only:    no snapshot, inside `no_device_sync` (what removing the syncs alone changes)
Also counts DeepSpeed's device-wide synchronizes per step with and without `no_device_sync`.
Env: FFTRAINER_GPU_PAIRS (4), FFTRAINER_GPU_BLOCK (5 steps), FFTRAINER_GPU_FRACTIONS ("16,4,1").
Results: $OUT/gpu_overhead.json and .md.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODEL = dict(vocab=32000, d=2048, layers=12, heads=16, seq=1024, dropout=0.0)
MICRO_BATCH = 8


class NaiveCopy:
    """Per-tensor copy_ into pinned memory on a side stream at the lowest priority."""

    def __init__(self):
        import torch

        self.torch = torch
        self.stream = torch.cuda.Stream(priority=0)
        self.done = None

    def start(self, dst, srcs, offsets):
        torch = self.torch
        ready = torch.cuda.Event()
        ready.record()
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            for s, off in zip(srcs, offsets):
                n = s.numel() * s.element_size()
                dst[off:off + n].copy_(s.reshape(-1).view(torch.uint8), non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record(self.stream)

    def fence(self):
        if self.done is not None:
            self.torch.cuda.current_stream().wait_event(self.done)

    def result(self):
        if self.done is not None:
            self.done.synchronize()
            self.done = None


class PackerAdapter:
    def __init__(self, **kw):
        from fftrainer_ds.ops.cuda_packer import CudaPacker

        self.p = CudaPacker(**kw)
        self.active = False

    def start(self, dst, srcs, offsets):
        self.p.start(dst, srcs, offsets)
        self.active = True

    def fence(self):
        self.p.fence()

    def result(self):
        if self.active:
            self.p.result()
            self.active = False


def build_engine():
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    from fftrainer_ds.testing.models import TinyGPT, ds_config

    torch.manual_seed(0)
    model = TinyGPT(**MODEL)
    cfg = ds_config(2, "bf16", micro_batch=MICRO_BATCH)
    cfg["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True})
    cfg["steps_per_print"] = 1 << 30
    cfg.pop("fast_failover", None)
    try:
        import fftrainer_ds
        from fftrainer_ds.ds import adapter as ds_adapter

        ds_adapter.skip_shm_comm_build()
        engine = fftrainer_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
        via = "fftrainer_ds.initialize"
    except ImportError:
        import deepspeed

        engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
        via = "deepspeed.initialize"
    params = sum(p.numel() for p in model.parameters())
    return engine, via, params


def shard_tensors(engine, fraction: float):
    """The first `fraction` of each fp32 flat partition and its Adam moments (live device tensors)."""
    zo = engine.optimizer
    out = []
    for flat in zo.single_partition_of_fp32_groups:
        st = zo.optimizer.state[flat]
        for t in (flat, st["exp_avg"], st["exp_avg_sq"]):
            t = t.detach().reshape(-1)
            out.append(t[:max(1, int(t.numel() * fraction))])
    return out


def run_gpu(args) -> Dict:
    import torch

    from fftrainer_ds.ds.sync import count_device_syncs, deepspeed_streams, no_device_sync

    out_dir = os.environ.get("OUT", ".")
    pairs = int(os.environ.get("FFTRAINER_GPU_PAIRS", "4"))
    block = int(os.environ.get("FFTRAINER_GPU_BLOCK", "5"))
    fractions = [1.0 / int(x) for x in os.environ.get("FFTRAINER_GPU_FRACTIONS", "16,4,1").split(",")]

    engine, via, params = build_engine()
    batch = torch.randint(0, MODEL["vocab"], (MICRO_BATCH, MODEL["seq"] + 1), device="cuda")
    ds_streams = deepspeed_streams(engine.optimizer)
    hi = torch.cuda.Stream(priority=-1)

    def one_step():
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

    for _ in range(3):  # warm-up; creates the Adam state
        one_step()
    torch.cuda.synchronize()

    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    with count_device_syncs(acc) as plain:
        for _ in range(3):
            one_step()
    with no_device_sync(ds_streams), count_device_syncs(acc) as patched:
        for _ in range(3):
            one_step()
    torch.cuda.synchronize()
    syncs = {"device_syncs_per_step_plain": plain[0] / 3, "patched_syncs_per_step_in_no_device_sync": patched[0] / 3}

    full = shard_tensors(engine, 1.0)
    full_bytes = sum(t.numel() * t.element_size() for t in full)
    pinned = torch.empty(full_bytes + 64 * len(full) + 64, dtype=torch.uint8, pin_memory=True)

    def run_block(snap, nosync: bool, prio: bool, srcs, offsets) -> float:
        cm_sync = no_device_sync(ds_streams) if nosync else contextlib.nullcontext()
        cm_stream = torch.cuda.stream(hi) if prio else contextlib.nullcontext()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with cm_sync, cm_stream:
            for _ in range(block):
                loss = engine(batch)
                engine.backward(loss)
                if snap is not None:
                    snap.fence()
                engine.step()
                if snap is not None:
                    snap.result()
                    snap.start(pinned, srcs, offsets)
            if snap is not None:
                snap.fence()  # the last pack counts too
            torch.cuda.current_stream().synchronize()
        dt = (time.perf_counter() - t0) / block
        if snap is not None:
            snap.result()
        return dt

    variants = {
        "naive": (NaiveCopy, False, False),
        "naive+nosync": (NaiveCopy, True, False),
        "packer-mapped": (lambda: PackerAdapter(mode="mapped"), True, False),
        "packer-staged": (lambda: PackerAdapter(mode="staged", staging_bytes=64 << 20, staging_slots=2), True, False),
        "packer-mapped+prio": (lambda: PackerAdapter(mode="mapped"), True, True),
        "nosync-only": (None, True, False),
    }
    results: List[Dict] = []
    for frac in fractions:
        srcs = shard_tensors(engine, frac)
        offsets, o = [], 0
        for s in srcs:
            offsets.append(o)
            o += (s.numel() * s.element_size() + 63) // 64 * 64
        nbytes = sum(s.numel() * s.element_size() for s in srcs)
        for name, (factory, nosync, prio) in variants.items():
            try:
                snap = factory() if factory is not None else None
            except ImportError as exc:
                results.append({"fraction": frac, "variant": name, "error": str(exc)})
                continue
            except Exception as exc:  # one variant failing must not lose the others
                results.append({"fraction": frac, "variant": name, "error": repr(exc)})
                continue
            run_block(snap, nosync, prio, srcs, offsets)  # warm-up of this variant
            off, on = [], []
            for i in range(pairs):
                order = (False, True) if i % 2 == 0 else (True, False)
                for with_snap in order:
                    if with_snap:
                        on.append(run_block(snap, nosync, prio, srcs, offsets))
                    else:
                        off.append(run_block(None, False, False, srcs, offsets))
            ratios = [b / a - 1 for a, b in zip(off, on)]
            row = {"fraction": frac, "snapshot_gb": nbytes / 1e9, "variant": name,
                   "step_ms_off": 1e3 * statistics.median(off), "step_ms_on": 1e3 * statistics.median(on),
                   "overhead_pct": 100 * statistics.median(ratios), "pairs": pairs, "block_steps": block}
            results.append(row)
            print(f"1/{round(1 / frac)} {nbytes / 1e9:.2f} GB {name:<20} off {row['step_ms_off']:.1f} ms  "
                  f"on {row['step_ms_on']:.1f} ms  overhead {row['overhead_pct']:+.2f}%", flush=True)
            write(out_dir, via, params, syncs, results)
    write(out_dir, via, params, syncs, results)
    engine.destroy()
    return {"rows": results, **syncs}


def write(out_dir: str, via: str, params: int, syncs: Dict, results: List[Dict]) -> None:
    """Results so far to $OUT (rewritten after every row, so a run cut short still reports)."""
    import torch

    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "engine_via": via,
               "params": params, "model": MODEL, "micro_batch": MICRO_BATCH, **syncs, "rows": results}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_overhead.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "gpu_overhead.md"), "w") as f:
        f.write(f"# GPU snapshot overhead: {params / 1e6:.0f}M GPT, ZeRO-2 bf16, {summary['device']}, "
                f"{via}\n\n{syncs}\n\n| shard | GB | variant | step ms (off) | step ms (on) | overhead |\n"
                "|---|---|---|---|---|---|\n")
        for r in results:
            if "error" in r:
                f.write(f"| 1/{round(1 / r['fraction'])} | | {r['variant']} | error: {r['error']} | | |\n")
            else:
                f.write(f"| 1/{round(1 / r['fraction'])} | {r['snapshot_gb']:.2f} | {r['variant']} | "
                        f"{r['step_ms_off']:.1f} | {r['step_ms_on']:.1f} | {r['overhead_pct']:+.2f}% |\n")
