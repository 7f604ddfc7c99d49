"""A rank's whole training state, captured from a DeepSpeed engine and applied back.

The tree holds the ZeRO shard (through DeepSpeed's own `state_dict` route), engine counters,
lr scheduler, module buffers, RNG states (python, numpy, torch CPU, CUDA) and the data position;
snapshot/codec.py turns it into segments and back.
"""
from __future__ import annotations

import hashlib
import json
import random
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
        "optimizer": adapter.optimizer_state(engine),
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
    adapter.load_optimizer_state(engine, tree["optimizer"])
    adapter.load_scheduler_state(engine, tree["lr_scheduler"])
    adapter.load_module_buffers(engine, tree["buffers"])
    adapter.set_counters(engine, tree["counters"])
    set_rng_state(tree["rng"])
    return tree["data"]
