"""The record of one recovery as one rank saw it: what failed, which step it resumed from, and when
each phase ended (wall-clock `time.time()`, comparable across the ranks of one machine)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


class Phase(enum.Enum):
    """The moments of a recovery, in the order they happen; a survivor and a replacement each mark
    their own subset."""

    RECOVERY_START = "recovery_start"      # the generation's publication (from its record)
    FAILURE_SEEN = "failure_seen"
    RELEASED = "released"                  # DeepSpeed's engine and the old groups dropped
    GENERATION_SEEN = "generation_seen"
    JOINED = "joined"                      # a replacement got its rank
    REGROUP_START = "regroup_start"
    GROUP_READY = "group_ready"
    ENGINE_REBUILT = "engine_rebuilt"
    PLANNED = "planned"
    TRANSFERRED = "transferred"
    RESTORED = "restored"
    FIRST_STEP_DONE = "first_step_done"


@dataclass
class RecoveryTimeline:
    """One recovery on one rank. `engine.recoveries` lists these; `to_dict()` is JSON-ready."""

    replacement: bool
    step_at_failure: Optional[int] = None      # survivors: global step when the failure was seen
    generation: Optional[int] = None
    recovery_step: Optional[int] = None
    plan: Dict[int, Tuple[Any, int]] = field(default_factory=dict)  # rank -> (recovery.Source, rank)
    failed_ranks: List[int] = field(default_factory=list)
    causes: Dict[int, str] = field(default_factory=dict)
    from_disk: bool = False
    detected_at: Optional[float] = None        # the supervisor's detection (generation record)
    lost_steps: Optional[int] = None
    at: Dict[Phase, float] = field(default_factory=dict)  # wall clock of each phase reached

    def mark(self, phase: Phase, when: Optional[float] = None) -> None:
        self.at[phase] = time.time() if when is None else when

    def finish(self) -> None:
        """The first step after the recovery completed now: derive the lost steps."""
        self.mark(Phase.FIRST_STEP_DONE)
        at_failure = self.recovery_step if self.step_at_failure is None else self.step_at_failure
        self.lost_steps = max(0, at_failure - self.recovery_step)

    @property
    def since_detect_s(self) -> Dict[str, float]:
        """Seconds from the detection (else the publication, else the failure seen) to each phase."""
        base = self.detected_at or self.at.get(Phase.RECOVERY_START) or self.at.get(Phase.FAILURE_SEEN)
        if not base:
            return {}
        return {p.value: round(self.at[p] - base, 4) for p in Phase if self.at.get(p)}

    def summary(self, rank: int) -> str:
        disk = " FROM DISK" if self.from_disk else ""
        return (f"fftrainer_ds: rank {rank} recovered: generation {self.generation}, failed ranks {self.failed_ranks} "
                f"({self.causes}), resumed at step {self.recovery_step}, lost steps {self.lost_steps}{disk}; "
                f"timeline since detection (s): {self.since_detect_s}")

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {k: getattr(self, k) for k in ("replacement", "step_at_failure", "generation",
                                                             "recovery_step", "failed_ranks", "causes", "from_disk",
                                                             "detected_at", "lost_steps")}
        out["plan"] = {r: [kind.value, holder] for r, (kind, holder) in self.plan.items()}
        out.update({p.value: t for p, t in self.at.items()})
        out["since_detect_s"] = self.since_detect_s
        return out
