"""A real CUDA engine through the wired GPU path (run on the lent GPU machine).

1-rank ZeRO-2 on CUDA, fp16 (dynamic loss scaler) and bf16: train to step 10, persist, train to 30;
a new process restores step 10 (unpacked and verified on the device) and trains to 30. Every step's
loss, loss scale and skipped-step count, and the final weights and optimizer state, must equal the
uninterrupted run bit for bit. Both runs snapshot every step through the CUDA stream packer, and no
device-wide synchronize happens in their steps (DeepSpeed's run inside no_device_sync).
"""
import pytest
import torch

from fftrainer_ds.testing import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
WORKERS = "tests.gpu._workers_gpu"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_persist_restore_on_gpu_is_bit_exact(tmp_path, dtype):
    kw = dict(stage=2, dtype=dtype, snap_dir=str(tmp_path))
    (full,) = run_ranks(f"{WORKERS}:train_persist", 1, kw, timeout_s=300, env=ENV)
    (resumed,) = run_ranks(f"{WORKERS}:restore_train", 1, kw, timeout_s=300, env=ENV)
    a, b = full.value, resumed.value
    assert a["on_device"] and b["on_device"], (a["backend"], b["backend"])
    assert a["backend"].startswith("cuda-stream") and b["backend"] == a["backend"]
    assert b["restored_step"] == 10
    expected = {s: v for s, v in a["steps"].items() if s > 10}
    assert sorted(expected) == list(range(11, 31))
    assert b["steps"] == expected, "losses / loss scale / skipped steps differ after the GPU restore"
    assert b["digest"] == a["digest"], "final weights or optimizer state differ"
    if dtype == "fp16":
        scales = {v[1] for v in a["steps"].values()}
        assert len(scales) > 1, f"the loss scale never moved ({scales}): the test would not see the scaler"
    assert a["device_syncs"] == 0 and b["device_syncs"] == 0, "a device-wide synchronize waited for the pack"
