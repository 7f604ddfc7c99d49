"""The meta codec stores plain data only: every allowed type round-trips exactly, anything else is
refused at capture with its path, and a hostile meta (signed or not) can never run code."""
import math
import os
import pickle
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fftrainer_ds.errors import SnapshotError
from fftrainer_ds.snapshot.codec import META_CODEC, decode_meta, decode_tree, encode_tree, named_segments
from fftrainer_ds.snapshot.format import plan_layout, read_snapshot, write_header

KEY = b"k" * 32


def _pack(cap, key=KEY, step=7):
    """The bytes of a snapshot holding `cap`, as the snapshotter writes them (reference pack)."""
    from fftrainer_ds import ops

    named = named_segments(cap)
    layout = plan_layout(named, cap.fingerprint, "fp32")
    buf = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    sums = ops.pack(buf, [t for _, t in named], [layout.payload_off + s.offset for s in layout.segments], "reference")
    write_header(buf, layout, sums, step=step, generation=0, rank=0, world_size=1, zero_stage=2, key=key)
    return buf


def _roundtrip(tree):
    snap = read_snapshot(_pack(encode_tree(tree, "fp")), "t", key=KEY)
    return decode_tree(snap)


def _same(a, b):
    """Equal values of the same types all the way down (floats bit for bit, nan included)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8) if a.numel()
                                                                          else a, b.view(-1).view(torch.uint8)
                                                                          if b.numel() else b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    else:
        assert a == b


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 80), max_value=1 << 80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=12),
                    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool]),
                    st.lists(st.integers(0, 9), max_size=3).map(torch.Size))
keys = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.booleans(), st.none())
trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
    st.dictionaries(keys, inner, max_size=4),
    st.dictionaries(keys, inner, max_size=4).map(OrderedDict)), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(tree=trees)
def test_every_allowed_type_round_trips_exactly(tree):
    _same({"x": tree}, _roundtrip({"x": tree}))


def test_tensors_arrays_and_real_rng_states_round_trip():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "t": [torch.arange(5, dtype=torch.float32), torch.zeros((), dtype=torch.bfloat16),
                   torch.empty(0, 3, dtype=torch.int64)],
             "a": np.arange(6, dtype=np.uint32).reshape(2, 3), "od": OrderedDict([(2, "b"), (1, "a")])}
    out = _roundtrip(state)
    _same(state, out)
    random.setstate(out["python"])  # the restored states are accepted by their owners
    np.random.set_state(out["numpy"])
    torch.set_rng_state(out["torch"])


class _Custom:
    pass


@pytest.mark.parametrize("bad,path,typename", [
    ({"a": [1, {"b": _Custom()}]}, "/a/1/b", "_Custom"),
    ({"lr": np.float64(0.1)}, "/lr", "float64"),
    ({"s": {1, 2}}, "/s", "set"),
    ({"k": {(1, 2): 3}}, "/k", "tuple"),
    ({"f": len}, "/f", "builtin_function_or_method"),
])
def test_other_types_are_refused_at_capture_with_their_path(bad, path, typename):
    with pytest.raises(SnapshotError, match=typename) as info:
        encode_tree(bad, "fp")
    assert path in str(info.value)


def _snapshot_with_meta(meta: bytes, key=KEY):
    """A correctly signed snapshot whose meta segment is `meta` (what a holder of the key could write)."""
    cap = encode_tree({"x": torch.ones(3)}, "fp")
    cap.meta = meta
    return _pack(cap, key)


def test_pickled_meta_in_a_file_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cap = encode_tree({"x": torch.ones(3)}, "fp")
    cap.meta = pickle.dumps(Evil(), protocol=4)
    forged = _pack(cap, key=os.urandom(32))  # the forger has no key: recomputed checksums, own HMAC
    path = tmp_path / "rank00000.ffsnap"
    path.write_bytes(bytes(forged.numpy()))
    with pytest.raises(SnapshotError, match="authentication failed"):
        read_snapshot(path.read_bytes(), str(path), key=KEY)
    signed = read_snapshot(_snapshot_with_meta(cap.meta), "signed", key=KEY)  # even with the key ...
    with pytest.raises(SnapshotError, match="malformed meta"):
        decode_tree(signed)  # ... a pickle is not the encoding: refused, not unpickled
    assert not marker.exists()


@pytest.mark.parametrize("body", [
    ["X", 1],                              # unknown tag
    ["T", 5],                              # tensor index out of range
    ["T", True],                           # index of the wrong type
    ["d", "a"],                            # key without a value
    ["d", "a", 1, "a", 2],                 # duplicate key
    ["d", ["l"], 1],                       # unhashable key
    ["dt", "Tensor"],                      # not a dtype of the table
    ["b", "*not base64*"],
    ["f", "1e999"],
    ["sz", -1],
    [],
])
def test_hostile_but_signed_meta_decodes_to_plain_data_or_is_refused(body):
    import json

    meta = json.dumps([META_CODEC, ["d", "x", body]]).encode()
    with pytest.raises(SnapshotError, match="malformed meta"):
        decode_tree(read_snapshot(_snapshot_with_meta(meta), "signed", key=KEY))


@pytest.mark.parametrize("meta", [b'{"a": 1}', b'["ffmeta/1", NaN]', b"\xff\xfe", b'["ffmeta/0", 1]',
                                  b'["ffmeta/1", ' + b'["l", ' * 5000 + b"1" + b"]" * 5000 + b"]"])
def test_malformed_meta_documents_are_refused(meta):
    with pytest.raises(SnapshotError, match="malformed meta"):
        decode_meta(meta, lambda i, n: None, 0)


def test_decoding_only_produces_allowed_types():
    meta = encode_tree({"a": [1, 2.5, "s", b"b", None, True, (1,), OrderedDict(x=1), torch.float16,
                              torch.Size([2])], "t": torch.ones(2), "n": np.ones(2)}, "fp").meta
    allowed = (type(None), bool, int, float, str, bytes, list, tuple, dict, OrderedDict, torch.dtype, torch.Size,
               torch.Tensor, np.ndarray)

    def walk(x):
        assert type(x) in allowed, type(x)
        if isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)

    walk(decode_meta(meta, lambda i, n: np.zeros(1) if n else torch.zeros(1), 2))
