"""A digest of a job's full model state, independent of sharding and padding (for bitwise comparisons)."""
from __future__ import annotations

import hashlib

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

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
        if ds_adapter.zero_stage(engine) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                add(p.data)
        else:
            add(p.data)
        add(safe_get_full_fp32_param(p))
        add(safe_get_full_optimizer_state(p, "exp_avg"))
        add(safe_get_full_optimizer_state(p, "exp_avg_sq"))
    return h.hexdigest()
