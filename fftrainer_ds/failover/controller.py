"""Failover inside a worker: catch a failure, regroup, rebuild, choose the step, restore, go on.

Active only under `fftrainer-launch` (membership agent present) with fast_failover enabled.

Survivor: an error in forward/backward/step that comes from communication (or a newer generation
seen by the watcher) -> `recover()`: wait for the next generation, rebuild the default group,
rebuild the engine in place (same collectives as the replacement's `initialize`), rebind the
runtime (new replication group), then `exchange_and_restore()`. The rest of the interrupted user
iteration becomes a no-op; the loop continues from the recovery step with no user code.

Replacement (hot spare or restarted process): `failover_initialize()` joins the generation, builds
its engine normally, then runs the same `exchange_and_restore()` and returns to the user's script.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ..ds import adapter as ds_adapter
from ..errors import RecoverableError, TerminalError
from . import membership
from . import sockets
from .rebuild import RebuildSpec, rebuild_in_place, release_engine
from .recovery import Plan, RankInfo, gather_infos, plan_recovery, transfer
from .template import materialize

logger = logging.getLogger("fftrainer_ds")
_MAX_ATTEMPTS = 20
# Substrings of communication failures in gloo/NCCL/store errors that are not DistError subclasses.
_COMM_MARKERS = ("connection reset", "connection closed", "broken pipe", "timed out", "timeout", "gloo",
                 "nccl", "socket", "peer", "unreachable")

_context = threading.local()  # the agent/generation an engine under construction belongs to


def build_context() -> Optional[Dict[str, Any]]:
    """Set by failover_initialize while it builds an engine (read by FailoverEngine.__init__)."""
    return getattr(_context, "value", None)


def is_comm_failure(exc: BaseException) -> bool:
    """Failures we recover from: peer loss and collective errors/timeouts, not bugs in user code."""
    if isinstance(exc, (RecoverableError, TimeoutError)):
        return True
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _COMM_MARKERS)


def _recoverable(exc: BaseException) -> RecoverableError:
    """A detached copy of a communication failure: the original's traceback holds DeepSpeed frames,
    and through them the old process groups."""
    return RecoverableError(f"{type(exc).__name__}: {str(exc)[:300]}")


class FailoverController:
    """Per-process failover state: the membership agent, the recovery log, this generation's sockets."""

    def __init__(self, agent: membership.Agent):
        self.agent = agent
        atexit.register(agent.finish)  # a script that never calls engine.destroy() still exits cleanly
        self.recoveries: List[Dict[str, Any]] = []
        self.abandoned = False  # the rest of the user iteration interrupted by a recovery is skipped
        self._pending_timeline: Optional[Dict[str, Any]] = None
        self.generation_sockets: Dict[int, int] = {}  # TCP sockets opened by the current generation

    def abandon_generation(self) -> None:
        """Shut down this generation's sockets: peers blocked on us in an old collective wake now."""
        n = sockets.shutdown(self.generation_sockets)
        self.generation_sockets = {}
        logger.info("fftrainer_ds: shut down %d sockets of the abandoned generation", n)

    # ---- engine hooks -----------------------------------------------------------------------
    def guard(self, engine, kind: str, fn: Callable[[], Any]) -> Any:
        if kind == "forward":
            self.abandoned = False  # forward starts a new user iteration
        elif self.abandoned:
            if kind == "step":
                self.abandoned = False
            return None
        failure = None
        try:
            self.agent.check()
            out = fn()
            if kind == "step" and self._pending_timeline is not None and engine.is_gradient_accumulation_boundary():
                self._finish_timeline(engine)
            return out
        except BaseException as exc:
            if not is_comm_failure(exc):
                raise
            failure = _recoverable(exc)
        if failure is not None:
            # Recover outside the except block: the traceback's DeepSpeed frames hold the old groups.
            self.recover(engine, failure)
            if kind == "forward":
                self.abandoned = True
                return torch.zeros((), requires_grad=True)
            if kind == "backward":
                self.abandoned = True
            return None

    def after_step(self, engine) -> None:
        self.agent.report_progress(engine.global_steps)

    # ---- survivor ---------------------------------------------------------------------------
    def recover(self, engine, exc: BaseException) -> None:
        t_fail = time.time()
        _pause_gc()
        at_step, rank = engine.global_steps, engine.global_rank
        logger.warning("fftrainer_ds: rank %d: failure seen at step %d (%s: %s); recovering",
                       engine.global_rank, at_step, type(exc).__name__, str(exc)[:200])
        engine._ff.snapshotter.fence()  # our own pack is local: let it finish and commit
        self.agent.report_error(exc)
        # Drop DeepSpeed's engine and the old groups, and shut the old generation's sockets down: a live
        # peer still blocked in an old collective wakes now instead of at its collective timeout.
        self.abandon_generation()
        release_engine(engine)
        t_released = time.time()
        g = self.agent.wait_for_generation(after=self.agent.generation)
        t_gen = time.time()
        for _ in range(_MAX_ATTEMPTS):
            try:
                t0 = time.time()  # the old groups are already gone (release_engine)
                before = sockets.socket_fds()
                self.agent.rebuild_default_group(g)
                t_group = time.time()
                rebuild_in_place(engine, engine._ff_spec)
                # Training groups only: the replication group's receiver threads sit inside gloo, and
                # a socket shut down under them aborts the process.
                self.generation_sockets = sockets.opened_since(before)
                engine._ff.rebind(engine, g, self.agent.store, nodes=self.agent.nodes())
                t_rebuild = time.time()
                self.exchange_and_restore(engine, replacement=False,
                                          timeline={"failure_seen": t_fail, "released": t_released,
                                                    "generation_seen": t_gen, "regroup_start": t0,
                                                    "group_ready": t_group, "engine_rebuilt": t_rebuild,
                                                    "step_at_failure": at_step})
                return
            except BaseException as again:  # a second failure during recovery: next generation
                if not is_comm_failure(again) and not isinstance(again, membership.GenerationChanged):
                    raise
                problem = None if isinstance(again, membership.GenerationChanged) else _recoverable(again)
            logger.warning("fftrainer_ds: rank %d: failure during recovery (%s); moving past generation %d",
                           rank, problem or "newer generation", g)
            self.abandon_generation()
            release_engine(engine)
            if problem is not None:
                self.agent.report_error(problem)
            g = self.agent.wait_for_generation(after=g)
        raise TerminalError(f"recovery did not converge after {_MAX_ATTEMPTS} generations")

    # ---- both -------------------------------------------------------------------------------
    def exchange_and_restore(self, engine, replacement: bool, timeline: Dict[str, Any]) -> Plan:
        """On the new generation: agree on the recovery step, move shards, restore (collective)."""
        rt = engine._ff
        info = self.agent.info
        disk = _disk_steps(engine.ff_config.persist_dir, engine.global_rank)
        mine = RankInfo(engine.global_rank, replacement, [] if replacement else rt.snapshotter.pool.steps(),
                        {} if replacement else rt.held_replica_steps(), disk)
        infos = gather_infos(mine)
        if all(not i.own_steps and not i.held and not i.disk_steps for i in infos):
            plan = Plan(0, {})  # failed before any snapshot: everyone starts over from the beginning
        else:
            plan = plan_recovery(infos, engine.world_size)
        t_plan = time.time()
        data = transfer(plan, engine.global_rank, rt.lease_replica) if plan.source else None
        t_transfer = time.time()
        if plan.source:
            kind, _ = plan.source[engine.global_rank]
            if kind == "own":
                ref = rt.snapshotter.pool.acquire_step(plan.step)
                try:
                    engine.restore(ref)
                finally:
                    ref.release()
            elif kind == "disk":
                engine.restore(os.path.join(engine.ff_config.persist_dir, f"step{plan.step:08d}"))
            else:
                engine.restore(data)
        t_restore = time.time()
        timeline.update({"generation": self.agent.generation, "recovery_step": plan.step,
                         "replacement": replacement, "plan": {r: list(v) for r, v in plan.source.items()},
                         "detected_at": info.detected_at, "recovery_start": info.recovery_start,
                         "failed_ranks": list(info.failed), "causes": dict(info.causes),
                         "planned": t_plan, "transferred": t_transfer, "restored": t_restore,
                         "from_disk": plan.from_disk})
        self._pending_timeline = timeline
        return plan

    def _finish_timeline(self, engine) -> None:
        tl, self._pending_timeline = self._pending_timeline, None
        tl["first_step_done"] = time.time()
        _resume_gc()
        engine._ff_spec.prepare()  # the next rebuild's module copy, now that the recovery is over
        tl["lost_steps"] = max(0, tl.get("step_at_failure", tl["recovery_step"]) - tl["recovery_step"])
        base = tl.get("detected_at") or tl.get("recovery_start") or tl.get("failure_seen")
        phases = ["recovery_start", "failure_seen", "released", "generation_seen", "joined", "group_ready",
                  "engine_rebuilt", "planned", "transferred", "restored", "first_step_done"]
        tl["since_detect_s"] = {p: round(tl[p] - base, 4) for p in phases if tl.get(p) and base}
        self.recoveries.append(tl)
        msg = (f"fftrainer_ds: rank {engine.global_rank} recovered: generation {tl['generation']}, failed ranks "
               f"{tl['failed_ranks']} ({tl['causes']}), resumed at step {tl['recovery_step']}, lost steps "
               f"{tl['lost_steps']}{' FROM DISK' if tl['from_disk'] else ''}; timeline since detection (s): "
               f"{tl['since_detect_s']}")
        logger.warning(msg)
        if engine.global_rank == 0:
            print(msg, flush=True)


