"""Soak: one long job under fftrainer-launch survives many failures of every kind, bit for bit.

    python benchmarks/soak.py [--steps 300] [--failures 50] [--seed 0] [--hog] [--keep DIR]

examples/train_gpt.py (small GPT, ZeRO-2, k=2, snapshots persisted every --persist-interval steps as the last
resort), 4 ranks + 2 hot spares, runs first without failures (the reference; it also measures the step time,
the start-up and the spares' warm-up, from which the timeouts of the second run follow), then with --failures
failures at seeded random steps, ranks and moments: SIGKILL; SIGSTOP (a hang: heartbeat timeout); an
exception raised inside forward, backward or step (the script's --fault-file); a second rank killed right
after the first failure's generation is published; a spare killed while it warms up; two ranks at once.
Each failure is recovered (every rank completed --settle-steps steps in the new generation) before the next.
One row per failure (detection, RTO = fault -> next completed step, lost steps, replacement), totals; exit
status 0 only if every loss and the final weights and optimizer state equal the reference's bit for bit.
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import table  # noqa: E402

from fftrainer_ds.failover import protocol as P  # noqa: E402
from fftrainer_ds.testing import runs  # noqa: E402
from fftrainer_ds.testing.chaos import (ROOT, FaultRequest, JobWatch, LaunchedJob, Observed,  # noqa: E402
                                        Where, request_fault, served_at)
from fftrainer_ds.testing.hog import cpu_hog  # noqa: E402

SCRIPT = os.path.join(ROOT, "examples", "train_gpt.py")
WORLD, SPARES, K = 4, 2, 2
FIRST_STEP = 8        # after the replication throttle measured its baseline (steps 3-5)
TAIL_STEPS = 12       # no failure this close to the end: a rank that already finished cannot be replaced


class Kind(str, enum.Enum):
    SIGKILL = "SIGKILL"
    SIGSTOP = "SIGSTOP (hang)"
    FORWARD = "exception in forward"
    BACKWARD = "exception in backward"
    STEP = "exception in step"
    DURING_RECOVERY = "kill during recovery"
    SPARE_WARMING = "spare killed warming up"
    TWO_AT_ONCE = "two ranks at once"


_WHERE = {Kind.FORWARD: Where.FORWARD, Kind.BACKWARD: Where.BACKWARD, Kind.STEP: Where.STEP}


class SoakError(Exception):     # the job did not recover from a failure, or ended early
    pass


@dataclass(frozen=True)
class Planned:
    kind: Kind
    step: int              # inject once every rank completed this step...
    delay: float           # ...and this fraction of a step time later: a random moment inside the next step
    ranks: tuple           # two distinct ranks; single-rank kinds use the first


def plan(n: int, steps: int, seed: int) -> List[Planned]:
    """`n` failures, every kind about as often, at seeded random steps, moments and ranks."""
    rng = random.Random(seed)
    kinds = [list(Kind)[i % len(Kind)] for i in range(n)]
    rng.shuffle(kinds)
    at = sorted(rng.randint(FIRST_STEP, steps - TAIL_STEPS - 8) for _ in range(n))
    return [Planned(k, s, rng.random(), tuple(rng.sample(range(WORLD), 2))) for k, s in zip(kinds, at)]


@dataclass
class Measured:
    """The failure-free run: its wall time, and what the failure run's timeouts are derived from."""
    wall_s: float
    step_s: float          # median time between two completed steps
    max_gap_s: float       # the longest such time after the first 10 steps
    start_s: float         # launch -> first completed step (a cold process start on this machine, now)
    warmup_s: float        # the longest hot-spare warm-up the launcher logged

    @property
    def heartbeat_timeout_s(self) -> float:
        return round(max(2.0, 4 * self.max_gap_s), 1)   # a hung process is a step's silence, many times over

    @property
    def collective_timeout_s(self) -> float:
        return round(max(10.0, 3 * self.warmup_s), 1)   # a spare given a rank mid-warm-up must still join

    @property
    def settle_timeout_s(self) -> float:
        return 4 * (self.start_s + self.collective_timeout_s + self.heartbeat_timeout_s)


