"""Test worker for fftrainer-launch: joins through the agent, all-reduces one tensor per step, and on a
generation change rebuilds its group and resumes from the minimum last completed step of the survivors.

Writes JSON lines to OUT/<slot>.jsonl: start, group (per generation joined), step, error, done.
Faults: --raise-at SLOT:STEP raises an uncaught exception in that slot (initial process only);
--hang-at SLOT:STEP blocks that slot's main thread forever (its heartbeats go on);
--ignore-term SLOT makes that slot ignore SIGTERM.
"""
import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from fftrainer_ds.errors import RecoverableError
from fftrainer_ds.failover import membership

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--step-s", type=float, default=0.1)
p.add_argument("--raise-at", default="")
p.add_argument("--hang-at", default="")
p.add_argument("--ignore-term", default="")
args = p.parse_args()

slot = os.environ["FFTRAINER_SLOT"]
if slot == args.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
out = open(os.path.join(args.out, f"{slot}.jsonl"), "a", buffering=1)


def record(ev, **kw):
    out.write(json.dumps(dict(ev=ev, slot=slot, t=time.time(), **kw)) + "\n")


record("start", pid=os.getpid(), spare=membership.P.ENV_SPARE_ID in os.environ,
       replacement=os.environ.get("FFTRAINER_REPLACEMENT") == "1", env_rank=os.environ.get("RANK"),
       local_rank=os.environ["LOCAL_RANK"], cross_rank=os.environ["CROSS_RANK"], cross_size=os.environ["CROSS_SIZE"])
agent = membership.join()
raise_slot, _, raise_step = args.raise_at.partition(":")
hang_slot, _, hang_step = args.hang_at.partition(":")
last_done, has_state = -1, False


def regroup(g):
    """Form generation g's group (or a newer one) and agree on the step to resume from."""
    for _ in range(membership.MAX_FORM_ATTEMPTS):  # bounded like Agent.recover
        try:
            agent.rebuild_default_group(g, "gloo")
            vals = agent.allgather("resume", last_done if has_state else None)
            known = [v for v in vals.values() if v is not None]
            resume = (min(known) if known else -1) + 1
            info = agent.info
            record("group", gen=g, rank=agent.rank, resume=resume, world=dist.get_world_size(),
                   recovery_start=info.recovery_start, detected_at=info.detected_at, failed=info.failed,
                   reason=info.reason)
            return resume
        except membership.GenerationChanged as err:
            g = err.generation
        except RecoverableError as err:
            record("error", gen=g, err=str(err)[:200])
            g = agent.wait_for_generation(after=g)
    raise RuntimeError(f"no group formed in {membership.MAX_FORM_ATTEMPTS} generations")


step = regroup(agent.generation)
while step < args.steps:
    if slot == raise_slot and step == int(raise_step):
        raise ValueError(f"injected failure at step {step}")
    if slot == hang_slot and step == int(hang_step):
        record("hang", step=step)
        while True:
            time.sleep(1)
    try:
        agent.check()
        t = torch.full((4,), float(step + 1))
        dist.all_reduce(t)
        record("step", step=step, gen=agent.generation, rank=agent.rank, value=t[0].item(),
               expect=float((step + 1) * agent.world_size))
        last_done, has_state = step, True
        agent.report_progress(step)
        step += 1
        time.sleep(args.step_s)
    except Exception as exc:  # a peer died (gloo raises) or a newer generation appeared
        record("error", gen=agent.generation, err=f"{type(exc).__name__}: {str(exc)[:150]}")
        step = regroup(agent.handle_collective_error(exc))
record("done", rank=agent.rank, gen=agent.generation)
agent.finish()
dist.destroy_process_group()
