"""fftrainer-launch: a torchrun-like supervisor that keeps the survivors alive when a rank fails.

    fftrainer-launch --nproc-per-node N [--spares S] [--nnodes M --node-rank R --master-addr A
                     --master-port P --secret-file F] [--max-restarts X] train.py ARGS...

Every node runs one supervisor (failover/supervisor.py, `NodeSupervisor`: spawn, detect). The supervisor
of node 0 also hosts the coordination TCPStore and runs the `Coordinator` (failover/coordinator.py),
which turns failures into generations (failover/protocol.py has the key layout; docs/LAUNCH.md the
user's view). This module is the command line, the loop that drives both, and the stop handshake.
It never imports deepspeed, and imports torch.distributed only after the arguments are checked.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional, Sequence

from .config import FastFailoverConfig
from .errors import ConfigError
from .failover import protocol as P
from .failover.coordinator import RENDEZVOUS_TIMEOUT_S, Coordinator
from .failover.supervisor import NodeSupervisor
from .secret import ENV_SECRET_FILE, HandOff, read_secret_file

log = logging.getLogger("fftrainer_ds.launch")

_LOOP_S = 0.02
# Workers take their heartbeat interval from the launcher only (no config key): a worker's config
# cannot disagree with the supervisor that judges its heartbeats.
HEARTBEAT_INTERVAL_S = 0.5


# --- command line -----------------------------------------------------------------------------------
def _default(name: str):
    return FastFailoverConfig.model_fields[name].default


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("--heartbeat-interval-s", type=float, default=HEARTBEAT_INTERVAL_S,
                   help="seconds between a worker's heartbeats (must be below --heartbeat-timeout-s)")
    p.add_argument("--heartbeat-timeout-s", type=float, default=_default("heartbeat_timeout_s"),
                   help="a worker whose last heartbeat is older than this is declared hung")
    p.add_argument("--collective-timeout-s", type=float, default=_default("collective_timeout_s"),
                   help="timeout of collectives in the rebuilt process groups")
    p.add_argument("--term-timeout-s", type=float, default=10.0, help="SIGTERM-to-SIGKILL grace when stopping")
    p.add_argument("--secret-file", default=os.environ.get(ENV_SECRET_FILE) or None,
                   help="file (mode 0600) holding the job secret, the same on every node; required with "
                        f"--nnodes > 1; default ${ENV_SECRET_FILE}, else 32 random bytes for this launch only")
    p.add_argument("-m", "--module", action="store_true", help="run `script` as a module (python -m)")
    p.add_argument("--no-python", action="store_true", help="run `script` as an executable")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p


def _check_timing(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value in (("--heartbeat-interval-s", args.heartbeat_interval_s),
                        ("--heartbeat-timeout-s", args.heartbeat_timeout_s),
                        ("--collective-timeout-s", args.collective_timeout_s)):
        if not value > 0:                       # written so that nan is refused too
            p.error(f"{flag} must be > 0 (got {value})")
    if args.heartbeat_interval_s >= args.heartbeat_timeout_s:
        p.error(f"--heartbeat-interval-s ({args.heartbeat_interval_s}) must be smaller than "
                f"--heartbeat-timeout-s ({args.heartbeat_timeout_s})")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.nproc_per_node < 1 or args.spares < 0 or args.nnodes < 1 or args.max_restarts < 0:
        p.error("--nproc-per-node and --nnodes must be >= 1, --spares and --max-restarts >= 0")
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank must be in [0, {args.nnodes})")
    if args.master_port is None:
        args.master_port = 0 if args.nnodes == 1 else 29500
    if args.master_port == 0 and args.node_rank != 0:
        p.error("--master-port is required on nodes other than 0")
    _check_timing(p, args)
    _check_secret(p, args)
    return args


def _check_secret(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # Nodes share no channel the secret could travel on (the store is readable by whoever reaches its port):
    # the user hands every node the same file.
    if args.nnodes > 1 and not args.secret_file:
        p.error("--nnodes > 1 needs --secret-file PATH: every node must hold the same job secret (create it once "
                "with `head -c 32 /dev/urandom > PATH && chmod 600 PATH` and copy it to every node)")
    if args.secret_file:
        try:
            read_secret_file(args.secret_file)
        except ConfigError as exc:
            p.error(f"--secret-file: {exc}")


def _command(args: argparse.Namespace) -> List[str]:
    if args.no_python:
        return [args.script, *args.script_args]
    if args.module:
        return [sys.executable, "-u", "-m", args.script, *args.script_args]
    return [sys.executable, "-u", args.script, *args.script_args]


# --- running ----------------------------------------------------------------------------------------
@dataclass
class _Stop:
    """The signal (SIGINT/SIGTERM) that asked this supervisor to stop, if any."""
    signum: Optional[int] = None

    def install(self) -> "_Stop":
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signum = signum


@dataclass
class _Node:
    """This node's connection to the job: node 0 hosts the store and runs the coordinator."""
    store: Any                  # torch.distributed.TCPStore
    job: P.JobSpec
    coordinator: Optional[Coordinator]


