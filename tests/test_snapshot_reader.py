"""The reader refuses every defective or mismatched snapshot with one clear SnapshotError."""
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fftrainer_ds.errors import SnapshotError
from fftrainer_ds.snapshot.format import PREFIX, read_snapshot
from fftrainer_ds.testing import run_ranks


@pytest.fixture(scope="module")
def snap_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("snaps")
    run_ranks("tests._workers_snapshot:make_snapshots", 2, dict(stage=2, snap_dir=str(d)), timeout_s=300)
    return d


@pytest.fixture(scope="module")
def snap_bytes(snap_dir):
    return (snap_dir / "rank00000.ffsnap").read_bytes()


def test_valid_snapshot_reads(snap_bytes):
    s = read_snapshot(snap_bytes, "rank0")
    assert s.step == 3 and s.rank == 0 and s.world_size == 2 and s.zero_stage == 2
    assert s.segments[-1].name == "meta" and len(s.segments) > 5


def _expect(data, pattern):
    with pytest.raises(SnapshotError, match=pattern) as info:
        read_snapshot(bytes(data), "snapfile.ffsnap")
    assert "snapfile.ffsnap" in str(info.value)


def test_wrong_magic(snap_bytes):
    _expect(b"NOTASNAP" + snap_bytes[8:], "bad magic")


def test_wrong_version(snap_bytes):
    _expect(snap_bytes[:8] + struct.pack("<I", 99) + snap_bytes[12:], "version 99")


@pytest.mark.parametrize("keep", [0, 10, 64, 200, -1])
def test_truncated(snap_bytes, keep):
    n = len(snap_bytes) + keep if keep < 0 else keep
    _expect(snap_bytes[:n], "truncated")


def test_payload_bit_flip(snap_bytes):
    data = bytearray(snap_bytes)
    data[-300] ^= 0x10  # inside the last tensor segments / meta
    _expect(data, "checksum mismatch in segment")


def test_padding_and_trailing_bytes(snap_bytes):
    s = read_snapshot(snap_bytes)
    data = bytearray(snap_bytes)
    data[s.payload_off - 1] = 7  # manifest padding
    _expect(data, "non-zero padding")
    _expect(snap_bytes + b"\x00", "unexpected bytes after the payload")


def test_header_bit_flip(snap_bytes):
    data = bytearray(snap_bytes)
    data[PREFIX.size + 20] ^= 0x01  # inside the manifest JSON
    _expect(data, "header checksum mismatch")


def test_every_segment_is_checked(snap_bytes):
    s = read_snapshot(snap_bytes)
    for seg in s.segments:
        if seg.nbytes == 0:
            continue
        data = bytearray(snap_bytes)
        data[s.payload_off + seg.offset + seg.nbytes // 2] ^= 0x80
        _expect(data, f"segment '{seg.name}'")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_flips_and_truncations_only_raise_snapshot_error(snap_bytes, data):
    buf = bytearray(snap_bytes)
    n_flips = data.draw(st.integers(0, 4))
    for _ in range(n_flips):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(buf))))
    if cut is not None:
        buf = buf[:cut]
    if bytes(buf) == snap_bytes:
        read_snapshot(bytes(buf))  # flips cancelled out: an intact snapshot must load
        return
    with pytest.raises(SnapshotError):
        read_snapshot(bytes(buf))


def test_missing_file_names_it(tmp_path):
    from fftrainer_ds.snapshot.persist import read_file

    with pytest.raises(SnapshotError, match="nope.ffsnap"):
        read_file(str(tmp_path / "nope.ffsnap"))


@pytest.mark.slow
def test_refuses_other_world_size(snap_dir, tmp_path):
    four = tmp_path / "four"
    four.mkdir()
    for r in range(4):  # a 4-rank job finding 2-rank files (rank 2/3 files copied from 0/1)
        shutil.copy(snap_dir / f"rank{r % 2:05d}.ffsnap", four / f"rank{r:05d}.ffsnap")
    res = run_ranks("tests._workers_snapshot:restore_error", 4, dict(stage=2, snap_dir=str(four)), timeout_s=300)
    assert all("world size 2 != 4" in r.value for r in res)


@pytest.mark.slow
def test_refuses_other_stage(snap_dir):
    res = run_ranks("tests._workers_snapshot:restore_error", 2, dict(stage=3, snap_dir=str(snap_dir)), timeout_s=300)
    assert all("ZeRO stage 2 != 3" in r.value for r in res)


