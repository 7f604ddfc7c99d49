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

Exceptions inside the engine's calls are requested through a fault file the training script watches
(examples/train_gpt.py ``--fault-file``): `request_fault(path, FaultRequest(rank, step, Where.BACKWARD))`
appends ``rank R step S where backward``; the process holding rank R at step S raises `InjectedFault`
from inside that call (`FaultFile`, the script's side), once per request; `served_at` says when.
"""
from __future__ import annotations

import enum
import faulthandler
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..failover import protocol as P
from ..secret import write_secret_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class SpareState:
    """A hot spare that holds no rank: `warm` once its warm-up ended (its heartbeats start at join)."""
    slot: str
    pid: int
    warm: bool


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
        if nnodes > 1:  # the nodes of one job share its secret: a 0600 file in the job's output directory
            args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
                     "--master-port", str(0 if master_port is None else master_port),
                     "--secret-file", write_secret_file(os.path.join(out_dir, "job.secret"))]
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

    def spares(self) -> List[SpareState]:
        """The live spares that hold no rank in the latest generation, warming up or warm."""
        held = {rs.slot for rs in self.generation_info().ranks.values()}
        found = re.findall(r"spawned slot=(\S+) kind=spare .*? pid=(\d+)", self.log())
        return [SpareState(slot, int(pid), int(self.store().add(P.heartbeat_key(slot), 0)) > 0)
                for slot, pid in found if slot not in held and pid_alive(int(pid))]

    # ---- faults -----------------------------------------------------------------------------
    def signal_rank(self, rank: int, sig: int) -> int:
        pid = self.pid_of(rank)
        os.kill(pid, sig)
        return pid

    def dump_stacks(self) -> None:
        """SIGUSR1 to every live process of the job: those that run a `FaultFile` write their Python stacks
        to the launcher log (faulthandler); others may die of it, so only for a job that is being given up."""
        for pid in self.spawned_pids():
            if pid_alive(pid):
                os.kill(pid, signal.SIGUSR1)
                time.sleep(0.5)     # one at a time: they all write to the one launcher log

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


@dataclass
class Observed:
    """What a `JobWatch` saw of a job's coordination store so far."""
    world: int
    gen: int = -1
    infos: Dict[int, P.GenerationInfo] = field(default_factory=dict)
    events: List[P.NodeEvent] = field(default_factory=list)
    first: Dict[Tuple[int, int], P.Progress] = field(default_factory=dict)  # (rank, generation) -> first seen there
    last: Dict[int, P.Progress] = field(default_factory=dict)
    high: Dict[int, int] = field(default_factory=dict)          # generation -> highest step any rank completed in it

    def copy(self) -> "Observed":
        return Observed(self.world, self.gen, dict(self.infos), list(self.events), dict(self.first), dict(self.last),
                        dict(self.high))

    def resumed_in(self, gen_before: int, slots: Sequence[str], steps: int, step: int = 0) -> Optional[int]:
        """The generation the job resumed in after `slots` were hurt in generation `gen_before`, once every
        rank has completed `steps` steps there (None until then). Rank holders must be declared failed
        by a generation; spares (no generation lists them) by their supervisor's event, and if no
        generation followed, every rank must be `steps` past `step` (then: `gen_before`)."""
        if gen_before not in self.infos or len(self.last) < self.world:
            return None
        failed = {s for g in range(gen_before + 1, self.gen + 1) for s in self.infos[g].failed_slots}
        held = {rs.slot for rs in self.infos[gen_before].ranks.values()}
        dead = {e.slot for e in self.events if e.kind is P.EventKind.FAILURE}
        if any(s not in failed and (s in held or s not in dead) for s in slots):
            return None
        if self.gen == gen_before:
            return gen_before if all(pr.step >= step + steps for pr in self.last.values()) else None
        done = all(pr.gen == self.gen and pr.step >= self.first[(r, self.gen)].step + steps - 1
                   for r, pr in self.last.items())
        return self.gen if done else None


class JobWatch:
    """Follows a LaunchedJob's coordination store from a thread, every `period_s` (``ff/progress/{rank}``
    keeps only the latest step, so a test that waits elsewhere would miss the first one of a generation);
    `view()` is a consistent copy of what it saw."""

    def __init__(self, job: LaunchedJob, world: int, nnodes: int = 1, period_s: float = 0.01):
        self.job, self.nnodes, self.period_s = job, nnodes, period_s
        self._seen = Observed(world)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-watch", daemon=True)

    def __enter__(self) -> "JobWatch":
        self._store = dist.TCPStore("127.0.0.1", self.job.port(), is_master=False, timeout=timedelta(seconds=5))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def view(self) -> Observed:
        with self._lock:
            return self._seen.copy()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._poll()
            except (RuntimeError, ValueError):   # the store is gone with the supervisor, or a key is half set
                if self.job.proc is None or self.job.proc.poll() is not None:
                    return

    def _poll(self) -> None:
        s, seen = self._store, self._seen
        g = int(s.get(P.GEN)) if s.check([P.GEN]) else -1
        infos = {i: P.GenerationInfo.from_json(s.get(P.gen_key(i))) for i in range(seen.gen + 1, g + 1)}
        events = []
        for n in range(self.nnodes):
            count = int(s.get(P.node_nev_key(n))) if s.check([P.node_nev_key(n)]) else 0
            done = sum(1 for e in seen.events if e.node == n)
            events += [P.NodeEvent.from_json(s.get(P.node_event_key(n, i))) for i in range(done, count)]
        keys = [P.progress_key(r) for r in range(seen.world)]
        progress = {r: P.Progress.from_json(s.get(k)) for r, k in enumerate(keys) if s.check([k])}
        with self._lock:
            seen.infos.update(infos)
            seen.gen = max(seen.gen, g)
            seen.events += events
            for r, pr in progress.items():
                seen.first.setdefault((r, pr.gen), pr)
                seen.last[r] = pr
                seen.high[pr.gen] = max(pr.step, seen.high.get(pr.gen, 0))


# ---- exceptions inside the engine's calls, requested through a file ---------------------------------
class Where(str, enum.Enum):
    FORWARD = "forward"      # a forward hook on the model
    BACKWARD = "backward"    # a hook on the loss tensor, run by autograd inside engine.backward
    STEP = "step"            # an optimizer step pre-hook, inside engine.step


class InjectedFault(Exception):
    """Raised on request; not a RuntimeError, so the engine never mistakes it for a peer's failure."""


@dataclass(frozen=True)
class FaultRequest:
    rank: int
    step: int                # the step being computed (engine.global_steps + 1)
    where: Where

    def line(self) -> str:
        return f"rank {self.rank} step {self.step} where {self.where.value}"

    @classmethod
    def parse(cls, line: str) -> "FaultRequest":
        m = re.fullmatch(r"rank (\d+) step (\d+) where (\w+)", line.strip())
        if m is None:
            raise ValueError(f"not a fault request: {line!r}")
        return cls(int(m.group(1)), int(m.group(2)), Where(m.group(3)))

    def marker(self, path: str) -> str:
        return f"{path}.served.rank{self.rank}.step{self.step}.{self.where.value}"


def request_fault(path: str, req: FaultRequest) -> None:
    with open(path, "a") as f:
        f.write(req.line() + "\n")


def served_at(path: str, req: FaultRequest) -> Optional[float]:
    """time.time() at which a process raised for `req`, None while it has not."""
    try:
        with open(req.marker(path)) as f:
            return float(f.read())
    except FileNotFoundError:
        return None


class FaultFile:
    """The training script's side of the fault file: call `arm(engine, step)` before each forward and
    `watch_loss(loss)` before each backward. A request is served once by whichever process holds its
    rank at its step: the marker file, created exclusively before raising, keeps a replacement that
    replays the step (or a second process) from raising again."""

    def __init__(self, path: str):
        # Create it before initialize (spares wait inside): then `LaunchedJob.dump_stacks()` shows where
        # every process of the job is, e.g. when a recovery does not end.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.path, self._size, self.requests = path, 0, []
        self.armed: Optional[FaultRequest] = None
        self._hooked: Optional[torch.nn.Module] = None
        register_optimizer_step_pre_hook(lambda *_: self._fire(Where.STEP))

    def arm(self, engine, step: int) -> None:
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if size != self._size:      # requests are only appended
            with open(self.path) as f:
                self.requests = [FaultRequest.parse(ln) for ln in f if ln.endswith("\n")]
            self._size = size
        rank = engine.global_rank
        self.armed = next((r for r in self.requests if (r.rank, r.step) == (rank, step)
                           and not os.path.exists(r.marker(self.path))), None)
        if engine.module is not self._hooked:          # a recovery rebuilds the module from a template
            self._hooked = engine.module
            engine.module.register_forward_hook(lambda *_: self._fire(Where.FORWARD))

    def watch_loss(self, loss: torch.Tensor) -> None:
        if self.armed is not None and self.armed.where is Where.BACKWARD and loss.requires_grad:
            loss.register_hook(lambda grad: self._fire(Where.BACKWARD))

    def _fire(self, where: Where) -> None:
        req = self.armed
        if req is None or req.where is not where:
            return
        self.armed = None
        marker = req.marker(self.path)
        tmp = f"{marker}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(repr(time.time()))
        try:
            os.link(tmp, marker)        # atomic and exclusive: the marker appears with its time in it
        except FileExistsError:
            return
        finally:
            os.unlink(tmp)
        raise InjectedFault(f"injected fault: {req.line()}")
