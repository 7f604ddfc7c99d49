"""A weightless copy of the user's model, so a survivor can rebuild its engine without the user's code.

At initialize the model's structure is deep-copied with every parameter on the `meta` device (no
memory); buffers are copied for real (small, and not always in the optimizer state). A rebuild
materializes fresh zero parameters: DeepSpeed's init broadcasts rank 0's values and the restore of
the recovery step then overwrites every weight and optimizer state.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import ConfigError


def refuse_partitioned(model: nn.Module) -> None:
    """A model built under deepspeed.zero.Init() holds only partitions: no template can be taken."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ConfigError("fast_failover: models built under deepspeed.zero.Init() are not supported; "
                          "build the model normally and let ZeRO-3 partition it in initialize")


def meta_template(model: nn.Module) -> nn.Module:
    """Structure of `model` with meta parameters (call before DeepSpeed wraps the model)."""
    refuse_partitioned(model)
    memo = {}
    for p in model.parameters():
        meta = torch.empty_like(p, device="meta")
        memo[id(p)] = nn.Parameter(meta, requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def materialize(template: nn.Module, device: torch.device, copied: bool = False) -> nn.Module:
    """A fresh module from the template: zero parameters on `device`, buffers as captured.

    `copied`: `template` is already a private deep copy (see RebuildSpec.prepare), filled in place.
    """
    module = template if copied else copy.deepcopy(template)
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type == "meta":
                sub._parameters[name] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device),
                                                     requires_grad=p.requires_grad)
    return module
