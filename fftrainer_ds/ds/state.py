"""A rank's whole training state, captured from a DeepSpeed engine and applied back.

The tree holds the ZeRO shard (through DeepSpeed's own `state_dict` route), engine counters,
lr scheduler, module buffers, RNG states (python, numpy, torch CPU, CUDA) and the data position;
snapshot/codec.py turns it into segments and back. The codec stores plain data only (no pickle):
the DeepSpeed objects inside the optimizer's state dict become plain values here at capture and
DeepSpeed objects again at apply (`_plain_optimizer_state` / `_live_optimizer_state`).
"""
from __future__ import annotations

import copy
import enum
import hashlib
import json
import random
from collections import OrderedDict
from typing import Any, Dict

import numpy as np
import torch

from ..errors import SnapshotError
from ..snapshot.codec import Captured, encode_tree
from ..snapshot.format import ParsedSnapshot
from . import adapter


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


def fingerprint(engine) -> str:
    """Model shape + ZeRO shard layout: equal exactly when a snapshot fits this engine (the runtime caches it)."""
    doc = {"params": adapter.param_layout(engine), "shards": adapter.shard_layout(engine),
           "stage": adapter.zero_stage(engine), "dtype": adapter.dtype_config(engine)}
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def capture(engine, data_position: Any, engine_fingerprint: str) -> Captured:
    """Capture the state right after an optimizer step. Tensors are live: pack before the next step."""
    tree = {
        "optimizer": _plain_optimizer_state(adapter.optimizer_state(engine)),
        "counters": adapter.counters(engine),
        "buffers": adapter.module_buffers(engine),
        "lr_scheduler": adapter.scheduler_state(engine),
        "rng": rng_state(),
        "data": data_position,
    }
    return encode_tree(tree, engine_fingerprint)


def check_compatible(engine, snap: ParsedSnapshot, engine_fingerprint: str, source: str) -> None:
    """Refuse a snapshot taken by another rank, world size, ZeRO stage or model/optimizer layout."""
    stage, rank, world_size = adapter.zero_stage(engine), engine.global_rank, engine.world_size
    problems = []
    if snap.world_size != world_size:
        problems.append(f"world size {snap.world_size} != {world_size}")
    if snap.zero_stage != stage:
        problems.append(f"ZeRO stage {snap.zero_stage} != {stage}")
    if snap.rank != rank:
        problems.append(f"rank {snap.rank} != {rank}")
    if not problems and engine_fingerprint != snap.fingerprint:
        problems.append("model shape or ZeRO shard layout differs (fingerprint mismatch)")
    if problems:
        raise SnapshotError(f"{source}: snapshot does not fit this engine: " + "; ".join(problems))


def apply(engine, tree: Dict[str, Any]) -> Any:
    """Put a captured tree back (collective for the optimizer part); returns the data position."""
    adapter.load_optimizer_state(engine, _live_optimizer_state(engine, tree["optimizer"]))
    adapter.load_scheduler_state(engine, tree["lr_scheduler"])
    adapter.load_module_buffers(engine, tree["buffers"])
    adapter.set_counters(engine, tree["counters"])
    set_rng_state(tree["rng"])
    return tree["data"]


# Keys of DeepSpeed's ZeRO optimizer state dict whose values are DeepSpeed objects (deepspeed.checkpoint.constants).
_LOSS_SCALER, _ZERO_STAGE, _SLICE_MAPPINGS = "loss_scaler", "zero_stage", "param_slice_mappings"


def _plain_optimizer_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A shallow copy of the optimizer state dict with its DeepSpeed objects as plain data: the loss
    scaler as its class name and attributes, the ZeRO stage enum as an int, each group of the parameter
    slice mappings as one flat [name, numel, start, name, ...] list (plain scalars: the codec writes
    such a list in one go, and there is an entry per parameter)."""
    out = dict(state)
    scaler = out.get(_LOSS_SCALER)
    if scaler is not None:
        out[_LOSS_SCALER] = {"class": type(scaler).__name__, "attrs": dict(vars(scaler))}
    if isinstance(out.get(_ZERO_STAGE), enum.Enum):
        out[_ZERO_STAGE] = int(out[_ZERO_STAGE].value)
    if _SLICE_MAPPINGS in out:
        out[_SLICE_MAPPINGS] = [[v for name, a in group.items() for v in (name, int(a.numel), int(a.start))]
                                for group in out[_SLICE_MAPPINGS]]
    return out


def _live_optimizer_state(engine, state: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of `_plain_optimizer_state`, with this engine's own classes: the loss scaler is a
    copy of the engine's (same class, checked) carrying the snapshot's attributes."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    out = dict(state)
    saved = out.get(_LOSS_SCALER)
    if saved is not None:
        live = engine.optimizer.loss_scaler
        if saved["class"] != type(live).__name__:
            raise SnapshotError(f"snapshot: its loss scaler is a {saved['class']}, this engine's a "
                                f"{type(live).__name__} (another fp16/bf16 configuration)")
        unknown = sorted(set(saved["attrs"]) - set(vars(live)))
        if unknown:  # only the attributes this class has: a snapshot sets values, never new names
            raise SnapshotError(f"snapshot: loss scaler attributes {unknown} unknown to {type(live).__name__}")
        scaler = copy.copy(live)
        vars(scaler).update(saved["attrs"])
        out[_LOSS_SCALER] = scaler
    if type(out.get(_ZERO_STAGE)) is int:
        out[_ZERO_STAGE] = ZeroStageEnum(out[_ZERO_STAGE])
    if _SLICE_MAPPINGS in out:
        out[_SLICE_MAPPINGS] = [OrderedDict((flat[i], fragment_address(numel=flat[i + 1], start=flat[i + 2]))
                                            for i in range(0, len(flat), 3)) for flat in out[_SLICE_MAPPINGS]]
    return out
