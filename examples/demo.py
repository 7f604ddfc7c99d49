"""The main job, end to end on CPU: a rank dies mid-run and training goes on, bit for bit.

1. `fftrainer-launch` starts 4 workers + 1 hot spare training a small GPT (ZeRO-2, gloo, snapshots
   every step, one shadow replica per shard).
2. At step 12 this script SIGKILLs the process that holds rank 2.
3. The spare takes rank 2, gets its shard from the replica holder, everyone resumes at the last step
   every shard has, and the run finishes. The recovery timeline is printed.
4. The same job runs again without failures; final weights and every step's loss must be equal.
5. Summary on one screen, and a timeline plot: demo_out/timeline.png.

    python examples/demo.py [--steps 30] [--kill-step 12] [--kill-rank 2] [--out demo_out]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the store closing at the end is expected

from fftrainer_ds.testing.chaos import LaunchedJob  # noqa: E402

SCRIPT = os.path.join(ROOT, "examples", "train_gpt.py")


def read(out, world):
    losses, finals = {}, {}
    for r in range(world):
        with open(os.path.join(out, f"losses.rank{r}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        losses[r] = rows
        with open(os.path.join(out, f"final.rank{r}.json")) as f:
            finals[r] = json.load(f)
    return losses, finals


def run(out, args, kill=None, progress=True):
    job = LaunchedJob(SCRIPT, ["--steps", str(args.steps), "--out", out, "--step-sleep", "0.15",
                               "--heartbeat-timeout", "3"],
                      nproc_per_node=args.world, spares=1 if kill else 0, out_dir=out, heartbeat_timeout_s=3)
    job.start()
    from tqdm import tqdm

    bar = tqdm(total=args.steps, desc="failure run " if kill else "clean run   ", unit="step", disable=not progress)
    killed_at = None
    shown = 0
    step = 0
    try:
        while job.proc.poll() is None:
            try:
                step = max(step, job.progress(0))
            except Exception:  # store not up yet, or the supervisor just closed it
                pass
            if step != bar.n:
                bar.n = step
                bar.refresh()
            warm = "hot spare warmed up" in job.log()
            if kill and killed_at is None and step >= args.kill_step and warm:
                pid = job.signal_rank(args.kill_rank, signal.SIGKILL)
                killed_at = time.time()
                bar.write(f">>> SIGKILL -> rank {args.kill_rank} (pid {pid}) at step {step}")
            lines = [ln for ln in job.log().splitlines()
                     if re.search(r"FAILURE|generation \d+ published \(|rank 0 recovered", ln)]
            for ln in lines[shown:]:
                bar.write("    " + ln.strip()[:160])
            shown = len(lines)
            time.sleep(0.1)
        bar.n = args.steps
        bar.refresh()
    finally:
        bar.close()
        job.stop()
    if job.proc.returncode != 0:
        print(job.log()[-5000:])
        raise SystemExit(f"job failed (exit {job.proc.returncode})")
    return killed_at


def plot(losses, finals, killed_at, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(losses[0], key=lambda x: x["t"])
    t0 = rows[0]["t"]
    xs = [(b["t"] - t0) for a, b in zip(rows, rows[1:])]
    ys = [1e3 * (b["t"] - a["t"]) for a, b in zip(rows, rows[1:])]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.plot(xs, ys, ".-", lw=1, label="rank 0: time per completed step")
    rec = [r for f in finals.values() for r in f["recoveries"]][:1]
    if killed_at:
        ax.axvline(killed_at - t0, color="red", ls="--", label="SIGKILL")
    if rec and rec[0].get("first_step_done"):
        ax.axvline(rec[0]["first_step_done"] - t0, color="green", ls="--", label="first step after recovery")
    ax.set_xlabel("wall clock (s)")
    ax.set_ylabel("step time (ms)")
    ax.set_title("fftrainer_ds demo: 4 ranks, rank killed, recovered in place")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--kill-step", type=int, default=12)
    ap.add_argument("--kill-rank", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    fail_dir, clean_dir = os.path.join(args.out, "with_failure"), os.path.join(args.out, "clean")
    print(f"fftrainer_ds demo: {args.world} workers + 1 hot spare, ZeRO-2 on CPU (gloo), "
          f"{args.steps} steps, SIGKILL of rank {args.kill_rank} at step {args.kill_step}\n")
    t = time.time()
    killed_at = run(fail_dir, args, kill=True)
    t_fail = time.time() - t
    print("\nverifying: the same job without failures ...")
    t = time.time()
    run(clean_dir, args, kill=False)
    t_clean = time.time() - t

    fl, ff = read(fail_dir, args.world)
    cl, cf = read(clean_dir, args.world)
    last = {r: {x["step"]: x["loss"] for x in fl[r]} for r in fl}
    clean_last = {r: {x["step"]: x["loss"] for x in cl[r]} for r in cl}
    losses_equal = all(all(x["loss"] == clean_last[r][x["step"]] for x in fl[r]) for r in fl) and last == clean_last
    weights_equal = all(ff[r]["digest"] == cf[r]["digest"] for r in ff)
    rec = next((x for f in ff.values() for x in f["recoveries"] if x.get("since_detect_s")), None)
    png = os.path.join(args.out, "timeline.png")
    plot(fl, ff, killed_at, png)
    snap = ff[0].get("snapshot", {})
    rows = sorted(cl[0], key=lambda x: x["t"])
    step_ms = 1e3 * sorted(b["t"] - a["t"] for a, b in zip(rows, rows[1:]))[len(rows) // 2 - 1]
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from snapshot_overhead import pack_bandwidth

    bw, _ = pack_bandwidth(total_mb=64)

    print("\n" + "=" * 78)
    print(f" steps trained            {args.steps} on {args.world} ranks (+1 spare); wall {t_fail:.1f} s "
          f"(clean run {t_clean:.1f} s)")
    if rec:
        tl = rec["since_detect_s"]
        print(f" failure                  rank {rec['failed_ranks']} {rec['causes']}")
        print(f" recovery                 generation {rec['generation']}, resumed at step {rec['recovery_step']}, "
              f"lost {rec['lost_steps']} step(s)")
        print(" timeline since detection " + ", ".join(f"{k} {v:.3f}s" for k, v in tl.items()))
        print(f" RTO (detection -> next completed step)  {tl.get('first_step_done', float('nan')):.2f} s")
    if snap:
        print(f" snapshot per rank        {snap['bytes'] / 1e6:.2f} MB, pack {snap['pack_ms']:.2f} ms on a "
              f"background thread, fence wait {snap['fence_wait_ms']:.3f} ms/step, backend {snap['backend']}")
        print(f" snapshot overhead        fence wait {snap['fence_wait_ms']:.3f} ms of a {step_ms:.0f} ms step "
              f"({100 * snap['fence_wait_ms'] / step_ms:.3f}%: the only time training waits for a snapshot)")
        print(f" pack bandwidth           native copy+checksum {bw['native pack+checksum']:.1f} GB/s vs torch "
              f"copy_ {bw['torch copy_ only']:.1f} GB/s (64 MB, this machine)")
        if snap.get("replication_bytes_sent"):
            print(f" replication              {snap['replication_bytes_sent'] / 1e6:.1f} MB sent by rank 0, "
                  f"{snap.get('replication_versions_committed', 0)} versions committed, "
                  f"{snap.get('replication_versions_dropped', 0)} dropped")
    print(f" losses of every step     {'EQUAL' if losses_equal else 'DIFFERENT'} to the failure-free run")
    print(f" final weights/optimizer  {'EQUAL (bitwise)' if weights_equal else 'DIFFERENT'} on every rank")
    print(f" timeline plot            {png}")
    print("=" * 78)
    if not (losses_equal and weights_equal and rec):
        raise SystemExit("demo FAILED: the recovered run is not bit-identical to the failure-free run")


if __name__ == "__main__":
    main()
