"""Fault injection from outside: launch a job under fftrainer-launch, then kill, stop or break ranks.

    job = LaunchedJob("train.py", ["--steps", "30"], nproc_per_node=4, spares=1, out_dir=tmp)
    job.start()
    job.wait_step(rank=0, step=8)        # the job's progress, from the coordination store
    job.signal_rank(1, signal.SIGKILL)   # the process that holds rank 1 *now* (spares included)
    assert job.wait() == 0
    job.stop()                           # always: SIGTERM the supervisor, then no process may be left

It reads the supervisor's coordination store (``ff/gen``, ``ff/gen/{g}``, ``ff/progress/{rank}``;
see fftrainer_ds/failover/protocol.py) to find which pid holds a rank in the latest generation,
so a test can aim at rank 0, at a replacement, or at two ranks at once.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence

import torch.distributed as dist

from ..failover import protocol as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


class LaunchedJob:
    """One `fftrainer-launch` (one node) of a job, with helpers to observe and hurt its ranks."""

    def __init__(self, script: str, script_args: Sequence[str] = (), *, nproc_per_node: int = 2,
                 spares: int = 0, out_dir: str, nnodes: int = 1, node_rank: int = 0,
                 master_port: Optional[int] = None, max_restarts: Optional[int] = None,
                 heartbeat_timeout_s: float = 2.0, collective_timeout_s: float = 10.0, name: str = "",
                 env: Optional[Dict[str, str]] = None):
        self.script, self.script_args, self.out_dir = script, list(script_args), out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.log_path = os.path.join(out_dir, f"launcher{name}.log")
        args = ["--nproc-per-node", str(nproc_per_node), "--spares", str(spares),
                "--heartbeat-timeout-s", str(heartbeat_timeout_s),
                "--heartbeat-interval-s", str(min(0.5, heartbeat_timeout_s / 4)),
                "--collective-timeout-s", str(collective_timeout_s)]
        if nnodes > 1:
            args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
                     "--master-port", str(0 if master_port is None else master_port)]
        if max_restarts is not None:
            args += ["--max-restarts", str(max_restarts)]
        self.cmd = [sys.executable, "-m", "fftrainer_ds.launch", *args, script, *self.script_args]
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                        OMP_NUM_THREADS="1", **(env or {}))
        self.proc: Optional[subprocess.Popen] = None
        self._store = None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "LaunchedJob":
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        return self

    def wait(self, timeout_s: float = 180) -> int:
        """The supervisor's exit code (0: every rank finished)."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job did not finish within {timeout_s} s:\n{self.log()[-6000:]}") from None

    def stop(self) -> None:
        """SIGTERM the supervisor (it stops its children), SIGKILL after 10 s; then check for orphans."""
        if self.proc is None:
            return
        self._store = None  # the supervisor's store goes away with it
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + 10
        while self.orphans() and time.monotonic() < deadline:
            time.sleep(0.05)

    def orphans(self) -> List[int]:
        """pids the supervisor spawned that are still alive."""
        return [p for p in self.spawned_pids() if pid_alive(p)]

    # ---- observation ------------------------------------------------------------------------
    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def spawned_pids(self) -> List[int]:
        return [int(p) for p in re.findall(r"spawned slot=\S+ .*? pid=(\d+)", self.log())]

    def port(self, timeout_s: float = 60) -> int:
        m = self._until(lambda: re.search(r"store listening on \S+:(\d+)", self.log()), timeout_s, "store port")
        return int(m.group(1))

    def store(self):
        if self._store is None:
            self._store = dist.TCPStore("127.0.0.1", self.port(), is_master=False, timeout=timedelta(seconds=5))
        return self._store

    def generation(self) -> int:
        s = self.store()
        return int(s.get(P.GEN)) if s.check([P.GEN]) else -1

    def generation_info(self, g: Optional[int] = None) -> P.GenerationInfo:
        g = self.generation() if g is None else g
        return P.GenerationInfo.from_json(self.store().get(P.gen_key(g)))

    def progress(self, rank: int) -> int:
        s = self.store()
        key = P.progress_key(rank)
        return P.Progress.from_json(s.get(key)).step if s.check([key]) else 0

    def wait_step(self, rank: int, step: int, timeout_s: float = 120) -> None:
        self._until(lambda: self.progress(rank) >= step, timeout_s, f"rank {rank} to reach step {step}")

    def wait_generation(self, g: int, timeout_s: float = 60) -> None:
        self._until(lambda: self.generation() >= g, timeout_s, f"generation {g}")

    def pid_of(self, rank: int) -> int:
        """pid of the process holding `rank` in the latest generation."""
        def lookup():
            info = self.generation_info()
            rs = info.ranks[rank]
            if rs.pid:
                return rs.pid
            key = P.slot_key(rs.slot)
            return P.SlotInfo.from_json(self.store().get(key)).pid if self.store().check([key]) else None
        return self._until(lookup, 30, f"pid of rank {rank}")

    # ---- faults -----------------------------------------------------------------------------
    def signal_rank(self, rank: int, sig: int) -> int:
        pid = self.pid_of(rank)
        os.kill(pid, sig)
        return pid

    def signal_ranks(self, ranks: Sequence[int], sig: int) -> List[int]:
        """Signal several ranks back to back (their pids looked up first: "at once")."""
        pids = [self.pid_of(r) for r in ranks]
        for p in pids:
            os.kill(p, sig)
        return pids

    def _until(self, pred: Callable, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = pred()
            except (RuntimeError, KeyError, ValueError):
                value = None  # store not up yet / generation not published yet
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) waiting for {what}:\n"
                                     f"{self.log()[-6000:]}")
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}:\n{self.log()[-6000:]}")
