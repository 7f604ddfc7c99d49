"""A digest of a job's full model state, independent of sharding and padding (for bitwise comparisons)."""
from __future__ import annotations

import hashlib

import torch

from ..ds import adapter as ds_adapter


def model_digest(engine) -> str:
    """sha256 over every parameter's full low-precision weights, fp32 master and Adam moments.

    Collective under ZeRO-3 (full tensors are gathered): every rank calls it in the same order.
    """
    h = hashlib.sha256()

    def add(t):
        if t is not None:
            h.update(t.detach().contiguous().float().cpu().view(-1).view(torch.uint8).numpy().tobytes())

    for name, p in engine.module.named_parameters():
        h.update(name.encode())
        for t in ds_adapter.full_state_tensors(engine, p):
            add(t)
    return h.hexdigest()
