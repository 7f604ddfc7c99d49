"""The `deepspeed` launcher keeps working: without the section, and with it (snapshots, no failover)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_gpt.py")


def _free_port() -> int:
    # The deepspeed launcher needs a concrete --master_port (it cannot take 0); ask the OS for one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out, extra):
    ds = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    cmd = [ds, "--num_gpus", "2", "--master_port", str(_free_port()), SCRIPT, "--steps", "5", "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = {}
    for rank in range(2):
        with open(os.path.join(out, f"losses.rank{rank}.jsonl")) as f:
            losses[rank] = [json.loads(line)["loss"] for line in f]
    return losses


@pytest.mark.slow
def test_deepspeed_launcher_with_and_without_fast_failover(tmp_path):
    plain = _run(tmp_path / "plain", ["--no-failover"])
    with_ff = _run(tmp_path / "ff", [])
    assert plain == with_ff and len(plain[0]) == 5
    with open(tmp_path / "ff" / "final.rank0.json") as f:
        final = json.load(f)
    assert final["snapshot"]["snapshots"] == 5 and final["recoveries"] == []
