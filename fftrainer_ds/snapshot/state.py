"""A rank's whole training state as (tensors, meta): capture it from an engine, apply it back.

The tree holds the ZeRO shard (through DeepSpeed's own `state_dict` route), engine counters,
lr scheduler, RNG states (python, numpy, torch CPU, CUDA) and the data position. Tensors become
snapshot segments; everything else is pickled into the `meta` segment.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from .. import ds_adapter
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


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Captured:
    """One step's state: tensors to pack (live references!) and the already-pickled meta."""

    tensors: List[torch.Tensor]
    meta: bytes
    fingerprint: str


def fingerprint(engine) -> str:
    """Model shape + ZeRO shard layout: equal exactly when a snapshot fits this engine (cached)."""
    cached = getattr(engine, "_ff_fingerprint", None)
    if cached is None:
        doc = {"params": ds_adapter.param_layout(engine), "shards": ds_adapter.shard_layout(engine),
               "stage": ds_adapter.zero_stage(engine), "dtype": ds_adapter.dtype_config(engine)}
        cached = hashlib.sha256(json.dumps(doc).encode()).hexdigest()
        engine._ff_fingerprint = cached
    return cached


def capture(engine, data_position: Any = None) -> Captured:
    """Capture the state right after an optimizer step. Tensors are live: pack before the next step."""
    tree = {
        "optimizer": ds_adapter.optimizer_state(engine),
        "counters": ds_adapter.counters(engine),
        "buffers": ds_adapter.module_buffers(engine),
        "lr_scheduler": ds_adapter.scheduler_state(engine),
        "rng": rng_state(),
        "data": data_position,
    }
    skeleton, tensors = flatten(tree)
    meta = pickle.dumps(skeleton, protocol=4)
    return Captured(tensors, meta, fingerprint(engine))


def named_segments(cap: Captured) -> List[Tuple[str, torch.Tensor]]:
    meta = torch.frombuffer(bytearray(cap.meta), dtype=torch.uint8)
    return [(f"t/{i}", t) for i, t in enumerate(cap.tensors)] + [("meta", meta)]


def load_tree(snap: ParsedSnapshot) -> Dict[str, Any]:
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


def check_compatible(engine, snap: ParsedSnapshot, rank: int, world_size: int, source: str) -> None:
    """Refuse a snapshot taken by another rank, world size, ZeRO stage or model/optimizer layout."""
    stage = ds_adapter.zero_stage(engine)
    problems = []
    if snap.world_size != world_size:
        problems.append(f"world size {snap.world_size} != {world_size}")
    if snap.zero_stage != stage:
        problems.append(f"ZeRO stage {snap.zero_stage} != {stage}")
    if snap.rank != rank:
        problems.append(f"rank {snap.rank} != {rank}")
    if not problems and fingerprint(engine) != snap.fingerprint:
        problems.append("model shape or ZeRO shard layout differs (fingerprint mismatch)")
    if problems:
        raise SnapshotError(f"{source}: snapshot does not fit this engine: " + "; ".join(problems))


def apply(engine, tree: Dict[str, Any]) -> Any:
    """Put a captured tree back (collective for the optimizer part); returns the data position."""
    ds_adapter.load_optimizer_state(engine, tree["optimizer"])
    ds_adapter.load_scheduler_state(engine, tree["lr_scheduler"])
    ds_adapter.load_module_buffers(engine, tree["buffers"])
    ds_adapter.set_counters(engine, tree["counters"])
    set_rng_state(tree["rng"])
    return tree["data"]
