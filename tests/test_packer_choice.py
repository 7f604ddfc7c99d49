"""Which packer a rank uses, and the GPU path's wiring that can be checked without a GPU (CPU).

The choice (snapshot/packer.py `choose_packer`) from where the captured bytes live and what this
process can run; the Snapshotter driving a device-style packer (stream fence without a host wait,
commit later, device-timed pack for the "auto" interval); the GPU restore hook of codec.decode_tree;
the engine hooks entering no_device_sync only with the CUDA packer.
"""
import contextlib
import logging

import pytest
import torch

from fftrainer_ds import ops
from fftrainer_ds.errors import SnapshotError
from fftrainer_ds.ops import reference
from fftrainer_ds.snapshot import codec
from fftrainer_ds.snapshot.device_packer import DeviceRestore
from fftrainer_ds.snapshot.format import plan_layout, read_snapshot, write_header
from fftrainer_ds.snapshot.interval import AutoInterval
from fftrainer_ds.snapshot.packer import (Availability, PackerKind, ThreadPacker, bytes_by_device, choose_packer,
                                          make_packer)
from fftrainer_ds.snapshot.snapshotter import Snapshotter

GB = 1 << 30
ALL = Availability(cuda=True, native_cuda=True, triton=True)
TRITON_ONLY = Availability(cuda=True, native_cuda=False, triton=True)
NO_KERNEL = Availability(cuda=True, native_cuda=False, triton=False)
CPU_ONLY = Availability(cuda=False, native_cuda=False, triton=False)
GPU_SHARD = {"cuda:0": 2 * GB, "cpu": 64 << 10}          # Adam step counters, RNG states on the host
OFFLOAD = {"cpu": 6 * GB, "cuda:0": 1 << 20}              # ZeRO-Offload: optimizer state on the host


# ---- the choice ------------------------------------------------------------------------------
def test_cpu_engine_gets_the_host_packer():
    c = choose_packer({"cpu": GB}, CPU_ONLY)
    assert c.kind is PackerKind.HOST_THREAD and not c.stage_to_host and "no CUDA device" in c.reason
    c = choose_packer({}, CPU_ONLY)
    assert c.kind is PackerKind.HOST_THREAD


def test_gpu_shard_gets_the_cuda_packer_native_first_then_triton():
    c = choose_packer(GPU_SHARD, ALL)
    assert (c.kind, c.device, c.kernel) == (PackerKind.CUDA_STREAM, "cuda:0", "native")
    assert "lowest-priority stream" in c.reason and "cuda:0" in c.describe()
    c = choose_packer(GPU_SHARD, TRITON_ONLY)
    assert (c.kind, c.kernel) == (PackerKind.CUDA_STREAM, "triton")
    assert choose_packer(GPU_SHARD, ALL, backend="triton").kernel == "triton"


@pytest.mark.parametrize("placement", [OFFLOAD, {"cpu": 6 * GB}])
def test_zero_offload_on_a_gpu_machine_is_a_host_copy(placement):
    c = choose_packer(placement, ALL)
    assert c.kind is PackerKind.HOST_THREAD
    assert "host memory" in c.reason
    assert c.stage_to_host == ("cuda:0" in placement)  # stray device tensors are copied to the host first


@pytest.mark.parametrize("have, backend, pinned, words", [
    (NO_KERNEL, "auto", True, "no CUDA pack kernel"),
    (ALL, "reference", True, "reference"),
    (ALL, "auto", False, "pin_memory is false"),
    (CPU_ONLY, "auto", True, "no CUDA device is usable"),
])
def test_gpu_shard_falls_back_to_the_host_packer_and_says_why(have, backend, pinned, words):
    c = choose_packer(GPU_SHARD, have, backend=backend, pinned=pinned)
    assert c.kind is PackerKind.HOST_THREAD and c.stage_to_host and words in c.reason


@pytest.mark.parametrize("have, backend, words", [(TRITON_ONLY, "native", "without CUDA kernels"),
                                                  (NO_KERNEL, "triton", "triton is not importable")])
def test_an_explicit_backend_that_cannot_run_raises(have, backend, words):
    with pytest.raises(ImportError, match=words):
        choose_packer(GPU_SHARD, have, backend=backend)


def test_the_device_holding_most_bytes_decides():
    c = choose_packer({"cuda:0": 10, "cuda:1": 3 * GB, "cpu": GB}, ALL)
    assert c.device == "cuda:1"


def test_bytes_by_device_and_make_packer_logs_once(caplog):
    tensors = [torch.zeros(10), torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, device="meta")]
    assert bytes_by_device(tensors) == {"cpu": 46, "meta": 8}
    with caplog.at_level(logging.INFO, logger="fftrainer_ds"):
        packer = make_packer([torch.zeros(4)], ops.get_backend("reference"), "reference", pinned=False, rank=3)
    try:
        assert isinstance(packer, ThreadPacker) and not packer.on_device and packer.last_device_s is None
        assert "rank 3 snapshot packer = host-thread" in caplog.text
    finally:
        packer.close()


