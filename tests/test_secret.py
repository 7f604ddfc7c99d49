"""The job secret: where it comes from, how keys derive from it, how fftrainer-launch hands it to its
children, and that ranks with another secret are refused in the recovery exchanges."""
import hashlib
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from fftrainer_ds import launch, secret
from fftrainer_ds.errors import ConfigError, RecoverableError
from fftrainer_ds.failover.recovery import RankInfo, _info_from_doc
from fftrainer_ds.replication.inventory import _entries
from fftrainer_ds.testing import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _secret_file(tmp_path, name="job.secret", data=None, mode=0o600):
    path = tmp_path / name
    path.write_bytes(os.urandom(32) if data is None else data)
    path.chmod(mode)
    return str(path)


# ---------------------------------------------------------------- keys
def test_keys_differ_by_purpose_generation_and_secret():
    a, b = secret.JobSecret.from_bytes(b"a" * 32, "a"), secret.JobSecret.from_bytes(b"b" * 32, "b")
    keys = {a.key(p, g) for p in secret.Purpose for g in (None, 0, 1, 2)}
    assert len(keys) == len(secret.Purpose) * 4 and all(len(k) == 32 for k in keys)
    assert a.key(secret.Purpose.SNAPSHOT) == secret.JobSecret.from_bytes(b"a" * 32, "again").key("snapshot")
    assert a.key(secret.Purpose.REPLICATION, 3) != b.key(secret.Purpose.REPLICATION, 3)
    with pytest.raises(ValueError):
        a.key("no such purpose")


def test_without_a_secret_file_the_public_fallback_is_used_everywhere(tmp_path):
    fallback = secret.load({})
    assert not fallback.keyed and "public" in fallback.origin
    assert secret.load({"MASTER_PORT": "1"}).key("snapshot") == fallback.key("snapshot")  # the same in every run
    path = _secret_file(tmp_path)
    keyed = secret.load({secret.ENV_SECRET_FILE: path})
    assert keyed.keyed and keyed.key("snapshot") != fallback.key("snapshot")
    with open(path, "rb") as f:
        assert keyed.key("replication", 1) == secret.JobSecret.from_bytes(f.read(), "x").key("replication", 1)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_file_open_to_group_or_others_is_refused(tmp_path, mode):
    path = _secret_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o} lets group or others access it.*chmod 600"):
        secret.read_secret_file(path)


def test_missing_short_and_odd_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot open"):
        secret.read_secret_file(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="holds 5 bytes, needs 16"):
        secret.read_secret_file(_secret_file(tmp_path, data=b"short"))
    with pytest.raises(ConfigError, match="cannot open"):  # a symlink is not followed
        link = tmp_path / "link"
        link.symlink_to(_secret_file(tmp_path, "real"))
        secret.read_secret_file(str(link))
    assert secret.read_secret_file(_secret_file(tmp_path, "ok", data=b"x" * 16, mode=0o400)) == b"x" * 16