@pytest.mark.slow
def test_refuses_other_model_shape(snap_dir):
    res = run_ranks("tests._workers_snapshot:restore_error", 2, dict(stage=2, snap_dir=str(snap_dir), model_d=32),
                    timeout_s=300)
    assert all("fingerprint mismatch" in r.value for r in res)


@pytest.mark.slow
def test_refuses_swapped_rank_files(snap_dir, tmp_path):
    for r in range(2):
        shutil.copy(snap_dir / f"rank{r:05d}.ffsnap", tmp_path / f"rank{1 - r:05d}.ffsnap")
    res = run_ranks("tests._workers_snapshot:restore_error", 2, dict(stage=2, snap_dir=str(tmp_path)), timeout_s=300)
    assert all("rank" in r.value and "!=" in r.value for r in res)


# ---------------------------------------------------------------- authentication (format version 2)
def _twin(word: int) -> int:
    """Another 32-bit word with the same residue mod 2^31 - 1: FF31 cannot tell them apart."""
    prime = (1 << 31) - 1
    return word - prime if word >= prime else word + prime


def _forge(snap_bytes, seg_name, edit):
    """What a forger without the key can do: edit a segment, recompute its FF31 sum, the manifest and the
    header CRC. The HMAC stays the genuine one (or garbage): it cannot be recomputed."""
    import json
    import zlib

    from fftrainer_ds import ops
    from fftrainer_ds.snapshot import format as F

    s = read_snapshot(snap_bytes)
    data = bytearray(snap_bytes)
    seg = next(x for x in s.segments if x.name == seg_name)
    lo = s.payload_off + seg.offset
    data[lo:lo + seg.nbytes] = edit(bytes(data[lo:lo + seg.nbytes]))
    manifest_len = struct.unpack_from("<Q", data, 16)[0]
    doc = json.loads(bytes(data[PREFIX.size:PREFIX.size + manifest_len]))
    for entry in doc["segments"]:
        if entry["name"] == seg_name:
            entry["checksum"] = f"{ops.checksum(torch.frombuffer(data[lo:lo + seg.nbytes], dtype=torch.uint8)):016x}"
    manifest = json.dumps(doc, separators=(",", ":")).encode()
    assert len(manifest) == manifest_len
    data[PREFIX.size:PREFIX.size + manifest_len] = manifest
    prefix = bytearray(data[:PREFIX.size])
    prefix[12:16] = bytes(4)
    prefix[64:96] = bytes(32)
    struct.pack_into("<I", data, 12, zlib.crc32(manifest, zlib.crc32(bytes(prefix))))
    assert F.VERSION == 2
    return bytes(data)


def test_a_file_of_another_job_is_refused(snap_bytes):
    with pytest.raises(SnapshotError, match="snapfile.ffsnap: snapshot authentication failed"):
        read_snapshot(snap_bytes, "snapfile.ffsnap", key=os.urandom(32))


def test_forged_meta_with_recomputed_checksums_is_refused(snap_bytes):
    forged = _forge(snap_bytes, "meta", lambda b: b.replace(b'"global_steps",3', b'"global_steps",9'))
    assert forged != snap_bytes
    _expect(forged, "authentication failed")


def test_meta_and_small_segments_are_authenticated_byte_for_byte(snap_bytes):
    """A word swapped for its FF31 twin keeps every checksum: only the HMAC over the bytes sees it."""
    s = read_snapshot(snap_bytes)
    small = [x for x in s.segments if 4 <= x.nbytes <= 64 << 10]
    assert small and small[-1].name == "meta"
    for seg in small:
        def swap(b):
            word = int.from_bytes(b[:4], "little")
            return _twin(word).to_bytes(4, "little") + b[4:]
        forged = _forge(snap_bytes, seg.name, swap)
        assert forged != snap_bytes
        _expect(forged, "authentication failed")


def test_version_1_files_are_refused(snap_bytes):
    _expect(snap_bytes[:8] + struct.pack("<I", 1) + snap_bytes[12:], "version 1 is not supported")


@pytest.mark.slow
def test_restore_refuses_a_file_written_under_another_secret(snap_dir, tmp_path):
    secret = tmp_path / "job.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    res = run_ranks("tests._workers_snapshot:restore_error", 2, dict(stage=2, snap_dir=str(snap_dir)), timeout_s=300,
                    env={"FFTRAINER_SECRET_FILE": str(secret)})
    for r in res:
        assert "authentication failed" in r.value and f"rank{r.rank:05d}.ffsnap" in r.value, r.value
