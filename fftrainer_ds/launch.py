"""fftrainer-launch: a torchrun-like supervisor that keeps the survivors alive when a rank fails.

    fftrainer-launch --nproc-per-node N [--spares S] [--nnodes M --node-rank R --master-addr A
                     --master-port P] [--max-restarts X] train.py ARGS...

Every node runs one supervisor (`NodeSupervisor`: spawn, detect). The supervisor of node 0 also hosts
the coordination TCPStore and runs the `Coordinator`, which turns failures into generations
(failover/protocol.py has the key layout; docs/LAUNCH.md the user's view).
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

from .config import FastFailoverConfig
from .errors import ConfigError, TerminalError
from .failover import protocol as P
from .failover.supervisor import NodeSupervisor

log = logging.getLogger("fftrainer_ds.launch")

_LOOP_S = 0.02
_RENDEZVOUS_TIMEOUT_S = 300.0


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


class Coordinator:
    """Runs in node 0's supervisor: reads every node's events and publishes generations."""

    def __init__(self, store, job: P.JobSpec):
        self.store, self.job = store, job
        self.gen = -1
        self.info: Optional[P.GenerationInfo] = None
        self.spares: Dict[str, P.RankSlot] = {}
        self.cursor = {n: 0 for n in range(job.nnodes)}
        self.err_cursor = 0
        self.finished: set = set()
        self.restarts_used = 0
        self.next_restart = 0
        self.state = P.STATE_RUNNING
        self.message = ""
        self.node_hb: Dict[int, Tuple[int, float]] = {}
        self.lost_nodes: set = set()
        self.regroup: Optional[Tuple[float, str]] = None    # (monotonic deadline, cause)
        self.join_deadline: Optional[float] = None
        self.started = time.monotonic()
        self.join_timeout_s = job.collective_timeout_s + job.heartbeat_timeout_s + 2.0

    # --- start --------------------------------------------------------------------------------------
    def _try_start(self) -> None:
        keys = [P.node_key(n) for n in range(self.job.nnodes)]
        if not self.store.check(keys):
            if time.monotonic() - self.started > _RENDEZVOUS_TIMEOUT_S:
                self._terminal(f"only some of the {self.job.nnodes} nodes registered within {_RENDEZVOUS_TIMEOUT_S} s")
            return
        ranks: Dict[int, P.RankSlot] = {}
        for n, key in enumerate(keys):
            reg = P.loads(self.store.get(key))
            if reg["nproc"] != self.job.nproc_per_node:
                return self._terminal(f"node {n} runs {reg['nproc']} workers, node 0 {self.job.nproc_per_node}")
            for slot, s in reg["slots"].items():
                rs = P.RankSlot(slot, n, reg["host"], s["pid"], s["kind"], s["local_rank"])
                if s["rank"] is None:
                    self.spares[slot] = rs
                else:
                    ranks[s["rank"]] = rs
            self.node_hb[n] = (-1, time.monotonic())
        self._publish(ranks, [], {}, "start", None)

    # --- the loop -----------------------------------------------------------------------------------
    def poll(self) -> None:
        if self.state != P.STATE_RUNNING:
            return
        if self.gen < 0:
            return self._try_start()
        failures: List[Tuple[int, P.NodeEvent]] = []
        for n in range(self.job.nnodes):
            if n not in self.lost_nodes:
                self._read_events(n, failures)
        self._read_error_reports()
        self._check_nodes(failures)
        self._check_joins(failures)
        if failures:
            self._recover(failures)
        elif self.regroup is not None and time.monotonic() >= self.regroup[0]:
            cause = self.regroup[1]
            log.warning("no process failure followed %s within %.1f s: regrouping the same processes",
                        cause, self.job.heartbeat_timeout_s + 1.0)
            self._publish(dict(self.info.ranks), [], {}, "regroup", None)
        if self.state == P.STATE_RUNNING and len(self.finished) == self.job.world_size:
            self.state = P.STATE_DONE
            self.store.set(P.STATE, P.STATE_DONE)
            log.info("all %d ranks finished", self.job.world_size)

    def _read_events(self, n: int, failures: List[Tuple[int, P.NodeEvent]]) -> None:
        count = int(self.store.get(P.node_nev_key(n)))
        while self.cursor[n] < count:
            ev = P.NodeEvent(**P.loads(self.store.get(P.node_event_key(n, self.cursor[n]))))
            self.cursor[n] += 1
            rank = self.info.rank_of(ev.slot)
            if ev.slot in self.spares:
                del self.spares[ev.slot]
                log.warning("spare slot=%s host=%s pid=%d lost: %s (%d spares left)", ev.slot, ev.host, ev.pid,
                            ev.cause, len(self.spares))
            elif rank is None:
                continue                                   # a slot already replaced
            elif ev.kind == "exit":
                self.finished.add(rank)
                log.info("rank %d (slot %s) finished", rank, ev.slot)
            else:
                failures.append((rank, ev))

    def _read_error_reports(self) -> None:
        count = int(self.store.add(P.ERR_COUNT, 0))
        while self.err_cursor < count and self.store.check([P.err_key(self.err_cursor)]):
            rep = P.ErrorReport(**P.loads(self.store.get(P.err_key(self.err_cursor))))
            self.err_cursor += 1
            if rep.generation < self.gen:
                continue                                   # already being recovered
            log.warning("collective error reported by rank %d (slot %s) in generation %d: %s",
                        rep.rank, rep.slot, rep.generation, rep.cause)
            if self.regroup is None:
                self.regroup = (time.monotonic() + self.job.heartbeat_timeout_s + 1.0,
                                f"the collective error of rank {rep.rank}")

    def _check_nodes(self, failures: List[Tuple[int, P.NodeEvent]]) -> None:
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
                for rank, rs in self.info.ranks.items():
                    if rs.node == n:
                        failures.append((rank, P.NodeEvent("failure", rs.slot, n, rs.host, rs.pid or -1,
                                                           time.time(), None, cause)))

    def _check_joins(self, failures: List[Tuple[int, P.NodeEvent]]) -> None:
        if self.join_deadline is None:
            return
        keys = {r: P.join_key(self.gen, r) for r in self.info.ranks}
        if self.store.check(list(keys.values())):
            self.join_deadline = None
        elif time.monotonic() > self.join_deadline:
            self.join_deadline = None
            failed = {r for r, _ in failures}
            for r, key in keys.items():
                rs = self.info.ranks[r]
                if r not in failed and r not in self.finished and not self.store.check([key]):
                    cause = f"did not join generation {self.gen} within {self.join_timeout_s:.1f} s"
                    failures.append((r, P.NodeEvent("failure", rs.slot, rs.node, rs.host, rs.pid or -1,
                                                    time.time(), None, cause)))

    # --- recovery -----------------------------------------------------------------------------------
    def _recover(self, failures: List[Tuple[int, P.NodeEvent]]) -> None:
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
                new = P.RankSlot(slot, old.node, old.host, None, "restart", old.local_rank)
            ranks[rank] = new
            self.restarts_used += 1
        causes = {r: ev.cause for r, ev in unique}
        self._publish(ranks, [r for r, _ in unique], causes, "failure", min(ev.time for _, ev in unique),
                      [ev.slot for _, ev in unique])

    def _take_spare(self, node: int) -> Optional[P.RankSlot]:
        def ready(rs: P.RankSlot) -> bool:
            return int(self.store.add(P.heartbeat_key(rs.slot), 0)) > 0

        order = sorted(self.spares.values(), key=lambda rs: (not ready(rs), rs.node != node, rs.slot))
        if not order:
            return None
        return self.spares.pop(order[0].slot)

    def _publish(self, ranks: Dict[int, P.RankSlot], failed: List[int], causes: Dict[int, str], reason: str,
                 detected_at: Optional[float], failed_slots: Sequence[str] = ()) -> None:
        g = self.gen + 1
        info = P.GenerationInfo(g, self.job.world_size, ranks, failed, list(failed_slots), causes, time.time(),
                                detected_at, reason, self.restarts_used)
        self.store.set(P.gen_key(g), info.to_json())
        self.store.set(P.GEN, str(g))
        self.gen, self.info, self.regroup = g, info, None
        # A survivor stuck in a collective of the old generation gets out at its collective timeout:
        # give it that, plus a margin, before declaring it failed.
        self.join_deadline = time.monotonic() + self.join_timeout_s if g > 0 else None
        if reason == "start":
            log.info("generation 0 published: world size %d on %d node(s), %d spare(s)", self.job.world_size,
                     self.job.nnodes, len(self.spares))
            return
        moved = {r: f"{ranks[r].slot}({ranks[r].kind})" for r in failed}
        lat = "" if detected_at is None else f"; detection->publish {info.recovery_start - detected_at:.3f} s"
        log.warning("generation %d published (%s): failed ranks %s -> %s; replacements used %d/%d%s", g, reason,
                    failed, moved, self.restarts_used, self.job.max_restarts, lat)

    def _terminal(self, why: str) -> None:
        self.state, self.message = P.STATE_FAILED, why
        self.store.set(P.STATE, f"{P.STATE_FAILED}: {why}")
        log.error("stopping the job: %s", TerminalError(why))


# --- command line -----------------------------------------------------------------------------------
def _default(name: str):
    return FastFailoverConfig.model_fields[name].default


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fftrainer-launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, help="workers per node")
    p.add_argument("--spares", type=int, default=0, help="hot spare processes per node")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", "--node_rank", type=int, default=0)
    p.add_argument("--master-addr", "--master_addr", default="127.0.0.1", help="host of node 0 (the store)")
    p.add_argument("--master-port", "--master_port", type=int, default=None,
                   help="store port; default 0 (any free port) on one node, 29500 with --nnodes > 1")
    p.add_argument("--max-restarts", type=int, default=3, help="replacements (spares + restarts) allowed per job")
    p.add_argument("--heartbeat-interval-s", type=float, default=_default("heartbeat_interval_s"))
    p.add_argument("--heartbeat-timeout-s", type=float, default=_default("heartbeat_timeout_s"))
    p.add_argument("--collective-timeout-s", type=float, default=_default("collective_timeout_s"))
    p.add_argument("--term-timeout-s", type=float, default=10.0, help="SIGTERM-to-SIGKILL grace when stopping")
    p.add_argument("-m", "--module", action="store_true", help="run `script` as a module (python -m)")
    p.add_argument("--no-python", action="store_true", help="run `script` as an executable")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.nproc_per_node < 1 or args.spares < 0 or args.nnodes < 1 or args.max_restarts < 0:
        p.error("--nproc-per-node and --nnodes must be >= 1, --spares and --max-restarts >= 0")
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank must be in [0, {args.nnodes})")
    if args.master_port is None:
        args.master_port = 0 if args.nnodes == 1 else 29500
    if args.master_port == 0 and args.node_rank != 0:
        p.error("--master-port is required on nodes other than 0")
    try:
        FastFailoverConfig(heartbeat_interval_s=args.heartbeat_interval_s, heartbeat_timeout_s=args.heartbeat_timeout_s,
                           collective_timeout_s=args.collective_timeout_s)
    except Exception as err:
        p.error(str(ConfigError(str(err))))
    return args


def _command(args: argparse.Namespace) -> List[str]:
    if args.no_python:
        return [args.script, *args.script_args]
    if args.module:
        return [sys.executable, "-u", "-m", args.script, *args.script_args]
    return [sys.executable, "-u", args.script, *args.script_args]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, datefmt="%H:%M:%S",
                        format=f"[fftrainer-launch n{args.node_rank} %(asctime)s.%(msecs)03d] %(message)s")
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    import torch.distributed as dist  # slow import: after argument errors are reported

    coordinator: Optional[Coordinator] = None
    job = P.JobSpec(args.nnodes, args.nproc_per_node, args.nnodes * args.nproc_per_node, args.heartbeat_interval_s,
                    args.heartbeat_timeout_s, args.collective_timeout_s, args.max_restarts)
    if args.node_rank == 0:
        store = dist.TCPStore(args.master_addr, args.master_port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=60))
        log.info("coordination store listening on %s:%d", args.master_addr, store.port)
        store.set(P.JOB, P.dumps(job.__dict__))
        store.set(P.STATE, P.STATE_RUNNING)
        coordinator = Coordinator(store, job)
    else:
        store = dist.TCPStore(args.master_addr, args.master_port, is_master=False,
                              timeout=timedelta(seconds=_RENDEZVOUS_TIMEOUT_S))
        job = P.JobSpec(**P.loads(store.get(P.JOB)))
        if (job.nnodes, job.nproc_per_node) != (args.nnodes, args.nproc_per_node):
            log.error("node 0 runs --nnodes %d --nproc-per-node %d; this node was given %d and %d", job.nnodes,
                      job.nproc_per_node, args.nnodes, args.nproc_per_node)
            return 2
    node = NodeSupervisor(store, args.node_rank, socket.gethostname(), _command(args), args.nproc_per_node,
                          args.spares, job, args.master_addr, store.port)
    state, why = P.STATE_RUNNING, ""
    try:
        node.start()
        while stop["sig"] is None:
            node.poll()
            if coordinator is not None:
                coordinator.poll()
                state, why = coordinator.state, coordinator.message
            else:
                state, _, why = store.get(P.STATE).decode().partition(": ")
            if state != P.STATE_RUNNING:
                break
            time.sleep(_LOOP_S)
    except Exception as err:  # the store went away (node 0 died) or a bug: stop everything below us
        state, why = P.STATE_FAILED, f"supervisor error: {type(err).__name__}: {err}"
        log.error("%s", why)
    finally:
        if stop["sig"] is not None:
            state, why = "interrupted", f"received {signal.Signals(stop['sig']).name}"
            log.warning("%s: stopping %d children", why, len(node.live()))
        node.stop(args.term_timeout_s)
        _finish(store, coordinator, args, state, why)
    if stop["sig"] is not None:
        return 128 + stop["sig"]
    if state == P.STATE_DONE:
        return 0
    log.error("job failed: %s", why)
    return 1


def _finish(store, coordinator: Optional[Coordinator], args: argparse.Namespace, state: str, why: str) -> None:
    """Tell the other nodes to stop (node 0) or acknowledge the stop (other nodes)."""
    try:
        if coordinator is None:
            store.set(P.node_bye_key(args.node_rank), "1")
            return
        if coordinator.state == P.STATE_RUNNING:          # interrupted or crashed: stop the other nodes
            store.set(P.STATE, f"{P.STATE_FAILED}: {why}")
        others = [P.node_bye_key(n) for n in range(1, args.nnodes) if n not in coordinator.lost_nodes]
        deadline = time.monotonic() + args.term_timeout_s + 5.0
        while others and not store.check(others) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