@dataclass
class Injection:
    kind: Kind
    ranks: List[int]
    slots: List[str]                   # the processes hurt
    t_fault: float                     # time.time() of the signal, or of the raise
    gen_before: int
    step: int                          # the last step every rank had completed then
    ready_spares: int                  # warmed-up spares then (a spare still warming up joins later)
    gen_after: int = -1                # the generation the job resumed in
    note: str = ""
    detect_s: Optional[float] = None   # fault -> its supervisor saw it
    rto_s: Optional[float] = None      # fault -> every rank completed a step again
    lost: Optional[int] = None         # completed steps computed again
    resumed: Optional[int] = None      # the step the job resumed from
    failed_ranks: List[int] = field(default_factory=list)
    replacement: str = ""


class Injector:
    """Injects the planned failures into a running job, one at a time, each recovered before the next."""

    def __init__(self, job: LaunchedJob, watch: JobWatch, fault_file: str, m: Measured, settle_steps: int):
        self.job, self.watch, self.fault_file, self.m, self.settle_steps = job, watch, fault_file, m, settle_steps

    def holder(self, rank: int) -> str:
        return self.job.generation_info().ranks[rank].slot

    def done_step(self) -> int:
        last = self.watch.view().last
        return min(pr.step for pr in last.values()) if len(last) == WORLD else 0

    def _until(self, pred, what: str, ok=bool):
        deadline = time.monotonic() + self.m.settle_timeout_s
        while time.monotonic() < deadline:
            value = pred()
            if ok(value):
                return value
            if self.job.proc.poll() is not None:
                raise SoakError(f"the job ended (rc {self.job.proc.returncode}) waiting for {what}")
            time.sleep(0.01)
        raise SoakError(f"timed out after {self.m.settle_timeout_s:.0f} s waiting for {what}")

    def reach(self, p: Planned, last_step: int) -> bool:  # False: too close to the end for another failure
        self._until(lambda: self.done_step() >= min(p.step, last_step), f"step {p.step}")
        if self.done_step() > last_step:
            return False
        time.sleep(p.delay * self.m.step_s)
        return True

    def _record(self, kind: Kind, ranks: List[int], slots: List[str]) -> Injection:
        return Injection(kind, ranks, slots, time.time(), self.job.generation(), self.done_step(),
                         sum(s.warm for s in self.job.spares()))

    def inject(self, p: Planned) -> List[Injection]:
        if p.kind in _WHERE:
            return [self.settle(self._exception(p.ranks[0], _WHERE[p.kind], p.kind))]
        if p.kind is Kind.SPARE_WARMING:
            return self._spare_warming(p)
        ranks = list(p.ranks[:2] if p.kind in (Kind.TWO_AT_ONCE, Kind.DURING_RECOVERY) else p.ranks[:1])
        first = ranks[:1] if p.kind is Kind.DURING_RECOVERY else ranks      # the second one: once recovery began
        inj = self._record(p.kind, ranks, [self.holder(r) for r in first])
        inj.t_fault = time.time()
        if p.kind is Kind.TWO_AT_ONCE:
            self.job.signal_ranks(ranks, signal.SIGKILL)
        else:
            self.job.signal_rank(ranks[0], signal.SIGSTOP if p.kind is Kind.SIGSTOP else signal.SIGKILL)
        if p.kind is Kind.DURING_RECOVERY:
            self.job.wait_generation(inj.gen_before + 1, timeout_s=self.m.settle_timeout_s)
            inj.slots.append(self.holder(ranks[1]))
            self.job.signal_rank(ranks[1], signal.SIGKILL)
        return [self.settle(inj)]

    def _exception(self, rank: int, where: Where, kind: Kind) -> Injection:
        """Ask the holder of `rank` to raise two steps ahead (again, 3 times at most, if it read that too late)."""
        for _ in range(3):
            inj = self._record(kind, [rank], [self.holder(rank)])
            req = FaultRequest(rank, max(self.watch.view().last[r].step for r in range(WORLD)) + 2, where)
            request_fault(self.fault_file, req)
            past = lambda: self.watch.view().last[rank].step >= req.step  # noqa: E731
            self._until(lambda: served_at(self.fault_file, req) is not None or past(), f"{req.line()}")
            t = served_at(self.fault_file, req)
            if t is not None:
                inj.t_fault = t
                return inj
        raise SoakError(f"rank {rank} never served a request to raise in {where.value}")

    def _spare_warming(self, p: Planned) -> List[Injection]:
        """Kill a spare that is still warming up; if none is, SIGKILL a rank first: the spare that takes
        it is replaced by a new one, which then warms up."""
        before: List[Injection] = []
        warming = [s for s in self.job.spares() if not s.warm]
        if not warming:
            before = self.inject(Planned(Kind.SIGKILL, 0, 0.0, p.ranks))
            before[0].note = "makes a spare warm up"
            warming = self._until(lambda: [s for s in self.job.spares() if not s.warm], "a spare warming up")
        inj = self._record(Kind.SPARE_WARMING, [], [warming[0].slot])
        inj.t_fault = time.time()
        os.kill(warming[0].pid, signal.SIGKILL)
        return before + [self.settle(inj)]

    def settle(self, inj: Injection) -> Injection:
        resumed = lambda: self.watch.view().resumed_in(inj.gen_before, inj.slots, self.settle_steps, inj.step)  # noqa
        inj.gen_after = self._until(resumed, f"the recovery from {inj.kind.value} of {inj.slots}",
                                    ok=lambda g: g is not None)
        return inj


