"""snapshot_interval_steps policies: fixed, and "auto" within the overhead budget (CPU only)."""
import math

import pytest

from fftrainer_ds.errors import ConfigError
from fftrainer_ds.snapshot.interval import AutoInterval, FixedInterval, make_interval_policy


def drive(policy, steps, base_s, cost_s, start=1):
    """Simulate training: a snapshot after step k inflates step k+1 by cost_s."""
    in_flight = False
    taken = []
    for step in range(start, start + steps):
        policy.observe_step(base_s + (cost_s if in_flight else 0.0), in_flight)
        in_flight = policy.should_snapshot(step)
        if in_flight:
            taken.append(step)
    return taken


def test_fixed_interval():
    p = FixedInterval(3)
    assert [s for s in range(1, 10) if p.should_snapshot(s)] == [3, 6, 9]
    assert p.rpo_steps == 3 and p.report()["policy"] == "fixed"
    with pytest.raises(ConfigError):
        FixedInterval(0)


def test_make_policy():
    assert isinstance(make_interval_policy(2, 1.0), FixedInterval)
    auto = make_interval_policy("auto", 2.5)
    assert isinstance(auto, AutoInterval) and auto.budget == pytest.approx(0.025)
    with pytest.raises(ConfigError):
        make_interval_policy("sometimes", 1.0)
    with pytest.raises(ConfigError):
        make_interval_policy(True, 1.0)
    with pytest.raises(ConfigError):
        AutoInterval(0)


@pytest.mark.parametrize("cost_ms, budget_pct, expected", [
    (0.0, 1.0, 1),      # free snapshots: every step
    (1.0, 1.0, 1),      # 1 ms of 126 ms = 0.8 % <= 1 %
    (11.2, 1.0, 9),     # 8.9 % per snapshot (the measured ZeRO-2 case) -> every 9th step
    (11.2, 5.0, 2),
    (126.0, 1.0, 100),
])
def test_auto_converges_to_smallest_interval_within_budget(cost_ms, budget_pct, expected):
    p = AutoInterval(budget_pct, alpha=0.5)
    drive(p, 400, 0.126, cost_ms / 1000)
    assert p.interval == expected
    assert p.rpo_steps == expected
    over = p.overhead(p.interval)
    assert over is not None and over <= p.budget * (1 + p.hysteresis)
    # the smallest: one step less would exceed the budget (beyond the hysteresis band)
    if expected > 1:
        assert p.overhead(expected - 1) > p.budget * (1 - p.hysteresis)


def test_direct_cost_measurement_needs_no_probe():
    p = AutoInterval(1.0)
    for _ in range(5):
        p.observe_step(0.100, False)
    p.observe_cost(0.0035)
    assert p.interval == 4                     # ceil(3.5 / 1.0)
    assert all(p.should_snapshot(4 * k) for k in range(1, 50))
    r = p.report()
    assert r["interval_steps"] == 4 and r["snapshot_cost_s"] == pytest.approx(0.0035)
    assert r["predicted_overhead_pct"] == pytest.approx(0.875)


def test_probes_at_interval_one_refresh_the_baseline():
    p = AutoInterval(10.0, probe_every=10)
    taken = drive(p, 200, 0.1, 0.001)
    assert p.interval == 1
    skipped = [s for s in range(1, 201) if s not in taken]
    assert skipped, "interval 1 must skip a snapshot now and then to measure the baseline"
    assert len(skipped) <= 200 // 10 + 3  # every other step at first, then one in probe_every


def test_hysteresis_ignores_noise_and_follows_real_changes():
    p = AutoInterval(1.0, alpha=0.3, hysteresis=0.2)
    drive(p, 300, 0.100, 0.0050)
    assert p.interval == 5
    changes = p.changes
    # +-8 % noise on the cost around 5 ms: inside the band, the interval stays
    for k in range(300):
        p.observe_cost(0.0050 * (1.08 if k % 2 else 0.92))
    assert p.interval == 5 and p.changes == changes
    # the snapshot gets 3x cheaper: the interval shrinks
    for _ in range(60):
        p.observe_cost(0.0015)
    assert p.interval == 2
    # and 4x more expensive: it grows as the estimate climbs, to within the band above the budget
    for _ in range(60):
        p.observe_cost(0.020)
    assert 17 <= p.interval <= 20
    assert p.overhead(p.interval) <= p.budget * (1 + p.hysteresis)


def test_max_interval_caps_rpo():
    p = AutoInterval(0.1, max_interval=8)
    for _ in range(5):
        p.observe_step(0.1, False)
    p.observe_cost(1.0)
    assert p.interval == 8 and p.rpo_steps == 8


def test_ignores_bad_samples():
    p = AutoInterval(1.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        p.observe_step(bad, False)
    assert p.base_s is None and p.interval == 1
    assert p.report()["predicted_overhead_pct"] is None
