"""Rebuild a live engine in place on new process groups (the survivor's side of a regroup).

The engine object, its snapshots in host memory, its data loader (the user's iterator) and its
replication stores are kept; DeepSpeed's engine and optimizer are constructed again around a
fresh module materialized from the weightless template, in lockstep with the replacement rank's
ordinary `initialize` (their init collectives must match).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .. import ds_adapter
from ..errors import ConfigError
from .template import materialize, meta_template

logger = logging.getLogger("fftrainer_ds")

# Attributes of FailoverEngine that survive a rebuild (everything else is DeepSpeed's).
KEEP = ("ff_config", "_ff", "_ff_spec", "_ff_fingerprint", "_ff_ctl")


class RebuildSpec:
    """What a rebuild needs from the original `initialize` call, captured before DeepSpeed wraps the model."""

    def __init__(self, init_kwargs: Dict[str, Any]):
        model: nn.Module = init_kwargs["model"]
        optimizer, scheduler = init_kwargs.get("optimizer"), init_kwargs.get("lr_scheduler")
        if isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError("fast_failover: pass the optimizer in the DeepSpeed config or as a callable "
                              "(params -> optimizer), not as an instance: a rebuilt engine needs a new one")
        if scheduler is not None and (not callable(scheduler) or hasattr(scheduler, "state_dict")):
            raise ConfigError("fast_failover: pass the lr scheduler in the DeepSpeed config or as a callable "
                              "(optimizer -> scheduler), not as an instance")
        self.device = next(model.parameters()).device
        self.template = meta_template(model)
        names = {id(p): n for n, p in model.named_parameters()}
        params = init_kwargs.get("model_parameters")
        if params is not None:
            params = list(params)
            init_kwargs["model_parameters"] = params  # a generator would be consumed by DeepSpeed
        self.param_spec = None if params is None else [self._spec(x, names) for x in params]
        # initialize-level arguments that DeepSpeedEngine.__init__ does not take are dropped too
        skip = ("model", "model_parameters", "training_data", "config_class", "distributed_port", "mesh_param")
        self.kwargs = {k: v for k, v in init_kwargs.items() if k not in skip}

    @staticmethod
    def _spec(item, names):
        if isinstance(item, dict):
            return dict(item, params=[names[id(p)] for p in item["params"]])
        return names[id(item)]

    def model_parameters(self, module: nn.Module) -> Optional[List[Any]]:
        if self.param_spec is None:
            return None
        by_name = dict(module.named_parameters())
        return [dict(x, params=[by_name[n] for n in x["params"]]) if isinstance(x, dict) else by_name[x]
                for x in self.param_spec]


def release_engine(engine) -> None:
    """Forget DeepSpeed's engine state (optimizer, module, hooks, groups) on `engine`, keeping ours.

    The old default group and its subgroups are destroyed and every Python reference to them from
    the engine is dropped. (Measured: torch still holds C++ references to a destroyed gloo group,
    so its sockets stay open until the process exits; a live peer blocked in an old collective then
    wakes only at its collective timeout. A full gc.collect() here cost 0.1-0.5 s and freed nothing.)
    """
    if "optimizer" in engine.__dict__:
        ds_adapter.dismantle_engine(engine)
    kept = {k: engine.__dict__[k] for k in KEEP if k in engine.__dict__}
    loader = engine.__dict__.get("_ff_loader") or engine.__dict__.get("training_dataloader")
    engine.__dict__.clear()
    engine.__dict__.update(kept)
    engine.__dict__["_ff_loader"] = loader
    ds_adapter.release_groups()


def rebuild_in_place(engine, spec: RebuildSpec) -> None:
    """Construct DeepSpeed's engine again on `engine` over the current default process group."""
    kept = {k: engine.__dict__[k] for k in KEEP if k in engine.__dict__}
    loader = engine.__dict__.pop("_ff_loader", None) or engine.__dict__.get("training_dataloader")
    module = materialize(spec.template, spec.device)
    kwargs = dict(spec.kwargs, model=module, model_parameters=spec.model_parameters(module), training_data=None)
    ds_adapter.reinit_engine(engine, kwargs)
    engine.__dict__.update(kept)
    engine.training_dataloader = loader