def test_handoff_is_a_private_file_removed_at_the_end():
    h = secret.HandOff.create(None)
    try:
        assert stat.S_IMODE(os.stat(h.directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(h.path).st_mode) == 0o600
        assert len(secret.read_secret_file(h.path)) == secret.SECRET_BYTES
        assert h.env() == {secret.ENV_SECRET_FILE: h.path}
    finally:
        h.remove()
    assert not os.path.exists(h.directory)


# ---------------------------------------------------------------- the launcher
def test_launcher_refuses_several_nodes_without_a_secret_file(capsys, monkeypatch):
    monkeypatch.delenv(secret.ENV_SECRET_FILE, raising=False)
    with pytest.raises(SystemExit) as info:
        launch.parse_args(["--nnodes", "2", "--master-port", "29999", "train.py"])
    assert info.value.code == 2 and "--nnodes > 1 needs --secret-file PATH" in capsys.readouterr().err


def test_launcher_refuses_a_readable_secret_file(tmp_path, capsys):
    path = _secret_file(tmp_path, mode=0o644)
    with pytest.raises(SystemExit) as info:
        launch.parse_args(["--nnodes", "2", "--master-port", "29999", "--secret-file", path, "train.py"])
    assert info.value.code == 2 and "--secret-file" in capsys.readouterr().err


def test_launcher_takes_the_secret_file_from_the_environment(tmp_path, monkeypatch):
    path = _secret_file(tmp_path)
    monkeypatch.setenv(secret.ENV_SECRET_FILE, path)
    assert launch.parse_args(["--nnodes", "2", "--master-port", "29999", "train.py"]).secret_file == path


_CHILD = textwrap.dedent("""
    import hashlib, os, sys
    from fftrainer_ds import secret
    path = os.environ[secret.ENV_SECRET_FILE]
    key = secret.current().key(secret.Purpose.SNAPSHOT)
    with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as f:
        f.write(" ".join([hashlib.sha256(key).hexdigest(), path, open("/proc/self/cmdline", "rb").read().hex()]))
""")


def _launch(tmp_path, *flags):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(secret.ENV_SECRET_FILE, None)
    proc = subprocess.run([sys.executable, "-m", "fftrainer_ds.launch", "--nproc-per-node", "2", *flags, str(script),
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [(out / f"rank{r}").read_text().split() for r in range(2)]


@pytest.mark.slow
def test_launcher_hands_a_random_secret_to_its_children_through_a_private_file(tmp_path):
    (key0, path0, cmd0), (key1, path1, cmd1) = _launch(tmp_path)
    assert key0 == key1 and path0 == path1
    assert key0 != hashlib.sha256(secret.load({}).key(secret.Purpose.SNAPSHOT)).hexdigest()  # not the fallback
    assert not os.path.exists(path0) and not os.path.exists(os.path.dirname(path0))  # removed at the end
    assert path0.encode().hex() not in cmd0  # neither the secret nor its path on the command line
    (tmp_path / "again").mkdir()
    assert _launch(tmp_path / "again")[0][0] != key0  # a new launch, a new secret


@pytest.mark.slow
def test_launcher_hands_the_users_secret_file_over(tmp_path):
    path = _secret_file(tmp_path)
    (key0, path0, _), (key1, _, _) = _launch(tmp_path, "--secret-file", path)
    expected = secret.load({secret.ENV_SECRET_FILE: path}).key(secret.Purpose.SNAPSHOT)
    assert key0 == key1 == hashlib.sha256(expected).hexdigest()
    assert path0 != path and os.path.exists(path)  # children read a private copy; the user's file stays


# ---------------------------------------------------------------- recovery exchanges without pickle
@pytest.mark.parametrize("doc,why", [
    ({"rank": 0, "replacement": False, "own_steps": [1], "held": [], "disk_steps": []}, "rank"),  # claims rank 0
    ({"rank": 1, "replacement": 0, "own_steps": [1], "held": [], "disk_steps": []}, "replacement"),
    ({"rank": 1, "replacement": False, "own_steps": [1.5], "held": [], "disk_steps": []}, "own_steps"),
    ({"rank": 1, "replacement": False, "own_steps": [True], "held": [], "disk_steps": []}, "own_steps"),
    ({"rank": 1, "replacement": False, "own_steps": [], "held": [[0, [1]], [0, [2]]], "disk_steps": []}, "held"),
    ({"rank": 1, "replacement": False, "own_steps": [], "held": {"0": [1]}, "disk_steps": []}, "held"),
    ({"rank": 1, "replacement": False, "own_steps": [], "held": [], "disk_steps": [], "x": 1}, "fields"),
    (["py/object", "os.system"], "fields"),
])
def test_rank_infos_are_parsed_strictly(doc, why):
    with pytest.raises(RecoverableError, match=f"malformed rank info from rank 1.*{why}"):
        _info_from_doc(doc, 1)


def test_rank_info_round_trips():
    from fftrainer_ds.failover.recovery import _info_doc

    info = RankInfo(3, True, [4, 5], {0: [5], 2: [4, 5]}, [2])
    assert _info_from_doc(_info_doc(info), 3) == info


@pytest.mark.parametrize("inv", [{"0": []}, [[0]], [[9, []]], [[0, [[0]]]], [[0, [[0, "1"]]]], [[True, []]]])
def test_inventory_entries_are_parsed_strictly(inv):
    with pytest.raises(ValueError):
        _entries(inv, 2)


@pytest.mark.parametrize("inventory", [False, True], ids=["rank-infos", "inventory"])
def test_a_rank_with_another_secret_is_refused_by_every_exchange(tmp_path, inventory):
    infos = [RankInfo(0, False, [5], {1: [5]}), RankInfo(1, False, [5], {0: [5]})]
    same = _secret_file(tmp_path)
    ok = run_ranks("tests._workers_transfer:exchange_infos", 2, dict(infos=infos, inventory=inventory),
                   env={secret.ENV_SECRET_FILE: same}, timeout_s=120)
    if inventory:
        assert ok[0].value["got"] == {0: {1: [(0, 5)]}, 1: {0: [(0, 5)]}}
    else:
        assert ok[0].value["got"] == ok[1].value["got"] == infos
    other = {1: {secret.ENV_SECRET_FILE: _secret_file(tmp_path, "other")}}
    bad = run_ranks("tests._workers_transfer:exchange_infos", 2, dict(infos=infos, inventory=inventory),
                    env={secret.ENV_SECRET_FILE: same}, extra_env_per_rank=other, timeout_s=120)
    for r in bad:
        assert r.value["got"] is None and f"rank {1 - r.rank} failed authentication" in r.value["error"]


def test_write_secret_file_makes_a_private_file_once(tmp_path):
    path = secret.write_secret_file(str(tmp_path / "job.secret"))
    first = open(path, "rb").read()
    assert len(first) == 32 and os.stat(path).st_mode & 0o777 == 0o600
    assert secret.write_secret_file(path) == path and open(path, "rb").read() == first  # never replaced
    assert secret.read_secret_file(path) == first
