"""A state tree (nested dicts/lists/tuples of tensors, arrays and plain values) <-> snapshot segments.

Tensors become segments `t/<index>`; the skeleton with every tensor replaced by a `_Ref` is
serialized into the `meta` segment. Knows nothing of DeepSpeed (ds/state.py builds the tree).
"""
from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from ..errors import SnapshotError
from .format import ParsedSnapshot


@dataclass(frozen=True)
class _Ref:
    """Placeholder for a tensor (or numpy array) stored as segment `t/<index>`."""

    index: int
    numpy: bool = False


def _map_tree(x: Any, leaf: Callable[[Any], Any]) -> Any:
    """Rebuild a nested dict/OrderedDict/list/tuple with `leaf` applied to everything else."""
    if isinstance(x, OrderedDict):
        return OrderedDict((k, _map_tree(v, leaf)) for k, v in x.items())
    if isinstance(x, dict):
        return {k: _map_tree(v, leaf) for k, v in x.items()}
    if isinstance(x, list):
        return [_map_tree(v, leaf) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):  # named tuples stay leaves (pickled whole)
        return tuple(_map_tree(v, leaf) for v in x)
    return leaf(x)


def flatten(tree: Any) -> Tuple[Any, List[torch.Tensor]]:
    """Replace every tensor / ndarray in a nested dict/list/tuple by a `_Ref`; return (skeleton, tensors)."""
    tensors: List[torch.Tensor] = []

    def leaf(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach() if x.is_contiguous() else x.detach().contiguous())
            return _Ref(len(tensors) - 1)
        if isinstance(x, np.ndarray):
            tensors.append(torch.from_numpy(np.ascontiguousarray(x)))
            return _Ref(len(tensors) - 1, numpy=True)
        return x

    return _map_tree(tree, leaf), tensors


def unflatten(skeleton: Any, tensors: List[torch.Tensor]) -> Any:
    def leaf(x):
        if isinstance(x, _Ref):
            t = tensors[x.index]
            return t.numpy().copy() if x.numpy else t
        return x

    return _map_tree(skeleton, leaf)


@dataclass
class Captured:
    """One step's state: tensors to pack (live references!) and the already-pickled meta."""

    tensors: List[torch.Tensor]
    meta: bytes
    fingerprint: str


def encode_tree(tree: Any, fingerprint: str) -> Captured:
    """Split `tree` into its tensors (live references) and the serialized skeleton."""
    skeleton, tensors = flatten(tree)
    return Captured(tensors, pickle.dumps(skeleton, protocol=4), fingerprint)


def named_segments(cap: Captured) -> List[Tuple[str, torch.Tensor]]:
    meta = torch.frombuffer(bytearray(cap.meta), dtype=torch.uint8)
    return [(f"t/{i}", t) for i, t in enumerate(cap.tensors)] + [("meta", meta)]


def decode_tree(snap: ParsedSnapshot) -> Dict[str, Any]:
    """Rebuild the state tree from a verified snapshot (fresh tensors, never views of the buffer)."""
    by_name = {s.name: s for s in snap.segments}
    if "meta" not in by_name:
        raise SnapshotError("snapshot has no meta segment")
    tensors = []
    i = 0
    while f"t/{i}" in by_name:
        tensors.append(snap.tensor(by_name[f"t/{i}"]))
        i += 1
    skeleton = pickle.loads(bytes(snap.segment_bytes(by_name["meta"]).numpy()))
    return unflatten(skeleton, tensors)
