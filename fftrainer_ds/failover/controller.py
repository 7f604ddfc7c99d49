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
import enum
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ..ds import adapter as ds_adapter
from ..errors import RecoverableError, TerminalError
from ..runtime import GenerationView
from ..snapshot.persist import persisted_steps
from . import membership
from . import sockets
from .rebuild import RebuildSpec
from .recovery import Plan, RankInfo, Source, gather_infos, plan_recovery, transfer
from .template import materialize
from .timeline import Phase, RecoveryTimeline

logger = logging.getLogger("fftrainer_ds")
_MAX_ATTEMPTS = 20
# Substrings of communication failures in gloo/NCCL/store errors that are not DistError subclasses.
_COMM_MARKERS = ("connection reset", "connection closed", "broken pipe", "timed out", "timeout", "gloo",
                 "nccl", "socket", "peer", "unreachable")

_context = threading.local()  # the BuildContext of an engine under construction in this thread


class Hook(enum.Enum):
    """The engine call a guard wraps: forward starts a user iteration, step ends it."""

    FORWARD = "forward"
    BACKWARD = "backward"
    STEP = "step"


@dataclass
class BuildContext:
    """What `failover_initialize` hands to the FailoverEngine it is building (through `_context`)."""

    agent: membership.Agent
    generation: int
    controller: "RecoveryController"
    sockets_before: Dict[int, int]  # sockets open before this generation's groups: not ours to shut down
    spec: RebuildSpec

    def view(self) -> GenerationView:
        return GenerationView(self.generation, self.agent.nodes())

    def engine_built(self) -> "RecoveryController":
        """Called by FailoverEngine.__init__ after DeepSpeed's: the training groups exist now."""
        self.controller.spec = self.spec
        self.controller.generation_sockets = sockets.opened_since(self.sockets_before)
        return self.controller


def engine_context(enabled: bool, init_kwargs: Dict[str, Any]) -> Optional[BuildContext]:
    """For FailoverEngine.__init__, before DeepSpeed wraps the model: the build context under
    fftrainer-launch (None otherwise). Either way, refuse what a rebuild could not be given again."""
    ctx: Optional[BuildContext] = getattr(_context, "value", None) if enabled else None
    if ctx is None:
        if enabled:
            RebuildSpec.validate(init_kwargs)
        return None
    if ctx.spec.model_id != id(init_kwargs["model"]):  # a retry builds from the template's module
        ctx.spec = RebuildSpec(init_kwargs)
    ctx.spec.prepare()  # only a job under fftrainer-launch ever rebuilds
    return ctx


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