# ---- the Snapshotter with a device-style packer (what DevicePacker does, without CUDA) --------------
class FakeDevicePacker:
    """Packs with the reference on wait(); fence() only records (a stream wait on the GPU)."""

    name, on_device = "fake-device", True

    def __init__(self):
        self.last_device_s = None
        self.calls = []
        self._job = None

    def start(self, dst, srcs, offsets, on_done):
        self.calls.append("start")
        self._job = (dst, list(srcs), list(offsets), on_done)

    def fence(self):
        self.calls.append("fence")

    def wait(self):
        self.calls.append("wait")
        if self._job is not None:
            dst, srcs, offsets, on_done = self._job
            self._job = None
            self.last_device_s = 0.0125
            on_done(reference.pack(dst, srcs, offsets))

    def close(self):
        self.wait()


def _captured(seed=0):
    g = torch.Generator().manual_seed(seed)
    tree = {"w": torch.randn(1000, generator=g), "m": [torch.randn(7, generator=g), 3], "n": "x"}
    return codec.encode_tree(tree, "fp")


def test_release_sources_does_not_wait_for_a_device_pack():
    s = Snapshotter(0, 1, 2, "bf16", ops.get_backend("reference"), pin=False)
    fake = s.packer = FakeDevicePacker()
    assert s.on_device and s.packer_name == "fake-device"
    s.begin(1, _captured())
    s.release_sources()                 # before the optimizer step: a stream wait, no commit yet
    assert fake.calls == ["start", "fence"] and s.pool.committed_step is None
    s.fence()                           # where the commit is needed (replication, recovery, lease)
    assert fake.calls[-1] == "wait" and s.pool.committed_step == 1
    assert s.last_pack_s == 0.0125      # the device-timed pack, not the host's wait
    assert s.take_device_pack_s() == 0.0125 and s.take_device_pack_s() is None
    with s.latest() as ref:
        parsed = read_snapshot(ref.buffer)
        assert parsed.step == 1 and torch.equal(codec.decode_tree(parsed)["w"], _captured().tensors[0])
    s.close()


def test_host_packer_release_sources_is_the_full_fence():
    s = Snapshotter(0, 1, 2, "fp32", ops.get_backend("reference"), pin=False)
    s.choose_packer([torch.zeros(1)])
    assert not s.on_device and s.packer_name == "host-thread (reference)"
    assert s.device_loader("x") is None  # a host restore: nothing changes
    s.begin(4, _captured())
    s.release_sources()
    assert s.pool.committed_step == 4 and s.take_device_pack_s() is None
    s.close()


class FakeCuda:
    """CudaPacker's surface for DevicePacker, packing with the reference on the host (no GPU here)."""

    backend_name, mode, priority = "fake", "mapped", 0

    def __init__(self, device=None, backend="auto"):
        self.device, self.sources_read, self.last_device_s, self.started = torch.device("cpu"), "sources-event", None, []

    def start(self, dst, srcs, offsets):
        self.started.append(len(srcs))
        self._job = (dst, list(srcs), list(offsets))

    def result(self):
        dst, srcs, offsets = self._job
        self.last_device_s = 0.25
        return reference.pack(dst, srcs, offsets)


def test_device_packer_commits_on_its_thread_and_packs_host_sources_itself(monkeypatch):
    from fftrainer_ds.snapshot import device_packer

    waited = []
    monkeypatch.setattr(device_packer, "CudaPacker", FakeCuda)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type(
        "Stream", (), {"wait_event": lambda self, ev: waited.append(ev)})())
    packer = device_packer.DevicePacker("cuda:0", "native", ops.get_backend("reference"))
    packer._on_device = lambda t: t.numel() >= 1000  # "device" = the big tensors, as on a GPU shard
    s = Snapshotter(0, 1, 2, "bf16", ops.get_backend("reference"), pin=False)
    s.packer = packer
    cap = _captured(3)
    s.begin(5, cap)
    assert packer.cuda.started == [1]                  # one big tensor to the device kernel
    s.release_sources()
    assert waited == ["sources-event"]                 # a stream wait, no host wait
    with s.latest() as ref:                            # fence: the completion thread committed
        parsed = read_snapshot(ref.buffer)             # every FF31 sum checked on the host
        out = codec.decode_tree(parsed)
    assert torch.equal(out["w"], cap.tensors[0]) and torch.equal(out["m"][0], cap.tensors[1])
    assert s.last_pack_s == 0.25 and s.take_device_pack_s() == 0.25
    s.close()


def test_device_timed_pack_sets_the_auto_interval_and_caps_the_host_estimate():
    p = AutoInterval(1.0)
    for _ in range(3):
        p.observe_step(0.100, False)
    p.observe_pack(0.0042)              # 4.2 ms on the device, 100 ms steps, 1 % budget -> every 5th step
    assert p.interval == 5 and p.rpo_steps == 5 and p.report()["device_pack_s"] == pytest.approx(0.0042)
    for _ in range(5):                  # the host clock claims 30 ms: the pack cannot cost more than itself
        p.observe_step(0.130, True)
    assert p.cost_s == pytest.approx(0.0042) and p.interval == 5
    q = AutoInterval(1.0)
    for _ in range(3):
        q.observe_step(0.100, False)
        q.observe_step(0.1009, True)    # measured inflation 0.9 ms below the 4.2 ms pack: the smaller wins
    q.observe_pack(0.0042)
    assert q.cost_s == pytest.approx(0.0009, rel=0.05) and q.interval == 1


