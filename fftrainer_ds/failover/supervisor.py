"""The supervisor of one node (the failure detector of fftrainer-launch): spawn the children, see them
exit or hang, post what happened; `Coordinator` (coordinator.py, node 0 only) decides what follows.

`NodeSupervisor.poll()` is called every ~20 ms by the launcher's loop (launch.py). It reaps exited children
(`Popen.poll`), checks heartbeat counters (``ff/hb/{slot}``) against its own monotonic clock, SIGKILLs
a child whose heartbeat is older than `heartbeat_timeout_s`, and posts one `NodeEvent` per child
outcome to ``ff/node/{n}/ev/{i}``. It also follows the published generations: it spawns the restarted
replacements assigned to this node and kills any of its children that a generation lists as failed.
It keeps `nspares` idle hot spares: when a spare is given a rank or is lost, it spawns a new one (slot
``n{node}.s{i}`` with the next index) and posts a SPARE event so that the coordinator can hand it out.

Children run in their own process group (so a terminal Ctrl-C reaches only the supervisor, and
killpg also reaches their own children) and, on Linux, get SIGKILL if the supervisor dies
(PR_SET_PDEATHSIG): no orphans whatever happens to the supervisor.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import protocol as P

log = logging.getLogger("fftrainer_ds.launch")

_HB_CHECK_S = 0.1
_GEN_CHECK_S = 0.05


@dataclass
class Child:
    slot: str
    kind: P.SlotKind
    local_rank: int
    proc: subprocess.Popen
    rank: Optional[int] = None       # None for an unassigned spare
    hb_value: int = 0
    hb_at: float = field(default_factory=time.monotonic)
    declared: Optional[str] = None   # set once its failure has been posted (posted once only)
    reported: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def _pdeathsig_preexec():
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
        if os.getppid() != parent:    # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


class NodeSupervisor:
    """The children of one node and what happens to them."""

    def __init__(self, store, node: int, host: str, cmd: List[str], nproc: int, nspares: int, job: P.JobSpec,
                 store_addr: str, store_port: int, env: Optional[Dict[str, str]] = None):
        self.store, self.node, self.host, self.cmd = store, node, host, cmd
        self.nproc, self.nspares, self.job = nproc, nspares, job
        self.store_addr, self.store_port = store_addr, store_port
        self.base_env = dict(os.environ if env is None else env)
        self.children: Dict[str, Child] = {}
        self.nev = 0
        self.generation = -1
        self._preexec = _pdeathsig_preexec()
        self._next_hb_check = 0.0
        self._next_gen_check = 0.0
        self.info: Optional[P.GenerationInfo] = None     # the latest generation followed
        self.next_spare = nspares                        # index of the next replenishing spare slot
        # Spares spawned after the start: at most --max-restarts, the most replacements the job may use, so a
        # script whose spares keep dying at start-up cannot make the supervisor respawn them forever.
        self.spares_replenished = 0
        self._said_no_spare = False

    # --- spawning -----------------------------------------------------------------------------------
    def _env(self, slot: str, local_rank: int, rank: Optional[int], spare_id: Optional[int],
             replacement: bool) -> Dict[str, str]:
        env = dict(self.base_env)
        for k in ("RANK", P.ENV_SPARE_ID, P.ENV_REPLACEMENT):
            env.pop(k, None)
        j = self.job
        env.update({
            "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(j.world_size), "LOCAL_WORLD_SIZE": str(j.nproc_per_node),
            "MASTER_ADDR": self.store_addr, "MASTER_PORT": str(self.store_port),
            "CROSS_SIZE": str(j.nnodes), "CROSS_RANK": str(self.node), "GROUP_RANK": str(self.node),
            # env:// init in a script that ignores the agent then connects to our store instead of hosting one
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            P.ENV_SLOT: slot, P.ENV_NODE_RANK: str(self.node),
            P.ENV_STORE_ADDR: self.store_addr, P.ENV_STORE_PORT: str(self.store_port),
            P.ENV_SUPERVISOR_PID: str(os.getpid()),
            P.ENV_HEARTBEAT_INTERVAL_S: repr(j.heartbeat_interval_s),
            P.ENV_HEARTBEAT_TIMEOUT_S: repr(j.heartbeat_timeout_s),
            P.ENV_COLLECTIVE_TIMEOUT_S: repr(j.collective_timeout_s),
        })
        env.setdefault("OMP_NUM_THREADS", "1")
        if rank is not None:
            env["RANK"] = str(rank)
        if spare_id is not None:
            env[P.ENV_SPARE_ID] = str(spare_id)
        if replacement:
            env[P.ENV_REPLACEMENT] = "1"
        return env

    def spawn(self, slot: str, kind: P.SlotKind, local_rank: int, rank: Optional[int] = None,
              spare_id: Optional[int] = None) -> Child:
        env = self._env(slot, local_rank, rank, spare_id, replacement=(kind is P.SlotKind.RESTART))
        proc = subprocess.Popen(self.cmd, env=env, start_new_session=True, preexec_fn=self._preexec)
        child = Child(slot, kind, local_rank, proc, rank)
        self.children[slot] = child
        self.store.set(P.slot_key(slot), P.SlotInfo(proc.pid, self.node, self.host).to_json())
        log.info("spawned slot=%s kind=%s rank=%s local_rank=%d pid=%d", slot, kind, rank, local_rank, proc.pid)
        return child

    def start(self) -> None:
        """Spawn the workers and spares, then register them at ``ff/node/{n}``."""
        for i in range(self.nproc):
            self.spawn(P.worker_slot(self.node, i), P.SlotKind.WORKER, i, rank=self.node * self.nproc + i)
        for s in range(self.nspares):
            self.spawn(P.spare_slot(self.node, s), P.SlotKind.SPARE, self.nproc + s, spare_id=s)
        self.store.set(P.node_nev_key(self.node), "0")
        slots = {c.slot: P.RegisteredSlot(c.kind, c.pid, c.local_rank, c.rank) for c in self.children.values()}
        self.store.set(P.node_key(self.node), P.NodeRegistration(self.host, os.getpid(), self.nproc, slots).to_json())

    # --- detection ----------------------------------------------------------------------------------
    def poll(self) -> None:
        self.store.add(P.node_hb_key(self.node), 1)
        now = time.monotonic()
        if now >= self._next_gen_check:
            self._next_gen_check = now + _GEN_CHECK_S
            self._follow_generations()
        for child in list(self.children.values()):
            if not child.reported:
                rc = child.proc.poll()
                if rc is not None:
                    self._exited(child, rc)
        if now >= self._next_hb_check:
            self._next_hb_check = now + _HB_CHECK_S
            self._check_heartbeats(now)
        self._replenish_spares()

    def _post(self, ev: P.NodeEvent) -> None:
        self.store.set(P.node_event_key(self.node, self.nev), ev.to_json())
        self.nev += 1
        self.store.set(P.node_nev_key(self.node), str(self.nev))

    def _event(self, child: Child, kind: P.EventKind, rc: Optional[int], cause: str) -> P.NodeEvent:
        return P.NodeEvent(kind, child.slot, self.node, self.host, child.pid, time.time(), rc, cause)

    def _exited(self, child: Child, rc: int) -> None:
        child.reported = True
        _killpg(child.pid, signal.SIGKILL)          # whatever it left in its process group
        if child.declared is not None:
            return
        if rc == 0:
            self._post(self._event(child, P.EventKind.EXIT, 0, "finished"))
            return
        cause = describe_exit(rc)
        key = P.slot_error_key(child.slot)
        if rc > 0 and self.store.check([key]):
            cause += f": uncaught {self.store.get(key).decode()}"
        child.declared = cause
        self._post(self._event(child, P.EventKind.FAILURE, rc, cause))

    def _check_heartbeats(self, now: float) -> None:
        timeout = self.job.heartbeat_timeout_s
        for child in self.children.values():
            if child.reported or child.declared is not None:
                continue
            value = int(self.store.add(P.heartbeat_key(child.slot), 0))
            if value != child.hb_value:
                child.hb_value, child.hb_at = value, now
            elif value > 0 and now - child.hb_at > timeout:   # not checked before its first heartbeat
                if not self.store.check([P.slot_finished_key(child.slot)]):
                    cause = f"hung: no heartbeat for {now - child.hb_at:.2f} s (timeout {timeout} s); SIGKILLed"
                    self.kill(child, cause)
                elif now - child.hb_at > self.job.collective_timeout_s:
                    log.warning("slot=%s pid=%d finished but did not exit within %.0f s: SIGKILL", child.slot,
                                child.pid, self.job.collective_timeout_s)
                    child.declared = "finished"
                    self._post(self._event(child, P.EventKind.EXIT, 0, "finished; SIGKILLed at exit"))
                    _killpg(child.pid, signal.SIGKILL)

    def kill(self, child: Child, cause: str, post: bool = True) -> None:
        """Declare `child` failed for `cause` (posted once, unless `post` is False) and SIGKILL it."""
        if child.declared is None:
            child.declared = cause
            if post:
                self._post(self._event(child, P.EventKind.FAILURE, None, cause))
        _killpg(child.pid, signal.SIGKILL)

    # --- generations --------------------------------------------------------------------------------
    def _follow_generations(self) -> None:
        if not self.store.check([P.GEN]):
            return
        g = int(self.store.get(P.GEN))
        if g <= self.generation:
            return
        info = P.GenerationInfo.from_json(self.store.get(P.gen_key(g)))
        self.generation, self.info = g, info
        for slot in info.failed_slots:
            child = self.children.get(slot)
            if child is not None and not child.reported:
                self.kill(child, f"declared failed by the coordinator in generation {g}", post=False)
        for rank, rs in info.ranks.items():
            if rs.node != self.node:
                continue
            child = self.children.get(rs.slot)
            if child is None and rs.kind is P.SlotKind.RESTART:
                self.spawn(rs.slot, P.SlotKind.RESTART, rs.local_rank, rank=rank)
            elif child is not None:
                child.rank = rank

    # --- spares -------------------------------------------------------------------------------------
    def idle_spares(self) -> List[Child]:
        """Spares that hold no rank and have not failed (warming up or ready)."""
        return [c for c in self.children.values()
                if c.kind is P.SlotKind.SPARE and c.rank is None and c.declared is None and not c.reported]

    def _replenish_spares(self) -> None:
        if self.info is None or len(self.idle_spares()) >= self.nspares:
            return
        if self.spares_replenished >= self.job.max_restarts:
            if not self._said_no_spare:
                self._said_no_spare = True
                log.warning("node %d: %d spares spawned since the start (--max-restarts): no new spare",
                            self.node, self.spares_replenished)
            return
        i, self.next_spare = self.next_spare, self.next_spare + 1
        self.spares_replenished += 1
        child = self.spawn(P.spare_slot(self.node, i), P.SlotKind.SPARE, self._free_local_rank(i), spare_id=i)
        self._post(P.NodeEvent(P.EventKind.SPARE, child.slot, self.node, self.host, child.pid, time.time(),
                               cause="hot spare spawned", local_rank=child.local_rank))

    def _free_local_rank(self, spare_index: int) -> int:
        """The lowest local rank no live child and no rank of this node holds: a failed child's local rank is
        reused, so local ranks stay below nproc + nspares (one device each on a GPU node)."""
        taken = {c.local_rank for c in self.children.values() if c.declared is None and not c.reported}
        taken |= {rs.local_rank for rs in self.info.ranks.values() if rs.node == self.node}
        free = [r for r in range(self.nproc + self.nspares) if r not in taken]
        return free[0] if free else self.nproc + spare_index

    # --- stopping -----------------------------------------------------------------------------------
    def live(self) -> List[Child]:
        return [c for c in self.children.values() if c.alive()]

    def stop_spares(self, grace_s: float) -> None:
        self.stop(grace_s, [c for c in self.children.values() if c.rank is None])

    def stop(self, grace_s: float, children: Optional[List[Child]] = None) -> None:
        """SIGTERM each live child's process group, SIGKILL whatever is left after `grace_s`, reap all."""
        targets = [c for c in (self.children.values() if children is None else children) if c.alive()]
        for c in targets:
            c.declared = c.declared or "stopped by the supervisor"
            _killpg(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(c.alive() for c in targets) and time.monotonic() < deadline:
            time.sleep(0.02)
        for c in targets:
            _killpg(c.pid, signal.SIGKILL)
        for c in targets:
            c.proc.wait()
            c.reported = True


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
