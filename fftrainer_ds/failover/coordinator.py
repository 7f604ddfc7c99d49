"""The coordinator of fftrainer-launch: turns what the node supervisors saw into generations.

It runs inside node 0's supervisor process, which hosts the coordination store; the launcher's loop
calls `Coordinator.poll()` every tick, right after `NodeSupervisor.poll()` (supervisor.py, the
detector of each node). Each poll reads the events every node posted (``ff/node/{n}/ev/{i}``), the
collective errors workers reported (``ff/err/{i}``), the other supervisors' heartbeats and who joined
the current generation; failures become the next generation (``ff/gen/{g}``, then ``ff/gen``), in
which a hot spare or a restarted process holds each failed rank. protocol.py lists every key.
Spares come from the nodes' registrations and, later, from their SPARE events (a supervisor spawns a
new spare for each one given a rank or lost); every replacement, spare or restart, counts against
--max-restarts.

It only receives the store object: no torch.distributed import here, so the launcher reports argument
errors before paying for torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..errors import TerminalError
from . import protocol as P

log = logging.getLogger("fftrainer_ds.launch")

# How long node 0 waits for every node's supervisor to register, and how long the other nodes wait
# for node 0's store to answer.
RENDEZVOUS_TIMEOUT_S = 300.0

Failures = List[Tuple[int, P.NodeEvent]]    # (rank, the event that declared its holder failed)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _failure(rs: P.RankSlot, cause: str) -> P.NodeEvent:
    """The event the coordinator itself declares for a rank whose holder its supervisor cannot report."""
    return P.NodeEvent(P.EventKind.FAILURE, rs.slot, rs.node, rs.host, rs.pid or -1, time.time(), None, cause)


@dataclass
class PendingRegroup:
    """A collective error with no process failure yet: regroup the same processes at `deadline`."""
    deadline: float             # time.monotonic()
    cause: str


class Coordinator:
    """Runs in node 0's supervisor: reads every node's events and publishes generations."""

    def __init__(self, store, job: P.JobSpec):
        self.store, self.job = store, job
        self.gen = -1
        self.info: Optional[P.GenerationInfo] = None
        self.spares: Dict[str, P.RankSlot] = {}
        self.cursor = {n: 0 for n in range(job.nnodes)}
        self.err_cursor = 0
        self.finished: Set[int] = set()
        self.restarts_used = 0
        self.next_restart = 0
        self.state = P.JobState.RUNNING
        self.message = ""
        self.node_hb: Dict[int, Tuple[int, float]] = {}     # node -> (last counter value, monotonic time seen)
        self.lost_nodes: Set[int] = set()
        self.regroup: Optional[PendingRegroup] = None
        self.join_deadlines: Dict[int, float] = {}          # rank -> monotonic time it must have joined by
        self.started = time.monotonic()
        # A survivor stuck in a collective of the old generation gets out at its collective timeout: give
        # it that, plus a margin, before declaring it failed. A restarted process must start from nothing,
        # which takes what generation 0's start took on this machine under its present load (measured).
        self.join_timeout_s = job.collective_timeout_s + job.heartbeat_timeout_s + 2.0
        self.cold_start_s: Optional[float] = None
        # The other nodes' supervisors read the job from here before they spawn anything.
        store.set(P.JOB, job.to_json())
        store.set(P.STATE, P.encode_state(P.JobState.RUNNING))

    # --- start --------------------------------------------------------------------------------------
    def _try_start(self) -> None:
        keys = [P.node_key(n) for n in range(self.job.nnodes)]
        if not self.store.check(keys):
            if time.monotonic() - self.started > RENDEZVOUS_TIMEOUT_S:
                self._terminal(f"only some of the {self.job.nnodes} nodes registered within {RENDEZVOUS_TIMEOUT_S} s")
            return
        ranks: Dict[int, P.RankSlot] = {}
        for n, key in enumerate(keys):
            reg = P.NodeRegistration.from_json(self.store.get(key))
            if reg.nproc != self.job.nproc_per_node:
                return self._terminal(f"node {n} runs {reg.nproc} workers, node 0 {self.job.nproc_per_node}")
            for slot, s in reg.slots.items():
                rs = P.RankSlot(slot, n, reg.host, s.pid, s.kind, s.local_rank)
                if s.rank is None:
                    self.spares[slot] = rs
                else:
                    ranks[s.rank] = rs
            self.node_hb[n] = (-1, time.monotonic())
        self._publish(ranks, [], {}, P.GenReason.START, None)

    # --- the loop -----------------------------------------------------------------------------------
    def poll(self) -> None:
        if self.state is not P.JobState.RUNNING:
            return
        if self.gen < 0:
            return self._try_start()
        failures: Failures = []
        for n in range(self.job.nnodes):
            if n not in self.lost_nodes:
                self._read_events(n, failures)
        self._read_error_reports()
        self._check_nodes(failures)
        self._measure_cold_start()
        self._check_joins(failures)
        if failures:
            self._recover(failures)
        elif self.regroup is not None and time.monotonic() >= self.regroup.deadline:
            log.warning("no process failure followed %s within %.1f s: regrouping the same processes",
                        self.regroup.cause, self.job.heartbeat_timeout_s + 1.0)
            self._publish(dict(self.info.ranks), [], {}, P.GenReason.REGROUP, None)
        if self.state is P.JobState.RUNNING and len(self.finished) == self.job.world_size:
            self.state = P.JobState.DONE
            self.store.set(P.STATE, P.encode_state(P.JobState.DONE))
            log.info("all %d ranks finished", self.job.world_size)

    def _read_events(self, n: int, failures: Failures) -> None:
        count = int(self.store.get(P.node_nev_key(n)))
        while self.cursor[n] < count:
            ev = P.NodeEvent.from_json(self.store.get(P.node_event_key(n, self.cursor[n])))
            self.cursor[n] += 1
            rank = self.info.rank_of(ev.slot)
            if ev.kind is P.EventKind.SPARE:               # a supervisor replenished its spares
                self.spares[ev.slot] = P.RankSlot(ev.slot, ev.node, ev.host, ev.pid, P.SlotKind.SPARE, ev.local_rank)
                log.info("new hot spare slot=%s node=%d pid=%d (%d spares)", ev.slot, ev.node, ev.pid, len(self.spares))
            elif ev.slot in self.spares:
                del self.spares[ev.slot]
                log.warning("spare slot=%s host=%s pid=%d lost: %s (%d spares left)", ev.slot, ev.host, ev.pid,
                            ev.cause, len(self.spares))
            elif rank is None:
                continue                                   # a slot already replaced
            elif ev.kind is P.EventKind.EXIT:
                self.finished.add(rank)
                log.info("rank %d (slot %s) finished", rank, ev.slot)
            else:
                failures.append((rank, ev))

    def _read_error_reports(self) -> None:
        count = int(self.store.add(P.ERR_COUNT, 0))
        while self.err_cursor < count and self.store.check([P.err_key(self.err_cursor)]):
            rep = P.ErrorReport.from_json(self.store.get(P.err_key(self.err_cursor)))
            self.err_cursor += 1
            if rep.generation < self.gen:
                continue                                   # already being recovered
            log.warning("collective error reported by rank %d (slot %s) in generation %d: %s",
                        rep.rank, rep.slot, rep.generation, rep.cause)
            if self.regroup is None:
                self.regroup = PendingRegroup(time.monotonic() + self.job.heartbeat_timeout_s + 1.0,
                                              f"the collective error of rank {rep.rank}")

    def _check_nodes(self, failures: Failures) -> None:
        now = time.monotonic()
        for n in range(1, self.job.nnodes):
            if n in self.lost_nodes:
                continue
            value = int(self.store.add(P.node_hb_key(n), 0))
            last, at = self.node_hb[n]
            if value != last:
                self.node_hb[n] = (value, now)
            elif now - at > max(self.job.heartbeat_timeout_s, 2.0):
                self.lost_nodes.add(n)
                cause = f"node {n} lost: its supervisor was silent for {now - at:.1f} s"
                for slot in [s for s, rs in self.spares.items() if rs.node == n]:
                    del self.spares[slot]
                failures += [(rank, _failure(rs, cause)) for rank, rs in self.info.ranks.items() if rs.node == n]

    def _measure_cold_start(self) -> None:
        """Generation 0's start (launch to every rank joined): how long a process takes to come up here."""
        if self.gen == 0 and self.cold_start_s is None and \
                self.store.check([P.join_key(0, r) for r in self.info.ranks]):
            self.cold_start_s = time.monotonic() - self.started
            log.info("every rank joined generation 0 %.1f s after the launch", self.cold_start_s)

    def _join_timeout(self, holder: P.RankSlot) -> float:
        if holder.kind is not P.SlotKind.RESTART:
            return self.join_timeout_s
        cold = self.cold_start_s if self.cold_start_s is not None else time.monotonic() - self.started
        return max(self.join_timeout_s, 2.0 * cold + self.job.heartbeat_timeout_s)

    def _check_joins(self, failures: Failures) -> None:
        if not self.join_deadlines:
            return
        now, failed = time.monotonic(), {r for r, _ in failures}
        for r, deadline in list(self.join_deadlines.items()):
            if self.store.check([P.join_key(self.gen, r)]) or r in self.finished:
                del self.join_deadlines[r]
            elif now > deadline and r not in failed:
                del self.join_deadlines[r]
                holder = self.info.ranks[r]
                cause = f"did not join generation {self.gen} within {self._join_timeout(holder):.1f} s"
                failures.append((r, _failure(holder, cause)))

    # --- recovery -----------------------------------------------------------------------------------
    def _recover(self, failures: Failures) -> None:
        seen, unique = set(), []
        for rank, ev in failures:
            if rank not in seen:
                seen.add(rank)
                unique.append((rank, ev))
                log.error('FAILURE rank=%d slot=%s node=%d host=%s pid=%d generation=%d time=%s cause="%s"',
                          rank, ev.slot, ev.node, ev.host, ev.pid, self.gen, _stamp(ev.time), ev.cause)
        if self.finished:
            return self._terminal(f"rank(s) {sorted(seen)} failed after rank(s) {sorted(self.finished)} finished")
        if self.restarts_used + len(unique) > self.job.max_restarts:
            return self._terminal(f"rank(s) {sorted(seen)} failed and the {self.job.max_restarts} replacements "
                                  f"allowed by --max-restarts are used up")
        ranks = dict(self.info.ranks)
        for rank, ev in unique:
            old = ranks[rank]
            new = self._take_spare(old.node)
            if new is None:
                if old.node in self.lost_nodes:
                    return self._terminal(f"rank {rank} lost with node {old.node} and no spare is left")
                slot = P.restart_slot(old.node, self.next_restart)
                self.next_restart += 1
                new = P.RankSlot(slot, old.node, old.host, None, P.SlotKind.RESTART, old.local_rank)
            ranks[rank] = new
            self.restarts_used += 1
        causes = {r: ev.cause for r, ev in unique}
        self._publish(ranks, [r for r, _ in unique], causes, P.GenReason.FAILURE, min(ev.time for _, ev in unique),
                      [ev.slot for _, ev in unique])

    def _take_spare(self, node: int) -> Optional[P.RankSlot]:
        def ready(rs: P.RankSlot) -> bool:
            return int(self.store.add(P.heartbeat_key(rs.slot), 0)) > 0

        order = sorted(self.spares.values(), key=lambda rs: (not ready(rs), rs.node != node, rs.slot))
        if not order:
            return None
        return self.spares.pop(order[0].slot)

    def _publish(self, ranks: Dict[int, P.RankSlot], failed: List[int], causes: Dict[int, str],
                 reason: P.GenReason, detected_at: Optional[float], failed_slots: Sequence[str] = ()) -> None:
        g = self.gen + 1
        info = P.GenerationInfo(g, self.job.world_size, ranks, failed, list(failed_slots), causes, time.time(),
                                detected_at, reason, self.restarts_used)
        self.store.set(P.gen_key(g), info.to_json())
        self.store.set(P.GEN, str(g))
        self.gen, self.info, self.regroup = g, info, None
        now = time.monotonic()
        self.join_deadlines = {r: now + self._join_timeout(rs) for r, rs in ranks.items()} if g > 0 else {}
        if reason is P.GenReason.START:
            log.info("generation 0 published: world size %d on %d node(s), %d spare(s)", self.job.world_size,
                     self.job.nnodes, len(self.spares))
            return
        moved = {r: f"{ranks[r].slot}({ranks[r].kind})" for r in failed}
        lat = "" if detected_at is None else f"; detection->publish {info.recovery_start - detected_at:.3f} s"
        log.warning("generation %d published (%s): failed ranks %s -> %s; replacements used %d/%d%s", g, reason,
                    failed, moved, self.restarts_used, self.job.max_restarts, lat)

    def _terminal(self, why: str) -> None:
        self.state, self.message = P.JobState.FAILED, why
        self.store.set(P.STATE, P.encode_state(P.JobState.FAILED, why))
        log.error("stopping the job: %s", TerminalError(why))