# ---- the two runs -----------------------------------------------------------------------------------
def script_args(args: argparse.Namespace, tmp: str, name: str, extra: Sequence[str] = ()) -> List[str]:
    return ["--steps", str(args.steps), "--replication-factor", str(K), "--step-sleep", str(args.step_sleep),
            "--out", os.path.join(tmp, name), "--persist-dir", os.path.join(tmp, f"{name}_persisted"),
            "--persist-interval", str(args.persist_interval), *extra]


def reference(args: argparse.Namespace, tmp: str) -> Measured:
    """The failure-free run (no replacement allowed: a failure here stops it) and what it measured."""
    out, t0 = os.path.join(tmp, "reference"), time.time()
    job = LaunchedJob(SCRIPT, script_args(args, tmp, "reference"), nproc_per_node=WORLD, spares=SPARES,
                      out_dir=out, max_restarts=0, heartbeat_timeout_s=10.0, collective_timeout_s=30.0).start()
    try:
        rc = job.wait(timeout_s=max(600.0, 5.0 * args.steps))
        wall = time.time() - t0
    finally:
        job.stop()
    if rc != 0 or "FAILURE" in job.log():
        raise SoakError(f"the failure-free run failed (rc {rc}):\n{job.log()[-4000:]}")
    t = runs.step_times(out)
    gaps = [b - a for a, b in zip(t, t[1:])]
    warm = [float(x) for x in re.findall(r"hot spare warmed up in ([\d.]+) s", job.log())]
    return Measured(wall, sorted(gaps)[len(gaps) // 2], max(gaps[10:] or gaps), t[0] - t0, max(warm or [0.0]))


@dataclass
class Outcome:
    rc: Optional[int] = None
    wall_s: float = 0.0
    injections: List[Injection] = field(default_factory=list)
    view: Optional[Observed] = None
    log: str = ""
    error: str = ""
    orphans: List[int] = field(default_factory=list)


def failure_run(args: argparse.Namespace, tmp: str, m: Measured) -> Outcome:
    fault_file = os.path.join(tmp, "faults.txt")
    open(fault_file, "w").close()
    job = LaunchedJob(SCRIPT, script_args(args, tmp, "soak", ["--fault-file", fault_file]), nproc_per_node=WORLD,
                      spares=SPARES, out_dir=os.path.join(tmp, "soak"), max_restarts=4 * args.failures + 8,
                      heartbeat_timeout_s=m.heartbeat_timeout_s, collective_timeout_s=m.collective_timeout_s)
    o, t0 = Outcome(), time.time()
    job.start()
    try:
        with JobWatch(job, WORLD) as watch:      # left before the job ends, and the store with it
            try:
                inject_all(Injector(job, watch, fault_file, m, args.settle_steps), args, o)
            except (SoakError, AssertionError) as err:
                o.error = str(err)
                job.dump_stacks()                # where each process is: into the launcher log
            o.view = watch.view()
        if not o.error:
            o.rc = job.wait(timeout_s=3 * m.wall_s + m.settle_timeout_s)
            o.wall_s = time.time() - t0
    except AssertionError as err:                # job.wait's timeout
        o.error = str(err)[:2000]
    finally:
        job.stop()
        o.log, o.orphans = job.log(), job.orphans()
    return o


def inject_all(inj: Injector, args: argparse.Namespace, o: Outcome) -> None:
    last_step = args.steps - TAIL_STEPS
    for n, p in enumerate(plan(args.failures, args.steps, args.seed)):
        if not inj.reach(p, last_step):
            raise SoakError(f"only {n} of the {args.failures} planned failures fit before step {last_step}")
        for i in inj.inject(p):
            o.injections.append(i)
            print(f"  {len(o.injections):3d} {i.kind.value} {i.slots} at step {i.step} -> generation {i.gen_after}",
                  flush=True)


# ---- the report -------------------------------------------------------------------------------------
def measure(inj: Injection, v: Observed, disk_gens: Set[int]) -> Injection:
    det = [e.time for e in v.events if e.kind is P.EventKind.FAILURE and e.slot in inj.slots
           and e.time >= inj.t_fault - 1.0]
    inj.detect_s = min(det) - inj.t_fault if det else None
    gens = [v.infos[g] for g in range(inj.gen_before + 1, inj.gen_after + 1)]
    if gens:
        firsts = [v.first[(r, inj.gen_after)] for r in range(WORLD)]
        inj.resumed = min(f.step for f in firsts) - 1
        inj.rto_s = max(f.time for f in firsts) - inj.t_fault
        inj.lost = max(0, max(v.high.get(g, 0) for g in range(inj.gen_before, inj.gen_after)) - inj.resumed)
        inj.failed_ranks = sorted({r for info in gens for r in info.failed})
        inj.replacement = ", ".join(f"{info.ranks[r].kind.value} {info.ranks[r].slot}" for info in gens
                                    for r in info.failed)
    else:
        new = [e.slot for e in v.events if e.kind is P.EventKind.SPARE and e.time >= inj.t_fault]
        inj.replacement = f"new spare {new[0]}" if new else "none"
    extra = [f"r{r}: {info.causes.get(r, '?')}" for info in gens for r in info.failed if r not in inj.ranks]
    notes = [inj.note] + [f"also failed {'; '.join(extra)}"] * bool(extra)
    notes += ["FROM DISK"] * any(info.generation in disk_gens for info in gens)
    notes += ["regroup"] * any(info.reason is P.GenReason.REGROUP for info in gens)
    inj.note = "; ".join(n for n in notes if n)
    return inj


def _s(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def _median(xs: List[float]) -> Optional[float]:
    return sorted(xs)[len(xs) // 2] if xs else None


def report(rows: List[Injection], m: Measured, o: Outcome, bad: List[str]) -> bool:
    print(table([[i + 1, r.kind.value, " ".join(f"r{x}" for x in r.ranks) or r.slots[0], r.step, r.ready_spares,
                  _s(r.detect_s), _s(r.rto_s), "-" if r.lost is None else r.lost, r.replacement, r.note]
                 for i, r in enumerate(rows)], ["#", "failure", "hurt", "at step", "warm spares", "detection s",
                                                "RTO s", "lost steps", "replaced by", "note"]))
    by_kind = [[k.value, len(rs), _s(_median([r.detect_s for r in rs if r.detect_s is not None])),
                _s(_median([r.rto_s for r in rs if r.rto_s is not None])),
                _s(max([r.rto_s for r in rs if r.rto_s is not None], default=None)), sum(r.lost or 0 for r in rs)]
               for k in Kind for rs in [[r for r in rows if r.kind is k]]]
    print("\n" + table(by_kind, ["failure", "count", "detection s (median)", "RTO s (median)", "RTO s (max)",
                                 "lost steps"]))
    ok = not (o.error or bad or o.orphans) and o.rc == 0
    taken = " ".join(r.replacement for r in rows if r.lost is not None)
    print(f"\nfailures injected: {len(rows)} ({sum(bool(r.note.startswith('makes')) for r in rows)} SIGKILLs to make a "
          f"spare warm up among them); survived: {len(rows) if ok else 'NO'}; steps lost: "
          f"{sum(r.lost or 0 for r in rows)}; ranks taken by a hot spare: {taken.count('spare n')}, by a restarted "
          f"process: {taken.count('restart ')}")
    if o.wall_s:
        print(f"wall time: {o.wall_s:.1f} s against {m.wall_s:.1f} s without failures "
              f"(+{o.wall_s - m.wall_s:.1f} s, {100 * (o.wall_s / m.wall_s - 1):+.0f}%)")
    fails = [o.error] * bool(o.error) + bad[:20] + [f"orphan pids {o.orphans}"] * bool(o.orphans)
    for why in fails + [f"the job exited with {o.rc}"] * (o.rc not in (0, None)):
        print(f"FAILED: {why}")
    return ok


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps of the job")
    ap.add_argument("--failures", type=int, default=50, help="failures to inject")
    ap.add_argument("--seed", type=int, default=0, help="seed of the failures' kinds, steps, moments and ranks")
    ap.add_argument("--step-sleep", type=float, default=0.02, help="the script's sleep after each step (s)")
    ap.add_argument("--settle-steps", type=int, default=2, help="steps every rank completes after a recovery "
                    "before the next failure (2: every replica is whole again)")
    ap.add_argument("--persist-interval", type=int, default=10, help="steps between snapshots persisted on disk")
    ap.add_argument("--hog", action="store_true", help="run both jobs beside a CPU hog (2 busy processes per core)")
    ap.add_argument("--keep", default=None, help="directory for the runs' files (default: a temporary one, "
                    "removed when the soak passes)")
    args = ap.parse_args(argv)
    if args.steps < FIRST_STEP + TAIL_STEPS + 8 + args.failures or args.failures < 1:
        ap.error(f"--steps must be >= {FIRST_STEP + TAIL_STEPS + 8} + --failures, --failures >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    tmp = args.keep or tempfile.mkdtemp(prefix="ffsoak_")
    os.makedirs(tmp, exist_ok=True)
    print(f"# soak: {WORLD} ranks + {SPARES} hot spares, k={K}, {args.steps} steps, {args.failures} failures, "
          f"seed {args.seed}{', beside a CPU hog' if args.hog else ''}; files in {tmp}", flush=True)
    with cpu_hog(per_core=2) if args.hog else contextlib.nullcontext():
        try:
            m = reference(args, tmp)
        except (SoakError, AssertionError) as err:
            print(f"FAILED: {err}")
            return 1
        print(f"failure-free run: {m.wall_s:.1f} s, step {m.step_s:.3f} s (longest {m.max_gap_s:.2f} s), first step "
              f"{m.start_s:.1f} s after the launch, spare warm-up {m.warmup_s:.1f} s -> heartbeat timeout "
              f"{m.heartbeat_timeout_s} s, collective timeout {m.collective_timeout_s} s", flush=True)
        o = failure_run(args, tmp, m)
    disk = {int(g) for g in re.findall(r"rank 0 recovered: generation (\d+),.* FROM DISK", o.log)}
    rows = [measure(inj, o.view, disk) for inj in o.injections]
    bad: List[str] = []
    if o.rc == 0:
        extra = [{"recovery_step": r.resumed, "failed_ranks": r.failed_ranks} for r in rows if r.resumed is not None]
        bad = runs.mismatches(runs.read_run(os.path.join(tmp, "reference"), WORLD),
                              runs.read_run(os.path.join(tmp, "soak"), WORLD), args.steps, extra)
    print(f"\n## Soak: {len(rows)} failures, seed {args.seed}{' (beside a CPU hog)' if args.hog else ''}\n")
    ok = report(rows, m, o, bad)
    if ok and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif not ok:
        print(f"launcher log: {os.path.join(tmp, 'soak', 'launcher.log')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