class RecoveryController:
    """Per-process failover: the membership agent, the rebuild spec, the recovery log, this generation's sockets."""

    def __init__(self, agent: membership.Agent):
        self.agent = agent
        atexit.register(agent.finish)  # a script that never calls engine.destroy() still exits cleanly
        self.recoveries: List[RecoveryTimeline] = []
        self.spec: Optional[RebuildSpec] = None
        self.abandoned = False  # the rest of the user iteration interrupted by a recovery is skipped
        self._pending: Optional[RecoveryTimeline] = None  # finished by the first step after a recovery
        self.generation_sockets: Dict[int, int] = {}  # TCP sockets opened by the current generation

    def abandon_generation(self) -> None:
        """Shut down this generation's sockets: peers blocked on us in an old collective wake now."""
        n = sockets.shutdown(self.generation_sockets)
        self.generation_sockets = {}
        logger.info("fftrainer_ds: shut down %d sockets of the abandoned generation", n)

    # ---- engine hooks -----------------------------------------------------------------------
    def guard(self, engine, hook: Hook, fn: Callable[[], Any]) -> Any:
        if hook is Hook.FORWARD:
            self.abandoned = False  # forward starts a new user iteration
        elif self.abandoned:
            if hook is Hook.STEP:
                self.abandoned = False
            return None
        try:
            self.agent.check()
            out = fn()
        except BaseException as exc:
            if not is_comm_failure(exc):
                raise
            failure = _recoverable(exc)
        else:
            if hook is Hook.STEP and self._pending is not None and engine.is_gradient_accumulation_boundary():
                self._finish_timeline(engine)
            return out
        # Recover outside the except block: the traceback's DeepSpeed frames hold the old groups.
        self.recover(engine, failure)
        if hook is Hook.STEP:
            return None
        self.abandoned = True
        return torch.zeros((), requires_grad=True) if hook is Hook.FORWARD else None

    def after_step(self, engine) -> None:
        self.agent.report_progress(engine.global_steps)

    # ---- survivor ---------------------------------------------------------------------------
    def recover(self, engine, exc: BaseException) -> None:
        tl = RecoveryTimeline(replacement=False, step_at_failure=engine.global_steps)
        tl.mark(Phase.FAILURE_SEEN)
        _pause_gc()
        rank = engine.global_rank  # DeepSpeed's attributes are gone from the engine until it is rebuilt
        logger.warning("fftrainer_ds: rank %d: failure seen at step %d (%s: %s); recovering",
                       rank, tl.step_at_failure, type(exc).__name__, str(exc)[:200])
        engine.ff_runtime.fence()  # our own pack is local: let it finish and commit
        self.agent.report_error(exc)
        self._leave_generation(engine)
        tl.mark(Phase.RELEASED)
        g = self.agent.wait_for_generation(after=self.agent.generation)
        tl.mark(Phase.GENERATION_SEEN)
        for _ in range(_MAX_ATTEMPTS):
            try:
                self._regroup(engine, g, tl)
                self.exchange_and_restore(engine, tl)
                return
            except BaseException as again:  # a second failure during recovery: next generation
                if not is_comm_failure(again) and not isinstance(again, membership.GenerationChanged):
                    raise
                problem = None if isinstance(again, membership.GenerationChanged) else _recoverable(again)
            logger.warning("fftrainer_ds: rank %d: failure during recovery (%s); moving past generation %d",
                           rank, problem or "newer generation", g)
            self._leave_generation(engine)
            if problem is not None:
                self.agent.report_error(problem)
            g = self.agent.wait_for_generation(after=g)
        raise TerminalError(f"recovery did not converge after {_MAX_ATTEMPTS} generations")

    def _leave_generation(self, engine) -> None:
        """Drop DeepSpeed's engine and the old groups, and shut the old generation's sockets down: a live
        peer still blocked in an old collective wakes now instead of at its collective timeout."""
        self.abandon_generation()
        engine.release_deepspeed()

    def _regroup(self, engine, g: int, tl: RecoveryTimeline) -> None:
        """Default group of generation g, DeepSpeed rebuilt in place, the runtime rebound (collective)."""
        tl.mark(Phase.REGROUP_START)  # the old groups are already gone (release_deepspeed)
        before = sockets.socket_fds()
        self.agent.rebuild_default_group(g)
        tl.mark(Phase.GROUP_READY)
        engine.rebuild_deepspeed(self.spec)
        # Training groups only: the replication group's receiver threads sit inside gloo, and
        # a socket shut down under them aborts the process.
        self.generation_sockets = sockets.opened_since(before)
        engine.ff_runtime.rebind(engine, GenerationView(g, self.agent.nodes()))
        tl.mark(Phase.ENGINE_REBUILT)

    # ---- both -------------------------------------------------------------------------------
    def exchange_and_restore(self, engine, tl: RecoveryTimeline) -> Plan:
        """On the new generation: agree on the recovery step, move shards, restore (collective)."""
        runtime, rank = engine.ff_runtime, engine.global_rank
        mine = RankInfo(rank, tl.replacement, [] if tl.replacement else runtime.own_steps(),
                        {} if tl.replacement else runtime.held_replica_steps(),
                        persisted_steps(engine.ff_config.persist_dir, rank))
        infos = gather_infos(mine, generation=self.agent.generation)
        if all(not i.own_steps and not i.held and not i.disk_steps for i in infos):
            plan = Plan(0, {})  # failed before any snapshot: everyone starts over from the beginning
        else:
            plan = plan_recovery(infos, engine.world_size)
        tl.mark(Phase.PLANNED)
        data = transfer(plan, rank, runtime.lease_replica, generation=self.agent.generation) if plan.source else None
        tl.mark(Phase.TRANSFERRED)
        if plan.source:
            self._restore(engine, plan, data)
        tl.mark(Phase.RESTORED)
        info = self.agent.info
        tl.generation, tl.recovery_step, tl.from_disk = self.agent.generation, plan.step, plan.from_disk
        tl.plan = {r: tuple(v) for r, v in plan.source.items()}
        tl.detected_at = info.detected_at
        tl.mark(Phase.RECOVERY_START, info.recovery_start)
        tl.failed_ranks, tl.causes = list(info.failed), dict(info.causes)
        self._pending = tl
        return plan

    @staticmethod
    def _restore(engine, plan: Plan, data) -> None:
        runtime = engine.ff_runtime
        kind, _ = plan.source[engine.global_rank]
        if kind is Source.OWN:
            ref = runtime.lease_own(plan.step)
            try:
                runtime.restore(engine, ref)
            finally:
                ref.release()
        elif kind is Source.DISK:
            runtime.restore_from_disk(engine, plan.step)
        else:
            runtime.restore(engine, data)

    def _finish_timeline(self, engine) -> None:
        tl, self._pending = self._pending, None
        tl.finish()
        _resume_gc()
        self.spec.prepare()  # the next rebuild's module copy, now that the recovery is over
        self.recoveries.append(tl)
        msg = tl.summary(engine.global_rank)
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
    # The launcher's WORLD_SIZE describes the job, not this one-rank engine (ZeRO-3's zero.Init refuses
    # a one-rank group under a larger WORLD_SIZE).
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE="1", RANK="0")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        engine = build(**kwargs)
        engine.destroy()
    finally:
        ds_adapter.release_groups()
        ds_adapter.reset_zero3_counters()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return time.perf_counter() - t0


