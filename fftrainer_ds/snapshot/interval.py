"""How often to snapshot: a fixed interval, or `"auto"` within a step-time overhead budget.

Cost model: a snapshot inflates the step it overlaps by `cost_s` seconds; with one snapshot every
N steps of `base_s` seconds the overhead is cost_s / (N * base_s). `AutoInterval` keeps the
smallest N with overhead <= budget, i.e. N = ceil(cost_s / (budget * base_s)), from measurements:

- `observe_step(step_s, snapshot)`: the wall time of a step and whether a snapshot's pack was in
  flight during it (with the async packer, step N's pack inflates step N+1: pass True for N+1).
  Two EMAs (with / without) give base_s and cost_s = max(0, with - without).
- `observe_cost(cost_s)`: a direct measurement of the inflation, when the caller has one.
- `observe_pack(pack_s)`: one pack's duration timed on the device where it ran (the CUDA packer's
  start and completion events; the host packer reports none). A pack on a side stream inflates the
  step it overlaps by at most its own duration, so cost_s = min(pack_s, with - without), and pack_s
  alone until the with/without estimate exists: on a GPU the host's step clock is only as good as
  the syncs that bound it, the pack's events are exact.

At interval 1 every step carries a snapshot, so no baseline would ever be seen: `should_snapshot`
then skips one snapshot every `probe_every` steps to refresh it (every other step until
`min_samples` baselines exist); the RPO around a skipped snapshot is 2.

Hysteresis: the interval grows as soon as the predicted overhead exceeds budget * (1 + hysteresis)
and shrinks only to an interval whose predicted overhead stays below budget * (1 - hysteresis),
so noise around the threshold does not make it flip. RPO in steps = the interval: the completed
optimizer steps a failure can lose (the snapshot of step k commits while step k+1 runs).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Union

from ..errors import ConfigError

logger = logging.getLogger("fftrainer_ds")


class FixedInterval:
    """Snapshot every `steps` optimizer steps."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ConfigError(f"fast_failover.snapshot_interval_steps: must be >= 1 (got {steps})")
        self.interval = steps

    def should_snapshot(self, step: int) -> bool:
        return step % self.interval == 0

    def observe_step(self, step_s: float, snapshot: bool) -> None:
        """Fixed: measurements change nothing."""

    def observe_cost(self, cost_s: float) -> None:
        """Fixed: measurements change nothing."""

    def observe_pack(self, pack_s: float) -> None:
        """Fixed: measurements change nothing."""

    @property
    def rpo_steps(self) -> int:
        return self.interval

    def report(self) -> Dict[str, Union[int, float, str, None]]:
        return {"policy": "fixed", "interval_steps": self.interval, "rpo_steps": self.rpo_steps}


