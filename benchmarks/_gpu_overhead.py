"""GPU step overhead of per-step snapshots, through `fftrainer_ds.initialize` and the wired runtime.

A 735M-parameter GPT (12 layers, d=2048, vocab 32000, seq 1024, micro-batch 8), bf16, ZeRO-2 or
ZeRO-3, one GPU, built by `fftrainer_ds.initialize` with a "fast_failover" section; the loop is the
documented user loop (`engine(batch)`, `engine.backward`, `engine.step`). The runtime picks the CUDA
stream packer because the shard is on the GPU and runs the engine's hooks inside no_device_sync:
nothing here drives a packer by hand. Two states per stage:
- shard16:    snapshot_interval_steps 1, each snapshot trimmed to the first 1/16 of every large
              captured tensor (0.55 GB: what one rank of a 16-way ZeRO job holds). The trimming is
              the benchmark's only intervention: a wrapper of ds/state.capture (the bytes a
              16-rank shard would pack, on one GPU); such snapshots are never restored.
- whole-auto: the whole state of the rank (8.8 GB), snapshot_interval_steps "auto" (1 % budget):
              the interval the policy settles on is the RPO, printed.
Each state: warm-up, then `--pairs` (>= 3) pairs of blocks with snapshots paused / on, in
alternating order; a block is one untimed lead-in step, then `--block` timed steps (host clock from
a compute-stream sync to a compute-stream sync, so each timed step overlaps exactly the pack of the
step before it). Overhead = median over pairs of (on / off - 1). Device-wide synchronizes inside
the timed steps are counted (expected: 0).

    python benchmarks/_gpu_overhead.py --stage 2 [--states shard16 whole-auto] [--pairs 3] [--out DIR]
    python benchmarks/_gpu_overhead.py --dry-run      # the plan and configs, no GPU needed
Results: one JSON line per state appended to $OUT/gpu_overhead.jsonl, and $OUT/gpu_overhead.md.
`python benchmarks/snapshot_overhead.py --device cuda` runs `run_gpu` (both states, its --stage).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODEL = dict(vocab=32000, d=2048, layers=12, heads=16, seq=1024, dropout=0.0)
MICRO_BATCH = 8
BUDGET_PCT = 1.0
TRIM_MIN_ELEMS = 1 << 20  # tensors this large are trimmed in shard16 (partitions, moments)


@dataclass(frozen=True)
class State:
    name: str
    fraction: float                      # of each large captured tensor that is packed
    interval: Union[int, str]            # snapshot_interval_steps
    warmup_steps: int


STATES = {"shard16": State("shard16", 1 / 16, 1, 6), "whole-auto": State("whole-auto", 1.0, "auto", 14)}


def ff_section(state: State) -> Dict:
    return {"snapshot_interval_steps": state.interval, "snapshot_overhead_budget_pct": BUDGET_PCT,
            "replication_factor": 0, "max_snapshot_buffers": 2}


def ds_cfg(stage: int, state: State) -> Dict:
    from fftrainer_ds.testing.models import ds_config

    cfg = ds_config(stage, "bf16", micro_batch=MICRO_BATCH, fast_failover=ff_section(state))
    cfg["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True})
    cfg["steps_per_print"] = 1 << 30
    return cfg


def trim_captures(fraction: float) -> None:
    """shard16: every capture packs the first `fraction` of each large tensor (see the module doc)."""
    from fftrainer_ds.ds import state as ds_state

    original = getattr(ds_state.capture, "__wrapped__", ds_state.capture)
    if fraction >= 1.0:
        ds_state.capture = original
        return

    def capture(*args, **kwargs):
        cap = original(*args, **kwargs)
        cap.tensors = [t.reshape(-1)[:max(1, int(t.numel() * fraction))] if t.numel() >= TRIM_MIN_ELEMS else t
                       for t in cap.tensors]
        return cap

    capture.__wrapped__ = original
    ds_state.capture = capture


def setup_process() -> None:
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    torch.cuda.set_device(0)


def build_engine(stage: int, state: State):
    import torch

    import fftrainer_ds
    from fftrainer_ds.testing.models import TinyGPT

    trim_captures(state.fraction)
    torch.manual_seed(0)
    model = TinyGPT(**MODEL)
    engine = fftrainer_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg(stage, state))[0]
    return engine, sum(p.numel() for p in model.parameters())


class DeviceSyncs:
    """Counts torch.cuda.synchronize calls (DeepSpeed's accelerator calls it by name) while active."""

    def __init__(self):
        import torch

        self.torch, self.count, self.active = torch, 0, False
        self._orig = torch.cuda.synchronize

        def counting(*args, **kwargs):
            self.count += self.active
            return self._orig(*args, **kwargs)

        torch.cuda.synchronize = counting

    def close(self) -> None:
        self.torch.cuda.synchronize = self._orig


def drain(engine) -> None:
    """Everything queued, and the last pack committed: blocks start from the same place."""
    import torch

    torch.cuda.synchronize()
    ref = engine.latest_snapshot()
    if ref is not None:
        ref.release()


def one_step(engine, batch) -> None:
    loss = engine(batch)
    engine.backward(loss)
    engine.step()


def run_block(engine, batch, steps: int, paused: bool, syncs: DeviceSyncs) -> float:
    """Seconds per step of `steps` timed steps after one untimed lead-in step (module doc)."""
    import torch

    engine.snapshots_paused = paused
    drain(engine)
    one_step(engine, batch)
    stream = torch.cuda.current_stream()
    stream.synchronize()
    syncs.active = True
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step(engine, batch)
    stream.synchronize()
    dt = time.perf_counter() - t0
    syncs.active = False
    return dt / steps


def measure(engine, batch, state: State, pairs: int, block: int, syncs: DeviceSyncs) -> Dict:
    engine.snapshots_paused = True
    for _ in range(3):  # Adam state, allocator, kernels
        one_step(engine, batch)
    engine.snapshots_paused = False
    for _ in range(state.warmup_steps):  # pool slots pinned once; "auto" measures and settles
        one_step(engine, batch)
    interval = engine.snapshot_stats()["snapshot_interval_steps"]
    steps = max(block, min(int(interval), 30))  # an "auto" block holds one snapshot up to an RPO of 30 steps
    off, on = [], []
    syncs.count = 0
    taken = engine.snapshot_stats()["snapshots"]
    for i in range(pairs):
        for paused in ((True, False) if i % 2 == 0 else (False, True)):
            (off if paused else on).append(run_block(engine, batch, steps, paused, syncs))
    drain(engine)
    ratios = [b / a - 1 for a, b in zip(off, on)]
    return {"off": off, "on": on, "block_steps": steps, "overhead_pct": 100 * statistics.median(ratios),
            "snapshots_per_on_block": (engine.snapshot_stats()["snapshots"] - taken) / pairs,
            "step_ms_off": 1e3 * statistics.median(off), "step_ms_on": 1e3 * statistics.median(on),
            "device_syncs_per_timed_step": syncs.count / (2 * pairs * steps)}


def run_state(stage: int, state: State, pairs: int, block: int, out_dir: str) -> Dict:
    import torch

    engine, params = build_engine(stage, state)
    batch = torch.randint(0, MODEL["vocab"], (MICRO_BATCH, MODEL["seq"] + 1), device="cuda")
    syncs = DeviceSyncs()
    try:
        row = measure(engine, batch, state, pairs, block, syncs)
    finally:
        syncs.close()
    st = engine.snapshot_stats()
    row.update(stage=stage, state=state.name, params=params, snapshot_gb=st["bytes"] / 1e9,
               device_pack_ms=1e3 * st["pack_s"], pack_gbs=st["bytes"] / st["pack_s"] / 1e9 if st["pack_s"] else None,
               fence_wait_ms=st["fence_wait_ms"], interval_steps=st["snapshot_interval_steps"],
               rpo_steps=st["rpo_steps"], packer=st["backend"], policy=engine.ff_runtime.interval.report(),
               device=torch.cuda.get_device_name(), torch=torch.__version__, pairs=pairs)
    engine.destroy()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    write(out_dir, row)
    print(f"ZeRO-{stage} {state.name:<10} {row['snapshot_gb']:.2f} GB  off {row['step_ms_off']:.1f} ms  "
          f"on {row['step_ms_on']:.1f} ms  overhead {row['overhead_pct']:+.2f}%  RPO {row['rpo_steps']} steps  "
          f"pack {row['device_pack_ms']:.1f} ms on the device  syncs/step {row['device_syncs_per_timed_step']:.2f}  "
          f"[{row['packer']}]", flush=True)
    return row


def write(out_dir: str, row: Dict) -> None:
    """Append the row to gpu_overhead.jsonl and rewrite gpu_overhead.md from every row so far."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_overhead.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lines = [f"# GPU snapshot overhead: 735M GPT, bf16, B={MICRO_BATCH} T={MODEL['seq']}, fftrainer_ds.initialize",
             "", "| ZeRO | state | GB | step ms off | step ms on | overhead (median of pairs) | snapshots per on-block (lead-in incl.) | "
             "RPO steps | device pack ms | pack GB/s | syncs/step | packer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs = "" if r.get("pack_gbs") is None else f"{r['pack_gbs']:.1f}"
        lines.append(f"| {r['stage']} | {r['state']} | {r['snapshot_gb']:.2f} | {r['step_ms_off']:.1f} | "
                     f"{r['step_ms_on']:.1f} | {r['overhead_pct']:+.2f}% ({r['pairs']} pairs x {r['block_steps']}) | "
                     f"{r['snapshots_per_on_block']:.1f} | {r['rpo_steps']} | {r['device_pack_ms']:.1f} | {gbs} | "
                     f"{r['device_syncs_per_timed_step']:.2f} | {r['packer']} |")
    with open(os.path.join(out_dir, "gpu_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def dry_run(stages: List[int], states: List[str]) -> None:
    """What a run would do, with no GPU: the configs and the expected snapshot sizes."""
    params = 32000 * 2048 * 2 + 1024 * 2048 + 12 * (12 * 2048 * 2048 + 13 * 2048) + 2 * 2048
    for stage in stages:
        for name in states:
            st = STATES[name]
            print(f"ZeRO-{stage} {name}: ~{12 * params * st.fraction / 1e9:.2f} GB per snapshot "
                  f"({params / 1e6:.0f}M params x 12 B x {st.fraction:.4f}); fast_failover = {ff_section(st)}; "
                  f"zero_optimization = {ds_cfg(stage, st)['zero_optimization']}")


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, nargs="+", default=[2], choices=[2, 3])
    ap.add_argument("--states", nargs="+", default=list(STATES), choices=list(STATES))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--block", type=int, default=6)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if args.pairs < 3:
        ap.error("--pairs must be >= 3 (the median of at least 3 paired repeats)")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse(argv)
    if args.dry_run:
        dry_run(args.stage, args.states)
        return
    setup_process()
    from fftrainer_ds.ds import adapter as ds_adapter

    ds_adapter.skip_shm_comm_build()
    for stage in args.stage:
        for name in args.states:
            run_state(stage, STATES[name], args.pairs, args.block, args.out)


def run_gpu(args) -> None:
    """`snapshot_overhead.py --device cuda`: both states at its --stage (2 or 3), its --pairs and --block."""
    main(["--stage", str(getattr(args, "stage", 2)), "--pairs", str(max(3, getattr(args, "pairs", 3))),
          "--block", str(getattr(args, "block", 6))])


if __name__ == "__main__":
    main()