def failover_initialize(build: Callable[..., Any], init_kwargs: Dict[str, Any]):
    """`initialize` under fftrainer-launch: join (spares wait here), form the group, build, recover if a replacement."""
    # Everything allocated so far (torch, DeepSpeed, the user's imports) lives as long as the process:
    # frozen, it is not rescanned by the collections that run while an engine is rebuilt.
    gc.freeze()
    spec = RebuildSpec(init_kwargs)
    # A restarted replacement warms up too, before it joins: a fresh process's first DeepSpeed engine
    # costs seconds (many more on a busy machine), and the survivors would wait for it inside gloo
    # collectives bounded by the collective timeout; they wait at the join (no deadline) instead.
    spare = os.environ.get(membership.P.ENV_SPARE_ID) is not None
    if spare or os.environ.get(membership.P.ENV_REPLACEMENT) == "1":
        took = warm_up_spare(build, init_kwargs, spec)
        gc.collect()  # the warm-up's garbage, now, while the spare waits (not in its real build)
        gc.freeze()
        who = "hot spare" if spare else "restarted replacement"
        print(f"fftrainer_ds: {who} warmed up in {took:.2f} s", flush=True)  # the launcher log shows it
    agent = membership.join()
    first = agent.info
    tl = RecoveryTimeline(replacement=first.reason != membership.P.GenReason.START
                          or os.environ.get(membership.P.ENV_REPLACEMENT) == "1")
    tl.mark(Phase.JOINED)
    if tl.replacement:
        _pause_gc()  # resumed after its first step, like a survivor's
    before = sockets.socket_fds()
    g = agent.init_process_group()
    tl.mark(Phase.GROUP_READY)
    kwargs = dict(init_kwargs)
    for _ in range(_MAX_ATTEMPTS):
        ctl = RecoveryController(agent)
        _context.value = BuildContext(agent, g, ctl, before, spec)
        try:
            engine = build(**kwargs)  # FailoverEngine.__init__ records the training groups' sockets
            if tl.replacement:
                tl.mark(Phase.ENGINE_REBUILT)
                ctl.exchange_and_restore(engine, tl)
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
            tl = RecoveryTimeline(replacement=True)  # whatever state existed is gone with the failed attempt's peers
        finally:
            _context.value = None
    raise TerminalError(f"could not join the job after {_MAX_ATTEMPTS} generations")
