"""fftrainer-launch with real processes: SIGKILL / SIGSTOP / exceptions from outside, gloo on loopback.

Every test runs the supervisor as `python -m fftrainer_ds.launch` on tests/scripts/allreduce_worker.py
and checks, at the end, that no process it spawned is left. Detection latencies are printed
(run with -s to see them), not asserted.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fftrainer_ds import launch
from fftrainer_ds.failover import membership
from fftrainer_ds.failover import protocol as P
from fftrainer_ds.secret import write_secret_file
from fftrainer_ds.testing.chaos import pid_alive as alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "scripts", "allreduce_worker.py")
PLAIN_WORKER = os.path.join(ROOT, "tests", "scripts", "plain_env_worker.py")


class Job:
    """One fftrainer-launch process and the records its workers write."""

    def __init__(self, tmp, launcher_args, worker_args=(), name="n0", script=WORKER, out=None):
        self.out = out or os.path.join(tmp, "out")
        os.makedirs(self.out, exist_ok=True)
        self.log_path = os.path.join(tmp, f"{name}.log")
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fftrainer_ds.launch", *launcher_args, script, "--out", self.out, *worker_args],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def records(self, slot=None):
        recs = []
        for path in glob.glob(os.path.join(self.out, f"{slot or '*'}.jsonl")):
            with open(path) as f:
                recs += [json.loads(line) for line in f if line.endswith("\n")]
        return recs

    def wait_for(self, pred, timeout=40.0, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) waiting for {what}:\n{self.log()}")
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def pid(self, slot):
        return self.wait_for(lambda: next((r["pid"] for r in self.records(slot) if r["ev"] == "start"), None),
                             what=f"{slot} to start")

    def at_step(self, slot, step):
        self.wait_for(lambda: any(r["ev"] == "step" and r["step"] >= step for r in self.records(slot)),
                      what=f"{slot} at step {step}")

    def spawned_pids(self):
        return [int(p) for p in re.findall(r"spawned slot=\S+ .* pid=(\d+)", self.log())]

    def port(self):
        return int(self.wait_for(lambda: re.search(r"store listening on \S+:(\d+)", self.log()),
                                 what="store port").group(1))

    def finish(self, timeout=45.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor did not finish:\n{self.log()}")

    def cleanup(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)    # its children die with it (PDEATHSIG)
            self.proc.wait()


@pytest.fixture
def jobs(tmp_path):
    started = []

    def make(*args, **kw):
        job = Job(str(tmp_path), *args, **kw)
        started.append(job)
        return job

    yield make
    for job in started:
        job.cleanup()
    pids = [p for job in started for p in job.spawned_pids()]
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "orphan processes left"


def check_training(job, world, steps):
    """Every rank's final holder finished; every step's all-reduce was right; each rank covered all steps."""
    recs = job.records()
    bad = [r for r in recs if r["ev"] == "step" and r["value"] != r["expect"]]
    assert not bad, bad[:3]
    done = sorted(r["rank"] for r in recs if r["ev"] == "done")
    assert done == list(range(world)), done
    for rank in range(world):
        covered = {r["step"] for r in recs if r["ev"] == "step" and r["rank"] == rank}
        assert covered == set(range(steps)), (rank, sorted(set(range(steps)) - covered))


def latency(job, t_fault, gen, label):
    """Print death->detection, death->recovery start, death->group re-formed for generation `gen`."""
    groups = [r for r in job.records() if r["ev"] == "group" and r["gen"] == gen]
    g = groups[0]
    print(f"\n[{label}] detect {g['detected_at'] - t_fault:.3f} s, "
          f"recovery start {g['recovery_start'] - t_fault:.3f} s, "
          f"group gen{gen} formed by all {max(r['t'] for r in groups) - t_fault:.3f} s after the fault")


def failure_lines(job, rank):
    return [ln for ln in job.log().splitlines() if f"FAILURE rank={rank} " in ln]


def test_sigkill_middle_rank_spare_takes_over(jobs):
    job = jobs(["--nproc-per-node", "3", "--spares", "1"], ["--steps", "30"])
    victim = job.pid("n0.w1")
    job.at_step("n0.w1", 8)
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    assert job.finish() == 0, job.log()
    latency(job, t_kill, 1, "SIGKILL rank 1")
    check_training(job, 3, 30)
    lines = failure_lines(job, 1)
    assert len(lines) == 1 and "killed by signal SIGKILL" in lines[0] and "host=" in lines[0], job.log()
    spare_group = [r for r in job.records("n0.s0") if r["ev"] == "group"]
    assert [(r["gen"], r["rank"], r["failed"]) for r in spare_group] == [(1, 1, [1])]
    survivors = {r["slot"] for r in job.records() if r["ev"] == "group" and r["gen"] == 1}
    assert survivors == {"n0.w0", "n0.w2", "n0.s0"}
    for slot in ("n0.w0", "n0.w2"):     # survivors kept their process
        assert len([r for r in job.records(slot) if r["ev"] == "start"]) == 1


def test_sigkill_rank0(jobs):
    job = jobs(["--nproc-per-node", "2", "--spares", "1"], ["--steps", "25"])
    victim = job.pid("n0.w0")
    job.at_step("n0.w0", 6)
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    assert job.finish() == 0, job.log()
    latency(job, t_kill, 1, "SIGKILL rank 0")
    check_training(job, 2, 25)
    assert [r["rank"] for r in job.records("n0.s0") if r["ev"] == "group"] == [0]
    assert len(failure_lines(job, 0)) == 1


def test_sigstop_detected_by_heartbeat(jobs):
    job = jobs(["--nproc-per-node", "3", "--spares", "1", "--heartbeat-interval-s", "0.2",
                "--heartbeat-timeout-s", "1.5"], ["--steps", "30"])
    victim = job.pid("n0.w2")
    job.at_step("n0.w2", 6)
    t_stop = time.time()
    os.kill(victim, signal.SIGSTOP)
    assert job.finish() == 0, job.log()
    latency(job, t_stop, 1, "SIGSTOP rank 2, heartbeat timeout 1.5 s")
    check_training(job, 3, 30)
    lines = failure_lines(job, 2)
    assert len(lines) == 1 and "hung: no heartbeat" in lines[0], job.log()
    assert not alive(victim)


def test_uncaught_exception_is_a_failure(jobs):
    job = jobs(["--nproc-per-node", "2", "--spares", "1"], ["--steps", "20", "--raise-at", "n0.w1:5"])
    assert job.finish() == 0, job.log()
    check_training(job, 2, 20)
    lines = failure_lines(job, 1)
    assert len(lines) == 1 and "exited with code 1: uncaught ValueError: injected failure at step 5" in lines[0]


def test_hung_main_thread_found_through_collective_timeouts(jobs):
    """Heartbeats go on but rank 1 never reaches its all-reduce: the peers' collectives time out, they
    report it, the coordinator regroups, rank 1 never joins the new generation and is declared failed."""
    job = jobs(["--nproc-per-node", "3", "--spares", "1", "--collective-timeout-s", "3",
                "--heartbeat-interval-s", "0.3", "--heartbeat-timeout-s", "2"],
               ["--steps", "15", "--hang-at", "n0.w1:5"])
    hang = job.wait_for(lambda: [r for r in job.records("n0.w1") if r["ev"] == "hang"], what="the hang")[0]
    assert job.finish(timeout=50) == 0, job.log()
    latency(job, hang["t"], 2, "main thread of rank 1 hung, collective timeout 3 s, heartbeat timeout 2 s")
    check_training(job, 3, 15)
    log = job.log()
    assert "collective error reported by rank" in log and "regrouping the same processes" in log, log
    lines = failure_lines(job, 1)
    assert len(lines) == 1 and "did not join generation 1" in lines[0], log
    assert [r["rank"] for r in job.records("n0.s0") if r["ev"] == "group"] == [1]


def test_no_spare_left_restarts_the_rank(jobs):
    job = jobs(["--nproc-per-node", "2", "--spares", "0"], ["--steps", "25"])
    victim = job.pid("n0.w1")
    job.at_step("n0.w1", 5)
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    assert job.finish() == 0, job.log()
    latency(job, t_kill, 1, "SIGKILL rank 1, restarted process")
    check_training(job, 2, 25)
    start = [r for r in job.records("n0.x0") if r["ev"] == "start"]
    assert len(start) == 1 and start[0]["replacement"] and start[0]["env_rank"] == "1", start


def test_spares_are_replenished(jobs):
    """One spare per node, three SIGKILLs in a row: each is taken by a hot spare, because the supervisor
    spawns a new spare (n0.s1, n0.s2, ...) whenever one is given a rank; the third uses the last of the
    3 replacements --max-restarts allows by default."""
    job = jobs(["--nproc-per-node", "2", "--spares", "1"], ["--steps", "120", "--step-s", "0.05"])
    holders = {0: "n0.w0", 1: "n0.w1"}
    for i, rank in enumerate([1, 0, 1]):
        spare = f"n0.s{i}"
        job.pid(spare)                   # the spare taking this rank is up (its heartbeats start at join)
        victim = holders[rank]
        job.at_step(victim, max([0] + [r["step"] for r in job.records(victim) if r["ev"] == "step"]) + 2)
        os.kill(job.pid(victim), signal.SIGKILL)
        job.wait_for(lambda: f"generation {i + 1} published" in job.log(), what=f"generation {i + 1}")
        holders[rank] = spare
    assert job.finish(timeout=90) == 0, job.log()
    check_training(job, 2, 120)
    published = [ln for ln in job.log().splitlines() if " published (failure)" in ln]
    assert len(published) == 3 and all("(spare)" in ln for ln in published), published
    assert "(restart)" not in job.log() and "replacements used 3/3" in published[-1]
    for i, rank in enumerate([1, 0, 1]):
        assert [r["rank"] for r in job.records(f"n0.s{i}") if r["ev"] == "group"][:1] == [rank]
    spawned = dict(re.findall(r"spawned slot=(n0\.s\d+) kind=spare rank=None local_rank=(\d+)", job.log()))
    assert sorted(spawned) == ["n0.s0", "n0.s1", "n0.s2", "n0.s3"], spawned   # none beyond --max-restarts
    assert all(int(lr) < 3 for lr in spawned.values()), spawned   # a failed worker's local rank is reused


def test_max_restarts_exhausted_stops_the_job(jobs):
    job = jobs(["--nproc-per-node", "2", "--spares", "1", "--max-restarts", "0", "--term-timeout-s", "2"],
               ["--steps", "200"])
    victim = job.pid("n0.w1")
    job.at_step("n0.w1", 3)
    os.kill(victim, signal.SIGKILL)
    assert job.finish() == 1
    assert "replacements allowed by --max-restarts are used up" in job.log()


def test_two_supervisors_as_two_nodes(jobs, tmp_path):
    secret = write_secret_file(str(tmp_path / "job.secret"))  # what the user copies to every host
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--secret-file", secret]
    node0 = jobs([*common, "--node-rank", "0", "--master-port", "0", "--spares", "1"], ["--steps", "25"])
    node1 = jobs([*common, "--node-rank", "1", "--master-port", str(node0.port())], ["--steps", "25"],
                 name="n1", out=node0.out)
    starts = {r["slot"]: r for r in node0.wait_for(
        lambda: len([r for r in node0.records() if r["ev"] == "start"]) == 5 and node0.records(),
        what="5 processes")}
    n1w1 = starts["n1.w1"]
    assert (n1w1["env_rank"], n1w1["cross_rank"], n1w1["cross_size"]) == ("3", "1", "2")
    victim = node0.pid("n1.w0")
    node0.at_step("n1.w0", 6)
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    assert node0.finish() == 0, node0.log()
    assert node1.finish() == 0, node1.log()
    latency(node0, t_kill, 1, "SIGKILL rank 2 on node 1, spare on node 0")
    check_training(node0, 4, 25)
    assert [r["rank"] for r in node0.records("n0.s0") if r["ev"] == "group"] == [2]
    assert "host=" in failure_lines(node0, 2)[0]


def test_second_failure_during_recovery(jobs):
    job = jobs(["--nproc-per-node", "3", "--spares", "1"], ["--steps", "30"])
    first, second = job.pid("n0.w1"), job.pid("n0.w2")
    job.at_step("n0.w1", 6)
    t_kill = time.time()
    os.kill(first, signal.SIGKILL)
    job.wait_for(lambda: "generation 1 published" in job.log(), what="generation 1")
    os.kill(second, signal.SIGKILL)
    t_second = time.time()
    assert job.finish() == 0, job.log()
    formed = {r["slot"] for r in job.records() if r["ev"] == "group" and r["gen"] == 1}
    print(f"\n[second failure] generation 1 formed by {sorted(formed) or 'nobody'} before the second kill")
    latency(job, t_second, 2, "second SIGKILL during recovery")
    check_training(job, 3, 30)
    final = {r["slot"]: r["gen"] for r in job.records() if r["ev"] == "done"}
    # Rank 2 goes to the spare spawned in place of n0.s0 (n0.s1) if the coordinator has heard of it when
    # rank 2's death is posted, else to a restarted process: the two land within a few poll ticks.
    assert final in ({"n0.w0": 2, "n0.s0": 2, "n0.s1": 2}, {"n0.w0": 2, "n0.s0": 2, "n0.x0": 2}), final
    assert len(failure_lines(job, 1)) == 1 and len(failure_lines(job, 2)) == 1


def test_sigterm_to_supervisor_stops_every_child(jobs):
    job = jobs(["--nproc-per-node", "2", "--spares", "1", "--term-timeout-s", "1"],
               ["--steps", "1000", "--ignore-term", "n0.w1"])
    job.at_step("n0.w1", 3)
    pids = [job.pid(s) for s in ("n0.w0", "n0.w1", "n0.s0")]
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish(timeout=15) == 128 + signal.SIGTERM
    print(f"\n[SIGTERM] supervisor stopped 3 children (one ignoring SIGTERM) in {time.monotonic() - t0:.2f} s")
    assert not [p for p in pids if alive(p)]


def test_sigkill_to_supervisor_leaves_no_orphans(jobs):
    job = jobs(["--nproc-per-node", "2"], ["--steps", "1000"])
    job.at_step("n0.w0", 2)
    pids = [job.pid(s) for s in ("n0.w0", "n0.w1")]
    os.kill(job.proc.pid, signal.SIGKILL)
    job.proc.wait()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)]


def test_plain_env_init_script_runs_unchanged(jobs):
    """A script that ignores the agent (env:// init_process_group) still runs under fftrainer-launch."""
    job = jobs(["--nproc-per-node", "2"], script=PLAIN_WORKER)
    assert job.finish() == 0, job.log()
    assert sorted(r["value"] for r in job.records()) == [3.0, 3.0]


def test_not_under_supervisor_outside_the_launcher(monkeypatch):
    monkeypatch.delenv("FFTRAINER_SLOT", raising=False)
    assert not membership.under_supervisor()
    with pytest.raises(RuntimeError, match="fftrainer-launch"):
        membership.Agent.from_env()


@pytest.mark.parametrize("flags,text", [
    (["--heartbeat-interval-s", "3", "--heartbeat-timeout-s", "3"],
     "--heartbeat-interval-s (3.0) must be smaller than --heartbeat-timeout-s (3.0)"),
    (["--heartbeat-interval-s", "0"], "--heartbeat-interval-s must be > 0 (got 0.0)"),
    (["--collective-timeout-s", "nan"], "--collective-timeout-s must be > 0 (got nan)"),
    (["--nnodes", "2", "--node-rank", "1", "--master-port", "0"], "--master-port is required"),
])
def test_bad_flags_are_refused_by_name(flags, text, capsys):
    with pytest.raises(SystemExit) as info:
        launch.parse_args([*flags, "train.py"])
    assert info.value.code == 2 and text in capsys.readouterr().err


def test_launcher_imports_neither_deepspeed_nor_torch_distributed():
    code = ("import sys, fftrainer_ds.launch; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    assert out.strip() == "[]", out


def test_records_keep_their_wire_strings():
    rs = P.RankSlot("n0.x0", 0, "h", None, P.SlotKind.RESTART, 1)
    info = P.GenerationInfo(2, 2, {1: rs}, [1], ["n0.w1"], {1: "killed"}, 1.0, 0.5, P.GenReason.FAILURE, 1)
    wire = json.loads(info.to_json())
    assert wire["reason"] == "failure" and wire["ranks"]["1"]["kind"] == "restart"
    back = P.GenerationInfo.from_json(info.to_json().encode())
    assert back == info and back.reason is P.GenReason.FAILURE and back.ranks[1].kind is P.SlotKind.RESTART
    ev = P.NodeEvent(P.EventKind.EXIT, "n0.w0", 0, "h", 7, 1.0, 0, "finished")
    assert json.loads(ev.to_json())["kind"] == "exit" and P.NodeEvent.from_json(ev.to_json()) == ev
    assert P.encode_state(P.JobState.FAILED, "a: b") == "failed: a: b"
    assert P.decode_state(b"failed: a: b") == (P.JobState.FAILED, "a: b")
    with pytest.raises(ValueError):
        P.NodeEvent.from_dict(dict(json.loads(ev.to_json()), kind="vanished"))
    with pytest.raises(ValueError):
        P.decode_state(b"paused")
    assert P.node_event_key(1, 4) == "ff/node/1/ev/4" and P.restart_slot(0, 2) == "n0.x2"
