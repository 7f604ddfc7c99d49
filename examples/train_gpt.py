"""A user's training script: nothing in it knows about failures.

    fftrainer-launch --nproc-per-node 4 --spares 1 examples/train_gpt.py --steps 40 --out /tmp/run
    deepspeed --num_gpus 1 examples/train_gpt.py --no-failover      # plain DeepSpeed still works

Each rank appends {"step", "loss"} lines to OUT/losses.rank{R}.jsonl (the loss of every completed
step, as the rank saw it) and writes OUT/final.rank{R}.json (a digest of its final weights and
optimizer shard) when done, so a run with failures can be compared bitwise with one without.
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fftrainer_ds  # noqa: E402
from fftrainer_ds.ds import adapter as ds_adapter  # noqa: E402
from fftrainer_ds.testing.chaos import FaultFile  # noqa: E402
from fftrainer_ds.testing.digest import model_digest  # noqa: E402
from fftrainer_ds.testing.models import TinyGPT, TokenDataset, ds_config  # noqa: E402


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--replication-factor", type=int, default=1)
    ap.add_argument("--persist-dir", default=None)
    ap.add_argument("--persist-interval", type=int, default=0)
    ap.add_argument("--heartbeat-timeout", type=float, default=3.0)
    ap.add_argument("--step-sleep", type=float, default=0.0, help="slow steps down (fault tests aim at a step)")
    ap.add_argument("--raise-at-step", type=int, default=-1, help="rank --raise-rank raises at this step")
    ap.add_argument("--raise-rank", type=int, default=-1)
    ap.add_argument("--fault-file", default=None, help="raise inside forward/backward/step where this file asks "
                    "(lines 'rank R step S where forward|backward|step'; fftrainer_ds.testing.chaos.FaultFile)")
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--ckpt-dir", default=None, help="baseline: DeepSpeed save_checkpoint/load_checkpoint here")
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--progress", action="store_true", help="tqdm progress bar on rank 0")
    ap.add_argument("--out", default="/tmp/fftrainer_run")
    ap.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher passes it
    return ap.parse_args()


def main():
    a = parse()
    os.makedirs(a.out, exist_ok=True)
    ds_adapter.skip_shm_comm_build()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = TinyGPT(d=a.d, layers=a.layers, dropout=0.1)
    faults = FaultFile(a.fault_file) if a.fault_file else None  # before initialize: spares wait inside it
    ff = None if a.no_failover else {
        "replication_factor": a.replication_factor,
        "heartbeat_timeout_s": a.heartbeat_timeout, "collective_timeout_s": 30.0,
        "persist_dir": a.persist_dir, "persist_interval_steps": a.persist_interval}
    engine, _, loader, _ = fftrainer_ds.initialize(model=model, model_parameters=model.parameters(),
                                                   training_data=TokenDataset(), config=ds_config(a.stage, a.dtype,
                                                                                                  fast_failover=ff))
    rank = engine.global_rank
    log = open(os.path.join(a.out, f"losses.rank{rank}.jsonl"), "a")
    bar = None
    if a.progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=a.steps, initial=engine.global_steps, desc="training", unit="step")

    if a.ckpt_dir and os.path.exists(os.path.join(a.ckpt_dir, "latest")):
        engine.load_checkpoint(a.ckpt_dir)  # what a DeepSpeed user does today after a restart
        with open(os.path.join(a.out, f"loaded.rank{rank}.json"), "w") as f:
            json.dump({"step": engine.global_steps, "t": time.time()}, f)
    data_iter = iter(loader)
    while engine.global_steps < a.steps:          # the documented loop: no recovery code
        step = engine.global_steps + 1
        original = ".w" in os.environ.get("FFTRAINER_SLOT", ".w")  # not a spare or restarted replacement
        if step == a.raise_at_step and rank == a.raise_rank and original:
            raise RuntimeError(f"injected user exception on rank {rank} at step {step}")
        if faults is not None:
            faults.arm(engine, step)
        loss = engine(next(data_iter))
        if faults is not None:
            faults.watch_loss(loss)
        engine.backward(loss)
        engine.step()
        if engine.global_steps == step:          # completed (not rolled back by a recovery)
            log.write(json.dumps({"step": step, "loss": loss.item(), "t": time.time(),
                                  "recoveries": len(engine.recoveries)}) + "\n")
            log.flush()
            if bar is not None:
                bar.n = step
                bar.refresh()
        elif bar is not None:
            bar.n = engine.global_steps
            bar.refresh()
        if a.ckpt_dir and engine.global_steps == step and step % a.ckpt_every == 0:
            engine.save_checkpoint(a.ckpt_dir)
        if a.step_sleep:
            time.sleep(a.step_sleep)
    if bar is not None:
        bar.close()
    digest = model_digest(engine)  # full weights + fp32 master + Adam moments, padding-free
    with open(os.path.join(a.out, f"final.rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "digest": digest, "steps": engine.global_steps,
                   "recoveries": [r.to_dict() for r in engine.recoveries] if not a.no_failover else [],
                   "snapshot": engine.snapshot_stats() if not a.no_failover else {}}, f, default=str)
    engine.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
