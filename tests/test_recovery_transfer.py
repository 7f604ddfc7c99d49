"""Recovery transfer on real gloo ranks: chunked and verified like replication, re-sends a corrupt
chunk, switches to the next holder when one keeps failing, and fails cleanly when all do."""
from fftrainer_ds.failover.recovery import RankInfo
from fftrainer_ds.replication.direct import MAX_RESEND_ROUNDS
from fftrainer_ds.testing import run_ranks
from tests._workers_replication import content, digest
from tests._workers_transfer import CHUNKS, NBYTES, STEP

W = "tests._workers_transfer:recover"
ALWAYS = 1 << 30  # a corrupt rule that never runs out


def _run(infos, corrupt=None, forge=None):
    return run_ranks(W, len(infos), {"infos": infos, "corrupt": corrupt or {}, "forge": forge or {}}, timeout_s=120)


def _expected(src):
    return digest(content(src, STEP, NBYTES))


def _replacement_of_1_held_by(*holders):
    """Rank 1 is a replacement; its replica of STEP is held by `holders`; everyone else has its own."""
    return [RankInfo(r, r == 1, [] if r == 1 else [STEP], {1: [STEP]} if r in holders else {}) for r in range(4)]


def test_clean_transfer_returns_the_holders_bytes():
    # 1 and 2 are replacements; 1's replica is on 0 and 3, 2's on 3 only.
    infos = [RankInfo(0, False, [STEP], {1: [STEP]}), RankInfo(1, True, [], {}), RankInfo(2, True, [], {}),
             RankInfo(3, False, [STEP], {1: [STEP], 2: [STEP]})]
    v = [r.value for r in _run(infos)]
    assert v[0]["holders"] == {1: [0, 3], 2: [3]}
    assert v[1]["digest"] == _expected(1) and v[2]["digest"] == _expected(2)
    assert v[0]["digest"] is None and v[3]["digest"] is None and not any(x["error"] for x in v)
    assert v[1]["received"] == v[2]["received"] == CHUNKS
    assert v[0]["sent"] == CHUNKS and v[3]["sent"] == CHUNKS  # 3 was told "not needed" for rank 1
    assert v[3]["leases"] == 1 and all(x["unreleased"] == 0 for x in v)


def test_a_chunk_corrupted_in_flight_is_detected_and_resent():
    corrupt = {0: [dict(dst=1, step=STEP, chunk_index=1, times=1)]}
    res = _run(_replacement_of_1_held_by(0, 2), corrupt)
    v = [r.value for r in res]
    assert v[1]["digest"] == _expected(1)
    assert v[0]["corrupted"] == 1 and v[0]["sent"] == CHUNKS + 1 and v[1]["received"] == CHUNKS + 1
    assert v[2]["sent"] == 0 and v[2]["leases"] == 0  # the second holder was never needed
    assert "chunk 1/6 checksum mismatch" in res[1].log and "re-sends 1 chunk(s)" in res[0].log


def test_a_holder_that_keeps_failing_is_replaced_by_the_next():
    corrupt = {0: [dict(dst=1, chunk_index=None, times=ALWAYS)]}
    res = _run(_replacement_of_1_held_by(0, 2, 3), corrupt)
    v = [r.value for r in res]
    assert v[1]["holders"] == {1: [0, 2, 3]}
    assert v[1]["digest"] == _expected(1) and not any(x["error"] for x in v)
    assert v[0]["sent"] == CHUNKS * (MAX_RESEND_ROUNDS + 1)  # every round failed in full
    assert v[2]["sent"] == CHUNKS and v[3]["sent"] == 0
    assert all(x["unreleased"] == 0 for x in v)
    assert "switches from holder rank 0 to rank 2" in res[1].log


def test_every_holder_corrupt_raises_on_the_receiver_and_nobody_hangs():
    # Rank 1 lost step 5 (it only has 4): its replica is on 0 and 3, both corrupt everything they send
    # it. Rank 1 also holds replacement 2's replica: after its own failure it still serves rank 2.
    infos = [RankInfo(0, False, [STEP], {1: [STEP]}), RankInfo(1, False, [STEP - 1], {2: [STEP]}),
             RankInfo(2, True, [], {}), RankInfo(3, False, [STEP], {1: [STEP], 2: [STEP]})]
    corrupt = {h: [dict(dst=1, chunk_index=None, times=ALWAYS)] for h in (0, 3)}
    v = [r.value for r in _run(infos, corrupt)]
    assert v[1]["holders"] == {1: [0, 3], 2: [1, 3]}
    err = v[1]["error"]
    assert err is not None and "rank 1" in err and "step 5" in err and "[0, 3]" in err
    assert v[1]["digest"] is None and v[2]["digest"] == _expected(2)
    assert v[0]["error"] is None and v[2]["error"] is None and v[3]["error"] is None
    assert v[0]["sent"] == v[3]["sent"] == CHUNKS * (MAX_RESEND_ROUNDS + 1)
    assert all(x["unreleased"] == 0 for x in v)


def test_a_forged_chunk_is_refused_and_resent():
    """A chunk put on the wire without the job's key has a right FF31 sum but no valid HMAC tag: refused
    like a corrupt one, re-sent, and the replacement restores the holder's genuine bytes."""
    forge = {0: [dict(dst=1, step=STEP, chunk_index=2)]}
    res = _run(_replacement_of_1_held_by(0, 2), forge=forge)
    v = [r.value for r in res]
    assert v[0]["forged"] == 1 and v[1]["digest"] == _expected(1) and not any(x["error"] for x in v)
    assert v[0]["sent"] == CHUNKS + 1 and v[2]["sent"] == 0
    assert "chunk 2/6 failed authentication" in res[1].log and "checksum mismatch" not in res[1].log
    assert "re-sends 1 chunk(s)" in res[0].log