class AutoInterval:
    """The smallest snapshot interval whose measured overhead fits `budget_pct` (see module doc)."""

    def __init__(self, budget_pct: float, *, alpha: float = 0.2, hysteresis: float = 0.2, max_interval: int = 1000,
                 probe_every: int = 50, min_samples: int = 3):
        if not 0 < budget_pct <= 100:
            raise ConfigError(f"fast_failover.snapshot_overhead_budget_pct: must be in (0, 100] (got {budget_pct})")
        if not 0 < alpha <= 1 or not 0 <= hysteresis < 1 or max_interval < 1 or probe_every < 2 or min_samples < 1:
            raise ValueError("AutoInterval: need 0 < alpha <= 1, 0 <= hysteresis < 1, max_interval >= 1, "
                             "probe_every >= 2, min_samples >= 1")
        self.budget = budget_pct / 100.0
        self.alpha, self.hysteresis = alpha, hysteresis
        self.max_interval, self.probe_every, self.min_samples = max_interval, probe_every, min_samples
        self.interval = 1
        self.changes = 0
        self._with: Optional[float] = None     # EMA of step time with a snapshot in flight
        self._without: Optional[float] = None  # EMA of step time without
        self._cost: Optional[float] = None     # EMA of directly observed cost
        self._pack: Optional[float] = None     # EMA of device-timed pack durations
        self._n_with = self._n_without = 0
        self._since_baseline = 0

    # ---- measurements ----
    def _ema(self, old: Optional[float], x: float) -> float:
        return x if old is None else self.alpha * x + (1 - self.alpha) * old

    def observe_step(self, step_s: float, snapshot: bool) -> None:
        """Wall time of one step, and whether a snapshot was being packed during it."""
        if not step_s > 0 or math.isinf(step_s):
            return
        if snapshot:
            self._with = self._ema(self._with, step_s)
            self._n_with += 1
            self._since_baseline += 1
        else:
            self._without = self._ema(self._without, step_s)
            self._n_without += 1
            self._since_baseline = 0
        self._update()

    def observe_cost(self, cost_s: float) -> None:
        """Seconds of step-time inflation caused by one snapshot (measured directly)."""
        if cost_s >= 0 and not math.isinf(cost_s):
            self._cost = self._ema(self._cost, cost_s)
            self._update()

    def observe_pack(self, pack_s: float) -> None:
        """Seconds one pack took on the device (an upper bound of the inflation it causes)."""
        if pack_s >= 0 and not math.isinf(pack_s):
            self._pack = self._ema(self._pack, pack_s)
            self._update()

    @property
    def base_s(self) -> Optional[float]:
        """Estimated step time without snapshots."""
        if self._without is not None and self._n_without >= self.min_samples:
            return self._without
        return None

    @property
    def cost_s(self) -> Optional[float]:
        """Estimated inflation per snapshot: the direct measurement if any, else with - without, capped
        by the device-timed pack duration when there is one."""
        if self._cost is not None:
            return self._cost
        inflation = None
        if self.base_s is not None and self._with is not None and self._n_with >= self.min_samples:
            inflation = max(0.0, self._with - self.base_s)
        if self._pack is None:
            return inflation
        return self._pack if inflation is None else min(self._pack, inflation)

    # ---- decision ----
    def overhead(self, interval: int) -> Optional[float]:
        """Predicted overhead fraction at `interval` (None until measured)."""
        base, cost = self.base_s, self.cost_s
        if base is None or cost is None:
            return None
        return cost / (interval * base)

    def _smallest(self, budget: float) -> int:
        n = math.ceil(self.cost_s / (budget * self.base_s) - 1e-12) if self.cost_s > 0 else 1
        return max(1, min(self.max_interval, n))

    def _update(self) -> None:
        over = self.overhead(self.interval)
        if over is None:
            return
        new = self.interval
        if over > self.budget * (1 + self.hysteresis):
            new = self._smallest(self.budget)
        else:
            lower = self._smallest(self.budget * (1 - self.hysteresis))
            if lower < self.interval:
                new = lower
        if new != self.interval:
            logger.info("fftrainer_ds: snapshot interval %d -> %d steps (RPO %d steps): snapshot cost %.2f ms%s, "
                        "step %.1f ms, budget %.2f%%", self.interval, new, new, 1e3 * self.cost_s,
                        " (device-timed pack)" if self._pack is not None else "", 1e3 * self.base_s, 100 * self.budget)
            self.interval = new
            self.changes += 1

    def should_snapshot(self, step: int) -> bool:
        """Whether to snapshot after optimizer step `step` (skips one for a baseline probe at interval 1)."""
        if step % self.interval:
            return False
        if self.interval == 1 and self._cost is None:
            # Baseline probe: every other step until min_samples baselines exist, then every probe_every.
            period = 2 if self._n_without < self.min_samples else self.probe_every
            if self._since_baseline >= period - 1:
                return False
        return True

    @property
    def rpo_steps(self) -> int:
        """Completed optimizer steps a failure can lose at the current interval."""
        return self.interval

    def report(self) -> Dict[str, Union[int, float, str, None]]:
        over = self.overhead(self.interval)
        return {"policy": "auto", "interval_steps": self.interval, "rpo_steps": self.rpo_steps,
                "budget_pct": self.budget * 100, "predicted_overhead_pct": None if over is None else over * 100,
                "base_step_s": self.base_s, "snapshot_cost_s": self.cost_s, "device_pack_s": self._pack,
                "interval_changes": self.changes}


def make_interval_policy(interval_steps: Union[int, str], budget_pct: float) -> Union[FixedInterval, AutoInterval]:
    """The policy for `snapshot_interval_steps` (an int, or "auto" with `snapshot_overhead_budget_pct`)."""
    if interval_steps == "auto":
        return AutoInterval(budget_pct)
    if isinstance(interval_steps, bool) or not isinstance(interval_steps, int):
        raise ConfigError(f'fast_failover.snapshot_interval_steps: must be an integer >= 1 or "auto" '
                          f"(got {interval_steps!r})")
    return FixedInterval(interval_steps)
