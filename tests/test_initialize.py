"""fftrainer_ds.initialize is a drop-in for deepspeed.initialize."""
import pytest

from fftrainer_ds.testing import run_ranks


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_disabled_equals_plain_deepspeed(stage):
    plain = run_ranks("tests._workers_snapshot:plain_vs_disabled", 2, dict(stage=stage, use_ff=False), timeout_s=300)
    ours = run_ranks("tests._workers_snapshot:plain_vs_disabled", 2, dict(stage=stage, use_ff=True), timeout_s=300)
    for a, b in zip(plain, ours):
        assert b.value["cls"] == "FailoverEngine" and b.value["is_ds"]
        assert a.value["losses"] == b.value["losses"]
        assert a.value["params"] == b.value["params"]
