"""A state tree (nested dicts/lists/tuples of tensors, arrays and plain values) <-> snapshot segments.

Tensors and numpy arrays become segments `t/<index>`; everything else is written into the `meta`
segment as tagged JSON (docs/FORMAT.md, "The meta segment"). Decoding can only ever produce the
types listed there: no pickle, no class is looked up by name, so a snapshot (even one signed with
the job's key) carries data, never code. A type outside that list is refused when the state is
captured, with its path in the tree (ds/state.py turns DeepSpeed's own objects into plain data).
Knows nothing of DeepSpeed.
"""
from __future__ import annotations

import base64
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from ..errors import SnapshotError
from .format import ParsedSnapshot, SegmentInfo

META_CODEC = "ffmeta/1"
MAX_DEPTH = 64  # deeper trees are refused both ways (a hostile meta must not exhaust the stack)
_SCALARS = (type(None), bool, int, str)
_PLAIN = frozenset(_SCALARS)  # written as themselves (floats are not: nan and inf need a tag)
# torch dtypes by name: a fixed table, never getattr(torch, <name from the file>)
_TORCH_DTYPES: Dict[str, torch.dtype] = {str(d).split(".")[1]: d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64)}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
_KEY_TYPES = (type(None), bool, int, float, str)


@dataclass
class Captured:
    """One step's state: tensors to pack (live references!) and the already-encoded meta."""

    tensors: List[torch.Tensor]
    meta: bytes
    fingerprint: str


