"""Survivor side of a regroup: new process-group generation, engine rebuilt in place, own snapshot restored."""
import pytest

from fftrainer_ds.testing import run_ranks


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_rebuild_in_place_and_roll_back_is_bit_exact(stage):
    base = run_ranks("tests._workers_regroup:uninterrupted", 2, dict(stage=stage), timeout_s=300)
    # Train to 13, roll back to the snapshot of step 10 on rebuilt engines, train to 20.
    rebuilt = run_ranks("tests._workers_regroup:regroup_midway", 2, dict(stage=stage, rollback=3), timeout_s=300)
    for a, b in zip(base, rebuilt):
        assert a.value["losses"] == b.value["losses"]
        assert a.value["digest"] == b.value["digest"]