@dataclass
class _Outcome:
    state: P.JobState
    why: str = ""


def _connect(args: argparse.Namespace) -> Optional[_Node]:
    """Host (node 0) or reach the coordination store; None if node 0 runs another job shape."""
    import torch.distributed as dist  # slow import: after argument errors are reported

    if args.node_rank == 0:
        job = P.JobSpec(args.nnodes, args.nproc_per_node, args.nnodes * args.nproc_per_node,
                        args.heartbeat_interval_s, args.heartbeat_timeout_s, args.collective_timeout_s,
                        args.max_restarts)
        store = dist.TCPStore(args.master_addr, args.master_port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=60))
        log.info("coordination store listening on %s:%d", args.master_addr, store.port)
        return _Node(store, job, Coordinator(store, job))
    store = dist.TCPStore(args.master_addr, args.master_port, is_master=False,
                          timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    job = P.JobSpec.from_json(store.get(P.JOB))
    if (job.nnodes, job.nproc_per_node) != (args.nnodes, args.nproc_per_node):
        log.error("node 0 runs --nnodes %d --nproc-per-node %d; this node was given %d and %d", job.nnodes,
                  job.nproc_per_node, args.nnodes, args.nproc_per_node)
        return None
    return _Node(store, job, None)


def _job_state(node: _Node) -> _Outcome:
    if node.coordinator is not None:
        node.coordinator.poll()
        return _Outcome(node.coordinator.state, node.coordinator.message)
    return _Outcome(*P.decode_state(node.store.get(P.STATE)))


def _supervise(node: _Node, supervisor: NodeSupervisor, stop: _Stop, args: argparse.Namespace) -> _Outcome:
    """Run the node until the job ends, a signal arrives or the store fails; then stop the children."""
    outcome = _Outcome(P.JobState.RUNNING)
    try:
        supervisor.start()
        while stop.signum is None:
            supervisor.poll()
            outcome = _job_state(node)
            if outcome.state is not P.JobState.RUNNING:
                break
            time.sleep(_LOOP_S)
    except Exception as err:  # the store went away (node 0 died) or a bug: stop everything below us
        outcome = _Outcome(P.JobState.FAILED, f"supervisor error: {type(err).__name__}: {err}")
        log.error("%s", outcome.why)
    finally:
        if stop.signum is not None:
            outcome.why = f"received {signal.Signals(stop.signum).name}"
            log.warning("%s: stopping %d children", outcome.why, len(supervisor.live()))
        supervisor.stop(args.term_timeout_s)
        _finish(node, args, outcome.why)
    return outcome


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, datefmt="%H:%M:%S",
                        format=f"[fftrainer-launch n{args.node_rank} %(asctime)s.%(msecs)03d] %(message)s")
    stop = _Stop().install()
    handoff = HandOff.create(args.secret_file)  # the children read it from a private file, never from argv
    log.info("job secret: %s", f"from {args.secret_file}" if args.secret_file else
             "random, for this launch only (snapshots it persists restore only with the same secret: --secret-file)")
    try:
        node = _connect(args)
        if node is None:
            return 2
        supervisor = NodeSupervisor(node.store, args.node_rank, socket.gethostname(), _command(args),
                                    args.nproc_per_node, args.spares, node.job, args.master_addr, node.store.port,
                                    env=dict(os.environ, **handoff.env()))
        outcome = _supervise(node, supervisor, stop, args)
    finally:
        handoff.remove()
    if stop.signum is not None:
        return 128 + stop.signum
    if outcome.state is P.JobState.DONE:
        return 0
    log.error("job failed: %s", outcome.why)
    return 1


def _finish(node: _Node, args: argparse.Namespace, why: str) -> None:
    """Tell the other nodes to stop (node 0) or acknowledge the stop (other nodes)."""
    store, coordinator = node.store, node.coordinator
    try:
        if coordinator is None:
            store.set(P.node_bye_key(args.node_rank), "1")
            return
        if coordinator.state is P.JobState.RUNNING:        # interrupted or crashed: stop the other nodes
            store.set(P.STATE, P.encode_state(P.JobState.FAILED, why))
        others = [P.node_bye_key(n) for n in range(1, args.nnodes) if n not in coordinator.lost_nodes]
        deadline = time.monotonic() + args.term_timeout_s + 5.0
        while others and not store.check(others) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # the store is gone with node 0: nobody is left to tell
        pass


if __name__ == "__main__":
    sys.exit(main())
