"""The soak (benchmarks/soak.py) on a shorter job, and the comparison that decides whether a soak passed.

test_short_soak: 120 steps, 16 failures (two of each kind), the same job run first without failures;
the soak itself exits non-zero unless every loss and the final state are bitwise equal. The other tests
check, on hand-made records, that the comparison (fftrainer_ds/testing/runs.py) reports every difference.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fftrainer_ds.testing import runs
from fftrainer_ds.testing.chaos import ROOT

SOAK = os.path.join(ROOT, "benchmarks", "soak.py")
KINDS = ["SIGKILL", "SIGSTOP (hang)", "exception in forward", "exception in backward", "exception in step",
         "kill during recovery", "spare killed warming up", "two ranks at once"]


@pytest.mark.slow
def test_short_soak(tmp_path):
    out = subprocess.run([sys.executable, SOAK, "--steps", "120", "--failures", "16", "--seed", "1",
                          "--keep", str(tmp_path)], capture_output=True, text=True, timeout=900)
    print(out.stdout[-6000:])
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-4000:]
    counts = dict(re.findall(r"^\| (\w[\w ()]+?) +\| (\d+) +\|", out.stdout, re.M))
    assert all(int(counts.get(k, 0)) >= 2 for k in KINDS), counts
    assert re.search(r"failures injected: (\d+) .*; survived: \1;", out.stdout), out.stdout[-3000:]


def _run(losses, digests, steps=3, recoveries=()):
    finals = {r: {"digest": d, "steps": steps, "recoveries": list(recoveries)} for r, d in enumerate(digests)}
    return runs.RunRecord(losses, finals)


BASE = _run({(r, s): [float(s)] for r in range(2) for s in (1, 2, 3)}, ["a", "b"])


def test_identical_runs_match():
    replayed = {k: v * 2 for k, v in BASE.losses.items()}         # steps recorded again after a rollback
    assert runs.mismatches(BASE, _run(replayed, ["a", "b"]), 3) == []


def test_every_difference_is_reported():
    losses = dict(BASE.losses)
    losses[(0, 2)] = [2.0, 2.5]             # a replay that differs
    del losses[(1, 3)]                      # a step never recorded
    bad = runs.mismatches(BASE, _run(losses, ["a", "c"], steps=3), 3)
    assert bad == ["rank 0 step 2: [2.0, 2.5] != 2.0", "rank 1: final weights differ", "rank 1 never recorded step 3"]
    assert runs.mismatches(BASE, _run(BASE.losses, ["a", "b"], steps=2), 3) == ["rank 0: ended at step 2, not 3",
                                                                                "rank 1: ended at step 2, not 3"]


def test_only_the_resumed_step_of_a_failed_rank_may_be_unlogged():
    losses = {k: v for k, v in BASE.losses.items() if k != (1, 2)}
    rec = {"recovery_step": 2, "failed_ranks": [1]}
    assert runs.mismatches(BASE, _run(losses, ["a", "b"], recoveries=[rec]), 3) == []
    assert runs.mismatches(BASE, _run(losses, ["a", "b"]), 3, extra=[rec]) == []   # a timeline lost with its process
    other = {"recovery_step": 2, "failed_ranks": [0]}
    assert runs.mismatches(BASE, _run(losses, ["a", "b"]), 3, extra=[other]) == ["rank 1 never recorded step 2"]