# ---------------------------------------------------------------- encode
class _Encoder:
    """Walks a tree once: tensors/arrays to `tensors`, the rest to JSON-ready tagged values."""

    def __init__(self) -> None:
        self.tensors: List[torch.Tensor] = []

    def value(self, x: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SnapshotError(f"snapshot: state tree deeper than {MAX_DEPTH} levels at {path or '/'}")
        t = type(x)
        if t in _SCALARS:
            return x
        if t is float:
            return x if math.isfinite(x) else ["f", repr(x)]
        if t is list or t is tuple:
            head = ["l" if t is list else "t"]
            if set(map(type, x)) <= _PLAIN:  # e.g. python's RNG state, 625 ints: no per-item call
                return head + list(x)
            return head + [self.value(v, f"{path}/{i}", depth + 1) for i, v in enumerate(x)]
        if t is dict or t is OrderedDict:
            out: List[Any] = ["d" if t is dict else "o"]
            for k, v in x.items():
                if type(k) not in _KEY_TYPES:
                    raise SnapshotError(f"snapshot: cannot store a dict key of type {_name(type(k))} at {path or '/'}")
                out += [self.value(k, path, depth + 1), self.value(v, f"{path}/{k}", depth + 1)]
            return out
        return self._leaf(x, t, path)

    def _leaf(self, x: Any, t: type, path: str) -> Any:
        if t is bytes:
            return ["b", base64.b64encode(x).decode("ascii")]
        if isinstance(x, torch.Tensor):  # Parameters and other tensor subclasses: their data
            self.tensors.append(x.detach() if x.is_contiguous() else x.detach().contiguous())
            return ["T", len(self.tensors) - 1]
        if t is np.ndarray:
            self.tensors.append(torch.from_numpy(np.ascontiguousarray(x)))
            return ["N", len(self.tensors) - 1]
        if t is torch.dtype and x in _DTYPE_NAMES:
            return ["dt", _DTYPE_NAMES[x]]
        if t is torch.Size:
            return ["sz"] + [int(d) for d in x]
        raise SnapshotError(f"snapshot: cannot store a {_name(t)} at {path or '/'}: the state may hold only "
                            f"dict, OrderedDict, list, tuple, None, bool, int, float, str, bytes, torch dtypes and "
                            f"sizes, tensors and numpy arrays (convert it to plain data in ds/state.py)")


def _name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def encode_tree(tree: Any, fingerprint: str) -> Captured:
    """Split `tree` into its tensors (live references) and the encoded rest (SnapshotError naming
    the path of the first value of a type that is not allowed)."""
    enc = _Encoder()
    body = enc.value(tree, "", 0)
    meta = json.dumps([META_CODEC, body], separators=(",", ":"), allow_nan=False)
    return Captured(enc.tensors, meta.encode("utf-8"), fingerprint)


def named_segments(cap: Captured) -> List[Tuple[str, torch.Tensor]]:
    meta = torch.frombuffer(bytearray(cap.meta), dtype=torch.uint8)
    return [(f"t/{i}", t) for i, t in enumerate(cap.tensors)] + [("meta", meta)]


# ---------------------------------------------------------------- decode
class _Decoder:
    """Rebuilds the tree from parsed JSON; every value is checked against the allowed shapes."""

    def __init__(self, tensor: Callable[[int, bool], Any], count: int) -> None:
        self.tensor, self.count = tensor, count

    def value(self, x: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if type(x) in _SCALARS or type(x) is float:
            return x
        if type(x) is not list or not x or type(x[0]) is not str:
            raise ValueError(f"unexpected {type(x).__name__} value")
        tag, args = x[0], x[1:]
        if tag in ("l", "t"):
            items = [self.value(v, depth + 1) for v in args]
            return items if tag == "l" else tuple(items)
        if tag in ("d", "o"):
            return self._mapping(tag, args, depth)
        return self._leaf(tag, args)

    def _mapping(self, tag: str, args: List[Any], depth: int) -> Any:
        if len(args) % 2:
            raise ValueError("a mapping with a key and no value")
        out: Dict[Any, Any] = {} if tag == "d" else OrderedDict()
        for i in range(0, len(args), 2):
            k = self.value(args[i], depth + 1)
            if type(k) not in _KEY_TYPES:
                raise ValueError(f"a mapping key of type {type(k).__name__}")
            if k in out:
                raise ValueError(f"duplicate mapping key {k!r}")
            out[k] = self.value(args[i + 1], depth + 1)
        return out

    def _leaf(self, tag: str, args: List[Any]) -> Any:
        if tag == "f" and len(args) == 1 and args[0] in ("nan", "inf", "-inf"):
            return float(args[0])
        if tag == "b" and len(args) == 1 and type(args[0]) is str:
            return base64.b64decode(args[0].encode("ascii"), validate=True)
        if tag in ("T", "N") and len(args) == 1 and type(args[0]) is int and 0 <= args[0] < self.count:
            return self.tensor(args[0], tag == "N")
        if tag == "dt" and len(args) == 1 and args[0] in _TORCH_DTYPES:
            return _TORCH_DTYPES[args[0]]
        if tag == "sz" and all(type(d) is int and d >= 0 for d in args):
            return torch.Size(args)
        raise ValueError(f"unknown or malformed value tagged {tag!r}")


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _refuse_object(pairs: List[Tuple[str, Any]]) -> Any:
    raise ValueError("a JSON object (the encoding writes none)")


def decode_meta(meta: bytes, tensor: Callable[[int, bool], Any], count: int) -> Any:
    """The tree encoded in `meta`; `tensor(i, numpy)` supplies segment t/i (as an ndarray if numpy).
    SnapshotError on anything but the documented encoding."""
    try:
        doc = json.loads(meta.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_refuse_object)
        if type(doc) is not list or len(doc) != 2 or doc[0] != META_CODEC:
            raise ValueError(f"not a {META_CODEC} document")
        return _Decoder(tensor, count).value(doc[1], 0)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # binascii.Error is a ValueError
        raise SnapshotError(f"snapshot: malformed meta segment ({exc})") from None


class SegmentLoader(Protocol):
    """decode_tree's hook on a GPU rank (snapshot/device_packer.py `DeviceRestore`): fresh tensors for
    `segs`, the bulk unpacked to the device and verified there, every other segment of `snap`
    (meta included) verified on the host."""

    def load(self, snap: ParsedSnapshot, segs: Sequence[SegmentInfo]) -> List[torch.Tensor]: ...


def decode_tree(snap: ParsedSnapshot, loader: Optional[SegmentLoader] = None) -> Dict[str, Any]:
    """Rebuild the state tree from a snapshot (fresh tensors, never views of the buffer): verified by
    read_snapshot, or by `loader` (then read_snapshot(verify=False) suffices)."""
    by_name = {s.name: s for s in snap.segments}
    if "meta" not in by_name:
        raise SnapshotError("snapshot has no meta segment")
    segs: List[SegmentInfo] = []
    while f"t/{len(segs)}" in by_name:
        segs.append(by_name[f"t/{len(segs)}"])
    tensors = [snap.tensor(s) for s in segs] if loader is None else loader.load(snap, segs)

    def tensor(i: int, as_numpy: bool) -> Any:
        return tensors[i].numpy().copy() if as_numpy else tensors[i]

    return decode_meta(bytes(snap.segment_bytes(by_name["meta"]).numpy()), tensor, len(tensors))