_gc_paused = False


def _pause_gc() -> None:
    """No cyclic garbage collection from a failure to the first step after it.

    Measured at 16 ranks on 2 cores: a collection that happened to start inside the replacement's
    DeepSpeed init took ~0.12 s of CPU while 15 survivors waited for it in the init's collectives.
    The cycles are collected at the next automatic collection after the first step instead.
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def _resume_gc() -> None:
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.enable()


def _disk_steps(persist_dir: Optional[str], rank: int) -> List[int]:
    if not persist_dir or not os.path.isdir(persist_dir):
        return []
    out = []
    for name in os.listdir(persist_dir):
        if name.startswith("step") and os.path.exists(os.path.join(persist_dir, name, f"rank{rank:05d}.ffsnap")):
            out.append(int(name[4:]))
    return sorted(out)


def warm_up_spare(build: Callable[..., Any], init_kwargs: Dict[str, Any], spec: RebuildSpec) -> float:
    """Build and drop a throwaway one-rank engine, so a hot spare's real build later is fast.

    A fresh process's first DeepSpeed engine costs seconds (lazy imports, op loading, first-time
    set-up) while a rebuild costs tens of milliseconds: the spare pays the first one while it waits.
    """
    import copy

    from .. import replication  # noqa: F401  (imported now, not during the replacement's build)

    t0 = time.perf_counter()
    config = copy.deepcopy(init_kwargs["config"])
    config.pop("train_batch_size", None)  # sized for the real world size
    config.pop("fast_failover", None)
    module = materialize(spec.template, spec.device)
    kwargs = dict(init_kwargs, model=module, config=config, training_data=None,
                  model_parameters=spec.model_parameters(module))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        engine = build(**kwargs)
        engine.destroy()
    finally:
        ds_adapter.release_groups()
        ds_adapter.reset_zero3_counters()
    return time.perf_counter() - t0


def failover_initialize(build: Callable[..., Any], init_kwargs: Dict[str, Any]):
    """`initialize` under fftrainer-launch: join (spares wait here), form the group, build, recover if a replacement."""
    # Everything allocated so far (torch, DeepSpeed, the user's imports) lives as long as the process:
    # frozen, it is not rescanned by the collections that run while an engine is rebuilt.
    gc.freeze()
    spec = RebuildSpec(init_kwargs)
    if os.environ.get(membership.P.ENV_SPARE_ID) is not None:
        took = warm_up_spare(build, init_kwargs, spec)
        gc.collect()  # the warm-up's garbage, now, while the spare waits (not in its real build)
        gc.freeze()
        print(f"fftrainer_ds: hot spare warmed up in {took:.2f} s", flush=True)  # the launcher log shows it
    agent = membership.join()
    t_joined = time.time()
    first_info = agent.info
    replacement = first_info.reason != "start" or os.environ.get(membership.P.ENV_REPLACEMENT) == "1"
    if replacement:
        _pause_gc()  # resumed after its first step, like a survivor's
    before = sockets.socket_fds()
    g = agent.init_process_group()
    t_group = time.time()
    kwargs = dict(init_kwargs)
    for _ in range(_MAX_ATTEMPTS):
        ctl = FailoverController(agent)
        _context.value = {"agent": agent, "generation": g, "controller": ctl, "sockets_before": before, "spec": spec}
        try:
            engine = build(**kwargs)  # FailoverEngine.__init__ records the training groups' sockets
            if replacement:
                engine._ff.snapshotter.generation = g
                ctl.exchange_and_restore(engine, replacement=True,
                                         timeline={"failure_seen": first_info.recovery_start,
                                                   "regroup_start": first_info.recovery_start,
                                                   "joined": t_joined, "group_ready": t_group,
                                                   "engine_rebuilt": time.time()})
            return engine
        except BaseException as exc:
            if not is_comm_failure(exc) and not isinstance(exc, membership.GenerationChanged):
                raise
            logger.warning("fftrainer_ds: failure while joining generation %d (%s); retrying", g, str(exc)[:200])
            if not isinstance(exc, membership.GenerationChanged):
                agent.report_error(exc)
            ctl.abandon_generation()
            before = sockets.socket_fds()
            g = agent.recover()
            # The model was consumed by the failed attempt: build from the weightless template.
            kwargs = dict(init_kwargs, model=spec.take_module())
            if spec.param_spec is not None:
                kwargs["model_parameters"] = spec.model_parameters(kwargs["model"])
            replacement = True  # whatever state existed is gone with the failed attempt's peers
        finally:
            _context.value = None
    raise TerminalError(f"could not join the job after {_MAX_ATTEMPTS} generations")
