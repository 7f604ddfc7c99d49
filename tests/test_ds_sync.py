"""no_device_sync: a no-op on CPU, and its patch of the accelerator is undone on exit (CPU)."""
import pytest
import torch

from fftrainer_ds.ds import sync as _ds_sync
from fftrainer_ds.ds.sync import _patched, count_device_syncs, deepspeed_streams, no_device_sync


class FakeAccelerator:
    def __init__(self):
        self.calls = []

    def synchronize(self, device_index=None):
        self.calls.append(("device", device_index))


def test_no_op_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with no_device_sync() as active:
        assert active is False
    assert deepspeed_streams(object()) == []


def test_patch_restores_on_exit_and_on_error():
    acc = FakeAccelerator()
    original = acc.synchronize
    with _patched(acc, lambda device_index=None: acc.calls.append(("patched", device_index))):
        acc.synchronize()
        with _patched(acc, lambda device_index=None: acc.calls.append(("inner", device_index))):
            acc.synchronize(0)
        acc.synchronize()
    assert acc.calls == [("patched", None), ("inner", 0), ("patched", None)]
    assert "synchronize" not in vars(acc) and acc.synchronize == original
    with pytest.raises(KeyError):
        with _patched(acc, lambda device_index=None: None):
            raise KeyError("boom")
    assert "synchronize" not in vars(acc)
    acc.synchronize()
    assert acc.calls[-1] == ("device", None)


def test_patch_keeps_a_preexisting_instance_attribute():
    acc = FakeAccelerator()
    mine = lambda device_index=None: None  # noqa: E731
    acc.synchronize = mine
    with _patched(acc, lambda device_index=None: None):
        assert acc.synchronize is not mine
    assert acc.synchronize is mine


def test_count_device_syncs_counts_and_restores():
    acc = FakeAccelerator()
    with count_device_syncs(acc) as n:
        acc.synchronize()
        acc.synchronize(1)
    assert n == [2] and len(acc.calls) == 2
    assert "synchronize" not in vars(acc)


def test_patched_path_uses_current_stream_sync(monkeypatch):
    """With a CUDA accelerator present, the replacement syncs the current stream and the given ones."""
    acc = FakeAccelerator()
    acc.device_name = lambda: "cuda"
    synced = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def synchronize(self):
            synced.append(self.name)

    monkeypatch.setattr(_ds_sync, "_cuda_accelerator", lambda: acc)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(f"current{device}"))
    with no_device_sync([FakeStream("reduction")]) as active:
        assert active is True
        acc.synchronize()
    assert synced == ["currentNone", "reduction"] and acc.calls == []
    assert "synchronize" not in vars(acc)


def test_real_deepspeed_accelerator_untouched_on_cpu():
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    before = vars(acc).get("synchronize")
    with no_device_sync():
        pass
    with count_device_syncs(acc) as n:
        acc.synchronize()
    assert n == [1]
    assert vars(acc).get("synchronize") is before
