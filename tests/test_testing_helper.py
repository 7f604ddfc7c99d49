import pytest

from fftrainer_ds.testing import run_ranks


def test_run_ranks_collects_results():
    res = run_ranks("tests._workers_smoke:allreduce_rank", 3, timeout_s=60)
    assert [r.value for r in res] == [3.0, 3.0, 3.0]


def test_run_ranks_reports_failure():
    with pytest.raises(RuntimeError, match="failed"):
        run_ranks("tests._workers_smoke:no_such_function", 2, timeout_s=60)
