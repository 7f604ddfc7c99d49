"""Replication throttling: a byte-rate token bucket and an AIMD controller driven by step time.

`TokenBucket` caps the bytes every sender thread of one rank puts on the wire together
(`max_bandwidth_mbps`, or the adaptive rate). `AimdThrottle` measures a step-time baseline with
replication paused, then watches the step time while replicating: when it is inflated by more than
`max_overhead_pct` over the baseline it halves the rate (multiplicative decrease); while it is
within budget it raises the rate by a fixed increment (additive increase).

Both take an injectable clock so that the unit tests need neither threads nor sleeps.
Rates are in bytes per second; `None` means "no limit".
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from typing import Callable, Deque, Optional

MB = 1_000_000  # max_bandwidth_mbps counts decimal megabytes per second


class TokenBucket:
    """Thread-safe byte-rate limiter shared by the sender threads of one rank.

    Call order: `acquire(n)` before putting n bytes on the wire; `set_rate()` at any time (the
    controller does it from the training thread). The bucket holds at most `burst_bytes` of
    credit, so after an idle period one burst goes out immediately and then the average rate holds.
    The balance may go negative: a caller that takes more than the credit waits off the debt.
    """

    def __init__(self, rate_bps: Optional[float], burst_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate_bps must be positive or None, got {rate_bps}")
        self._rate = rate_bps
        self._burst = float(max(1, burst_bytes))
        self._clock = clock
        self._tokens = self._burst
        self._last = clock()
        self._lock = threading.Lock()

    @property
    def rate_bps(self) -> Optional[float]:
        return self._rate

    def set_rate(self, rate_bps: Optional[float]) -> None:
        with self._lock:
            self._refill()
            self._rate = rate_bps

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is None:
            self._tokens = self._burst
        else:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def reserve(self, nbytes: int) -> float:
        """Take n bytes of credit now; return how many seconds the caller must wait before sending."""
        with self._lock:
            self._refill()
            if self._rate is None:
                return 0.0
            self._tokens -= nbytes
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def acquire(self, nbytes: int, stop: Optional[threading.Event] = None) -> bool:
        """Block until n bytes may be sent; False if `stop` was set while waiting."""
        wait_s = self.reserve(nbytes)
        if wait_s <= 0:
            return True
        if stop is None:
            time.sleep(wait_s)
            return True
        return not stop.wait(wait_s)


class AimdThrottle:
    """Adaptive replication rate from step times (not thread-safe: the training thread drives it).

    Phases: `warmup_steps` ignored steps (replicating), then the baseline: `baseline_steps` steps
    with replication paused (`paused` is True: the service holds its senders during their compute
    and sends the held-back version right after it, before the optimizer step, so the replica lag
    stays at most 1 step); their median is the baseline; then replicating. Every
    `rebaseline_every_steps` (0: never) the baseline is measured again the same way.

    While replicating, each call of `observe()` adds one step time to a window of `window_steps`.
    With a full window whose median exceeds baseline * (1 + max_overhead_pct/100), and bytes sent
    during that window, the rate is multiplied by `decrease_factor` (from unlimited, the first
    back-off starts from the throughput measured over the window), the window is cleared and
    `cooldown_steps` steps pass before the next decision. Within budget, the rate grows by
    `increase_bps` per step up to `max_rate_bps` (None: no cap; it returns to unlimited once it
    passes 4x the throughput at the first back-off).

    `set_floor(bps)` raises the lower bound above `min_rate_bps`: the service sets it to the rate that
    still delivers every version within its step, because the failover guarantee (at most one
    completed step lost) ranks above the overhead budget. `floor_limited` counts the back-offs that
    the floor cut short (the budget could not be met at a one-step lag).
    """

    def __init__(self, max_overhead_pct: float, max_rate_bps: Optional[float] = None,
                 min_rate_bps: float = 1 * MB, increase_bps: Optional[float] = None,
                 decrease_factor: float = 0.5, warmup_steps: int = 1, baseline_steps: int = 3,
                 window_steps: int = 4, cooldown_steps: int = 2, rebaseline_every_steps: int = 0) -> None:
        if not 0 < decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1), got {decrease_factor}")
        if baseline_steps < 1 or window_steps < 1:
            raise ValueError("baseline_steps and window_steps must be >= 1")
        self.max_overhead_pct = max_overhead_pct
        self.max_rate_bps = max_rate_bps
        self.min_rate_bps = min_rate_bps
        self._increase = increase_bps
        self.decrease_factor = decrease_factor
        self.warmup_steps = warmup_steps
        self.baseline_steps = baseline_steps
        self.window_steps = window_steps
        self.cooldown_steps = cooldown_steps
        self.rebaseline_every_steps = rebaseline_every_steps
        self.rate_bps: Optional[float] = max_rate_bps
        self.baseline_s: Optional[float] = None
        self.backoffs = 0
        self.floor_limited = 0
        self._floor_bps = 0.0
        self._reference_bps: Optional[float] = max_rate_bps  # scale of the additive increment
        self._state = "warmup" if warmup_steps > 0 else "baseline"
        self._to_skip = warmup_steps
        self._samples: list = []
        self._since_baseline = 0
        self._window: Deque[float] = deque(maxlen=window_steps)
        self._window_bytes: Deque[int] = deque(maxlen=window_steps)
        self._cooldown = 0

    @property
    def paused(self) -> bool:
        """True on the steps of the baseline measurement: the service holds its senders during compute."""
        return self._state == "baseline"

    @property
    def phase(self) -> str:
        """"warmup", "baseline" or "replicating"."""
        return self._state

    def increase_bps(self) -> float:
        """The additive step: `increase_bps`, or 5% of the reference rate (at least min_rate_bps)."""
        if self._increase is not None:
            return self._increase
        return max(self.min_rate_bps, 0.05 * (self._reference_bps or 20 * self.min_rate_bps))

    def observe(self, step_time_s: float, sent_bytes: int = 0) -> None:
        """Feed one step's wall time and the replication bytes sent during it."""
        if self._state == "warmup":
            self._to_skip -= 1
            if self._to_skip <= 0:
                self._state = "baseline"
            return
        if self._state == "baseline":  # this step ran with replication paused: a baseline sample
            self._samples.append(step_time_s)
            if len(self._samples) >= self.baseline_steps:
                self.baseline_s = statistics.median(self._samples)
                self._samples = []
                self._state = "replicating"
                self._since_baseline = 0
                self._window.clear()
                self._window_bytes.clear()
            return
        self._since_baseline += 1
        if self.rebaseline_every_steps and self._since_baseline >= self.rebaseline_every_steps:
            self._state = "baseline"
            return
        self._window.append(step_time_s)
        self._window_bytes.append(sent_bytes)
        if self._cooldown > 0:
            self._cooldown -= 1
            return
        if len(self._window) < self.window_steps:
            return
        inflation_pct = (statistics.median(self._window) / self.baseline_s - 1.0) * 100.0 \
            if self.baseline_s and self.baseline_s > 0 else 0.0
        sent = sum(self._window_bytes)
        if inflation_pct > self.max_overhead_pct:
            if sent > 0:
                self._back_off(sent / max(sum(self._window), 1e-9))
        elif self.rate_bps is not None:
            self._increase_rate()

    def set_floor(self, floor_bps: float) -> None:
        """Never throttle below `floor_bps` (lifts the current rate at once if it is lower)."""
        self._floor_bps = max(0.0, float(floor_bps))
        if self.rate_bps is not None:
            self.rate_bps = self._clamp(self.rate_bps)

    @property
    def floor_bps(self) -> float:
        return max(self.min_rate_bps, self._floor_bps)

    def _clamp(self, rate_bps: float) -> float:
        """Within [floor, max_rate_bps]; the user's fixed max_bandwidth_mbps wins over the floor."""
        rate_bps = max(self.floor_bps, rate_bps)
        return rate_bps if self.max_rate_bps is None else min(self.max_rate_bps, rate_bps)

    def _back_off(self, throughput_bps: float) -> None:
        current = self.rate_bps if self.rate_bps is not None else throughput_bps
        if self._reference_bps is None:
            self._reference_bps = current
        wanted = current * self.decrease_factor
        if wanted < self._floor_bps:
            self.floor_limited += 1
        self.rate_bps = self._clamp(wanted)
        self.backoffs += 1
        self._window.clear()
        self._window_bytes.clear()
        self._cooldown = self.cooldown_steps

    def _increase_rate(self) -> None:
        new = self.rate_bps + self.increase_bps()
        if self.max_rate_bps is not None:
            new = min(new, self.max_rate_bps)
        elif self._reference_bps is not None and new > 4 * self._reference_bps:
            new = None
        self.rate_bps = new
