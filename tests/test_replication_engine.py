"""Shadow replicas with real DeepSpeed engines: byte-identical to the source's snapshot, lag <= 1 step."""
import pytest

from fftrainer_ds.testing import run_ranks

CASES = [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("stage,k", CASES, ids=[f"z{s}-k{k}" for s, k in CASES])
def test_replicas_match_source_snapshots(stage, k):
    world = 4
    res = run_ranks("tests._workers_replication_engine:replicate_and_report", world, dict(stage=stage, k=k),
                    timeout_s=600)
    own = {(r.rank, row["own"][0]): row["own"][1] for r in res for row in r.value["rows"]}
    checked, worst_lag = 0, 0
    for r in res:
        holder = r.rank
        expected_sources = {(holder - j) % world for j in range(1, k + 1)}  # ring on one node
        for row in r.value["rows"]:
            step = row["step"]
            for src, (rstep, digest) in row["held"].items():
                assert src in expected_sources
                assert digest == own[(src, rstep)], f"holder {holder}: replica of {src} step {rstep} differs"
                checked += 1
                worst_lag = max(worst_lag, step - rstep)
        assert set(r.value["rows"][-1]["held"]) == expected_sources
        assert r.value["stats"]["versions_dropped"] == 0
    assert checked >= world * k * 6
    assert worst_lag <= 1, f"replication lagged {worst_lag} steps"
    # the fence: after every step the sender has nothing older than the step before outstanding
    assert all(row["lag_sent"] <= 1 for r in res for row in r.value["rows"][1:])
    inv = res[0].value["inventory"]
    for src in range(world):
        assert len(inv[src]) == k
