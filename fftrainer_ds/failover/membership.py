"""Worker side of fftrainer-launch: heartbeats, generations, and the default process group per generation.

Call order inside a worker (the engine does this; see docs/LAUNCH.md)::

    agent = membership.join()                  # connect, start heartbeats + watcher; spares block here
    agent.rebuild_default_group(agent.generation)   # default group on PrefixStore("gen{g}", store)
    while training:
        agent.check()                          # raises GenerationChanged at a step boundary
        try:
            ... step ...; agent.report_progress(step)
        except Exception as exc:               # a collective raised (peer died) or timed out
            g = agent.handle_collective_error(exc)   # report, wait for the next generation
            agent.rebuild_default_group(g)     # may raise GenerationChanged again: loop (or agent.recover)
    agent.finish()

Two store connections: the heartbeat/watcher thread has its own, so a main thread blocked in a
store wait (e.g. gloo's rendezvous) never delays heartbeats.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch.distributed as dist

from ..errors import RecoverableError, TerminalError
from . import protocol as P

_POLL_S = 0.02
log = logging.getLogger("fftrainer_ds")
# Generations `Agent._form` tries before giving up. Each try ends only when the group formed or a newer
# generation was published, and every generation costs a failure or a regroup: more than this many in a
# row means the job is not converging, and the coordinator's --max-restarts would stop it soon anyway.
MAX_FORM_ATTEMPTS = 16


class GenerationChanged(RecoverableError):
    """A newer generation was published: abandon the work in flight and regroup at `generation`."""

    def __init__(self, generation: int, msg: str = ""):
        super().__init__(msg or f"generation {generation} was published")
        self.generation = generation


def under_supervisor() -> bool:
    """True in a process started by fftrainer-launch (False under `deepspeed`, torchrun, run_ranks)."""
    return P.ENV_SLOT in os.environ


@dataclass
class Assignment:
    rank: int
    world_size: int
    generation: int


class Agent:
    """One per worker process. Create with `Agent.from_env()` (or `join()`), then `start()`, `join()`."""

    def __init__(self, store_addr: str, store_port: int, slot: str, node: int, spare_id: Optional[int],
                 replacement: bool, heartbeat_interval_s: float, heartbeat_timeout_s: float,
                 collective_timeout_s: float):
        self.slot, self.node, self.spare_id, self.replacement = slot, node, spare_id, replacement
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self._addr, self._port = store_addr, store_port
        self.store = self._connect()                    # main thread's connection
        self._bg_store = self._connect()                # heartbeat/watcher thread's connection
        self.rank: Optional[int] = None
        self.world_size: int = 0
        self.generation: int = -1                       # generation this process is (or was last) in
        self.info: Optional[P.GenerationInfo] = None    # GenerationInfo of self.generation
        self._latest = -1                               # newest generation seen by the watcher
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._callbacks: List[Callable[[int], None]] = []
        self._backend: Optional[str] = None
        self.crashed = False                            # set by the uncaught-exception hook

    @classmethod
    def from_env(cls) -> "Agent":
        if not under_supervisor():
            raise RuntimeError(f"not started by fftrainer-launch ({P.ENV_SLOT} is not set)")
        env = os.environ
        spare = env.get(P.ENV_SPARE_ID)
        return cls(env[P.ENV_STORE_ADDR], int(env[P.ENV_STORE_PORT]), env[P.ENV_SLOT], int(env[P.ENV_NODE_RANK]),
                   int(spare) if spare is not None else None, env.get(P.ENV_REPLACEMENT) == "1",
                   float(env[P.ENV_HEARTBEAT_INTERVAL_S]), float(env[P.ENV_HEARTBEAT_TIMEOUT_S]),
                   float(env[P.ENV_COLLECTIVE_TIMEOUT_S]))

    def _connect(self) -> dist.TCPStore:
        return dist.TCPStore(self._addr, self._port, is_master=False,
                             timeout=timedelta(seconds=max(60.0, self.collective_timeout_s)))

    # --- heartbeat and generation watcher -----------------------------------------------------------
    def start(self) -> "Agent":
        """Start the heartbeat/watcher thread (idempotent); install the uncaught-exception reporter."""
        if self._thread is None:
            self._install_excepthook()
            self._beat()
            self._thread = threading.Thread(target=self._run, name="fftrainer-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        self._bg_store.add(P.heartbeat_key(self.slot), 1)

    def _run(self) -> None:
        poll = min(0.1, self.heartbeat_interval_s)
        next_beat = time.monotonic() + self.heartbeat_interval_s
        while not self._stop.wait(poll):
            try:
                now = time.monotonic()
                if now >= next_beat:
                    self._beat()
                    next_beat = now + self.heartbeat_interval_s
                self._observe(self._read_gen(self._bg_store))
            except Exception:  # store briefly unreachable: the supervisor decides what that means
                continue

    @staticmethod
    def _read_gen(store: dist.TCPStore) -> int:
        return int(store.get(P.GEN)) if store.check([P.GEN]) else -1

    def _observe(self, g: int) -> None:
        if g > self._latest:
            with self._cond:
                self._latest = g
                self._cond.notify_all()
            for cb in list(self._callbacks):
                try:
                    cb(g)
                except Exception:
                    traceback.print_exc()

    def on_generation(self, callback: Callable[[int], None]) -> None:
        """Call `callback(g)` from the watcher thread when generation g is seen (e.g. to abort NCCL)."""
        self._callbacks.append(callback)

    @property
    def latest_generation(self) -> int:
        return self._latest

    def _install_excepthook(self) -> None:
        prev = sys.excepthook

        def hook(tp, value, tb):
            self.crashed = True  # the atexit finish() that follows must not report "finished"
            try:
                self.store.set(P.slot_error_key(self.slot), f"{tp.__name__}: {value}"[:500])
            except Exception:
                pass
            prev(tp, value, tb)

        sys.excepthook = hook

    # --- membership -----------------------------------------------------------------------------------
    def join(self, timeout_s: Optional[float] = None) -> Assignment:
        """Block until this process's slot holds a rank in the latest generation (spares wait here).

        Sets RANK and WORLD_SIZE in os.environ. Does not create a process group.
        """
        self.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen = -1
        while True:
            g = self.wait_for_generation(after=seen, timeout_s=None if deadline is None
                                         else max(0.0, deadline - time.monotonic()))
            info = self._load(g)
            rank = info.rank_of(self.slot)
            if rank is not None:
                self._enter(info, rank)
                return Assignment(rank, info.world_size, g)
            seen = g

    def _load(self, g: int) -> P.GenerationInfo:
        return P.GenerationInfo.from_json(self.store.get(P.gen_key(g)))

    def _enter(self, info: P.GenerationInfo, rank: int) -> None:
        self.info, self.generation, self.rank, self.world_size = info, info.generation, rank, info.world_size
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(info.world_size)

    def nodes(self) -> List[int]:
        """The supervisor node of every rank of the current generation (no communication needed)."""
        return [self.info.ranks[r].node for r in range(self.world_size)]

    def check(self) -> None:
        """Raise GenerationChanged if a generation newer than ours was published.

        Reads ``ff/gen`` from the store (one round trip, ~0.1 ms), not only the watcher's last poll:
        entering a collective of an abandoned generation can block until the collective timeout."""
        self._observe(self._read_gen(self.store))
        if self._latest > self.generation:
            raise GenerationChanged(self._latest)

    def wait_for_generation(self, after: int, timeout_s: Optional[float] = None) -> int:
        """Block until a generation > `after` is published; return the newest one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            g = self._read_gen(self.store)
            self._observe(g)
            if g > after:
                return g
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no generation after {after} within {timeout_s} s")
            with self._cond:
                self._cond.wait(_POLL_S)

    def report_error(self, exc: BaseException) -> None:
        """Tell the coordinator a collective raised or timed out (it regroups if no process failed)."""
        if isinstance(exc, GenerationChanged) or self.rank is None:
            return
        rep = P.ErrorReport(self.rank, self.slot, self.generation, f"{type(exc).__name__}: {exc}"[:300], time.time())
        i = self.store.add(P.ERR_COUNT, 1) - 1
        self.store.set(P.err_key(i), rep.to_json())

    def handle_collective_error(self, exc: BaseException, timeout_s: Optional[float] = None) -> int:
        """After a collective raised: report it, then wait for and return the next generation."""
        self.report_error(exc)
        return self.wait_for_generation(after=self.generation, timeout_s=timeout_s)

    # --- process groups -----------------------------------------------------------------------------
    def rebuild_default_group(self, generation: int, backend: Optional[str] = None,
                              destroy: Optional[Callable[[], None]] = None) -> None:
        """Destroy the default group (if any) and create generation `generation`'s, in this process.

        `destroy` replaces `torch.distributed.destroy_process_group` (pass
        `deepspeed.comm.destroy_process_group` to also drop DeepSpeed's cached group references).

        Waits (interruptibly, through the store) until every rank of the generation has entered it,
        then runs `init_process_group` on `PrefixStore(f"gen{g}", store)`. Raises GenerationChanged if
        a newer generation appears meanwhile, RecoverableError if the group cannot be formed, and
        TerminalError if this process no longer holds a rank (it was declared failed).
        """
        if generation < self._latest:
            raise GenerationChanged(self._latest)
        info = self._load(generation)
        rank = info.rank_of(self.slot)
        if rank is None:
            raise TerminalError(f"slot {self.slot} holds no rank in generation {generation}")
        self._enter(info, rank)
        backend = backend or self._backend or _default_backend()
        if dist.is_initialized():
            try:
                (destroy or dist.destroy_process_group)()
            except Exception:
                try:
                    dist.destroy_process_group()
                except Exception:
                    pass
        self.store.set(P.join_key(generation, rank), self.slot)
        self._wait_keys([P.join_key(generation, r) for r in info.ranks], "join generation", generation)
        _reset_group_names()
        try:
            dist.init_process_group(backend, store=dist.PrefixStore(P.group_prefix(generation), self.store),
                                    rank=rank, world_size=info.world_size,
                                    timeout=timedelta(seconds=self.collective_timeout_s))
        except Exception as exc:
            self.check()
            raise RecoverableError(f"generation {generation}: process group not formed: {exc}") from exc
        self._backend = backend

    def init_process_group(self, backend: Optional[str] = None) -> int:
        """First group of this process, at the generation `join` returned (or a newer one); returns it."""
        return self._form(self.generation, backend)

    def recover(self, exc: Optional[BaseException] = None, backend: Optional[str] = None,
                destroy: Optional[Callable[[], None]] = None) -> int:
        """Report `exc`, wait for the next generation and rebuild the group there, retrying until one
        forms (each further failure moves to the newer generation); returns the generation joined.
        Raises TerminalError after MAX_FORM_ATTEMPTS generations without a group."""
        if exc is not None:
            self.report_error(exc)
        return self._form(self.wait_for_generation(after=self.generation), backend, destroy)

    def _form(self, g: int, backend: Optional[str], destroy: Optional[Callable[[], None]] = None) -> int:
        tried: List[int] = []
        while len(tried) < MAX_FORM_ATTEMPTS:
            tried.append(g)
            try:
                self.rebuild_default_group(g, backend, destroy)
                return g
            except GenerationChanged as err:
                g = err.generation
            except RecoverableError:
                g = self.wait_for_generation(after=g)
        raise TerminalError(f"slot {self.slot}: no process group formed in {len(tried)} generations tried "
                            f"({tried[0]} to {tried[-1]}); giving up")

    def _wait_keys(self, keys: List[str], what: str, generation: int) -> None:
        """Wait for every key, or for a newer generation (GenerationChanged). No deadline of its own: a
        peer that is slow to arrive (a process starting from nothing on a busy machine) is not a failure,
        and one that never arrives is declared failed by the coordinator (its join deadline, derived from
        the measured start time), whose next generation ends this wait. `what` names the wait in logs."""
        slow = time.monotonic() + self.collective_timeout_s
        while not self.store.check(keys):
            self.check()
            if slow is not None and time.monotonic() > slow:
                slow = None
                log.info("slot %s: %s %d: peers still missing after %.0f s; waiting for them or for the "
                         "coordinator's verdict", self.slot, what, generation, self.collective_timeout_s)
            with self._cond:
                self._cond.wait(_POLL_S)
        self.check()

    def allgather(self, name: str, value: Any) -> Dict[int, Any]:
        """Store-based all-gather of a JSON value among the ranks of the current generation.

        Interruptible: raises GenerationChanged if a newer generation appears while waiting. Use a
        new `name` for each exchange within one generation.
        """
        g = self.generation
        self.store.set(P.exchange_key(g, name, self.rank), P.dumps(value))
        keys = [P.exchange_key(g, name, r) for r in range(self.world_size)]
        self._wait_keys(keys, f"allgather {name!r} in generation", g)
        return {r: P.loads(self.store.get(k)) for r, k in enumerate(keys)}

    def report_progress(self, step: int) -> None:
        """Publish the last completed step of this rank (informational; `allgather` agrees on resumes)."""
        self.store.set(P.progress_key(self.rank), P.Progress(step, self.generation, time.time()).to_json())

    def finish(self) -> None:
        """Stop heartbeats; the process should then exit 0 (which the supervisor counts as finished).

        The supervisor stops checking this process's heartbeat but SIGKILLs it if it has not exited
        within collective_timeout_s (teardown of torch and the groups can take a second or two)."""
        if self._stop.is_set():
            return
        try:
            # A process dying of an uncaught exception also runs its atexit finish(): it stops beating but
            # never claims to have finished (one slow to exit would be counted as done, rc 0).
            if not self.crashed:
                self.store.set(P.slot_finished_key(self.slot), "1")
        except Exception:  # the supervisor is gone: nothing left to tell
            pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _reset_group_names() -> None:
    """Number process groups from zero again, as a fresh process does. The default group's rendezvous
    keys carry its name, taken from a process-wide counter; `init_process_group` advances it before
    the rendezvous, so an attempt that timed out (a peer died after it joined) leaves the counter ahead
    with no group behind it, and every later attempt of this process would meet its peers under
    another name, never completing (seen in the soak). With no default group alive, nothing uses the
    counter's past values: each generation has its own store prefix. torch has no public call for it."""
    from torch.distributed import distributed_c10d

    if not dist.is_initialized():
        distributed_c10d._world.group_count = 0


def _default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def join(timeout_s: Optional[float] = None) -> Agent:
    """`Agent.from_env()`, start heartbeats, block until assigned a rank; return the agent."""
    agent = Agent.from_env().start()
    agent.join(timeout_s)
    return agent