# ---- the GPU restore hook of decode_tree ----------------------------------------------------------
def _snapshot_bytes(tree):
    """A real snapshot of `tree` (the job's snapshot key, as the runtime writes it)."""
    cap = codec.encode_tree(tree, "fp")
    named = codec.named_segments(cap)
    layout = plan_layout(named, "fp", "fp32")
    buf = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    sums = reference.pack(buf, [t for _, t in named], [layout.payload_off + s.offset for s in layout.segments])
    write_header(buf, layout, sums, step=7, generation=0, rank=0, world_size=1, zero_stage=2)
    return buf


class RecordingRestore(DeviceRestore):
    """DeviceRestore's choice and host checks, with the device copy recorded instead of run on a GPU."""

    def __init__(self):
        super().__init__(None, ops.get_backend("reference"), "snap.ffsnap")
        self.verified, self.moved = [], []

    def verify_host(self, snap, segs):
        super().verify_host(snap, segs)
        self.verified += [s.name for s in segs]

    def to_device(self, snap, segs):
        self.moved += [s.name for s in segs]
        return [snap.tensor(s) for s in segs]


def _shard_tree():
    g = torch.Generator().manual_seed(1)
    return {"optimizer": {"fp32": torch.randn(1 << 15, generator=g), "exp_avg": torch.randn(1 << 15, generator=g),
                          "step": torch.tensor(3.0), "small": torch.randn(100, generator=g)},
            "rng": torch.randint(0, 255, (1 << 17,), dtype=torch.uint8, generator=g), "n": 4}


def test_decode_hook_moves_the_bulk_and_verifies_every_other_segment_on_the_host():
    tree = _shard_tree()
    loader = RecordingRestore()
    out = codec.decode_tree(read_snapshot(_snapshot_bytes(tree), verify=False), loader)
    assert loader.moved == ["t/0", "t/1"]                    # fp32 partition and moment: the device
    assert sorted(loader.verified) == ["meta", "t/2", "t/3", "t/4"]  # step, small, RNG bytes, meta: the host
    for path in (("optimizer", "fp32"), ("optimizer", "step"), ("rng",)):
        a, b = out, tree
        for k in path:
            a, b = a[k], b[k]
        assert torch.equal(a, b)
    assert out["n"] == 4 and out["optimizer"]["step"].dim() == 0


def test_decode_hook_refuses_a_corrupt_host_segment_naming_the_source():
    buf = _snapshot_bytes(_shard_tree())
    parsed = read_snapshot(buf, verify=False)
    seg = [s for s in parsed.segments if s.name == "t/4"][0]  # 128 KiB of RNG-like bytes: not HMAC'd byte for byte
    buf[parsed.payload_off + seg.offset + 5] ^= 0x01
    with pytest.raises(SnapshotError, match=r"snap.ffsnap: checksum mismatch in segment 't/4'"):
        codec.decode_tree(read_snapshot(buf, verify=False), RecordingRestore())


def test_what_goes_to_the_device():
    from fftrainer_ds.snapshot.device_packer import goes_to_device
    from fftrainer_ds.snapshot.format import SegmentInfo

    big = 1 << 20
    assert goes_to_device(SegmentInfo("t/0", "float32", (big // 4,), 0, big))
    assert goes_to_device(SegmentInfo("t/0", "bfloat16", (big // 2,), 0, big))
    assert not goes_to_device(SegmentInfo("t/1", "float32", (), 0, 4))             # a step counter
    assert not goes_to_device(SegmentInfo("t/2", "uint8", (big,), 0, big))         # RNG states
    assert not goes_to_device(SegmentInfo("t/3", "float32", (16,), 0, 64))         # small buffers


# ---- the engine hooks enter no_device_sync only with the CUDA packer ---------------------------------
def test_device_sync_scope_only_with_the_cuda_packer(monkeypatch):
    from fftrainer_ds import runtime
    from fftrainer_ds.engine import _off_snapshot_stream

    entered = []

    @contextlib.contextmanager
    def recording(streams=()):
        entered.append(list(streams))
        yield True

    monkeypatch.setattr(runtime, "no_device_sync", recording)

    class FakeRuntime:
        def __init__(self, on_device):
            self.snapshotter = type("S", (), {"on_device": on_device})()

        device_sync_scope = runtime.RankRuntime.device_sync_scope

    class FakeEngine:
        def __init__(self, on_device):
            self.ff_runtime = FakeRuntime(on_device)
            self.optimizer = object()

        @_off_snapshot_stream
        def step(self):
            return len(entered)

    assert FakeEngine(False).step() == 0 and entered == []      # a CPU engine never enters it
    assert FakeEngine(True).step() == 1 and entered == [[]]     # inside it, with DeepSpeed's streams (none here)
