"""fftrainer_ds: fast failover for DeepSpeed training.

Use `fftrainer_ds.initialize(...)` in place of `deepspeed.initialize(...)`: same arguments, same
4-tuple, and an engine (`FailoverEngine`, a `DeepSpeedEngine` subclass) configured by the
`"fast_failover"` section of the DeepSpeed config.
"""
from __future__ import annotations

from typing import Any, Optional

from .config import FastFailoverConfig, parse_config
from .errors import ConfigError, FailoverError, RecoverableError, SnapshotError, TerminalError

__version__ = "0.1.0"
__all__ = ["initialize", "FastFailoverConfig", "parse_config", "ConfigError", "FailoverError",
           "RecoverableError", "SnapshotError", "TerminalError", "FailoverEngine"]


def initialize(args: Any = None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port: Optional[int] = None, mpu=None,
               dist_init_required: Optional[bool] = None, collate_fn=None, config=None, mesh_param=None,
               config_params=None):
    """Drop-in for `deepspeed.initialize`: returns (engine, optimizer, training_dataloader, lr_scheduler)."""
    from .ds import adapter

    if model is None:
        raise ValueError("fftrainer_ds.initialize requires a model")
    port = adapter.default_port() if distributed_port is None else distributed_port
    cfg_dict = adapter.load_config_dict(args, config, config_params)
    ff = parse_config(cfg_dict)  # fail fast on a bad section, before any process group work
    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=port, mpu=mpu,
                  dist_init_required=dist_init_required, collate_fn=collate_fn, config=cfg_dict)
    if isinstance(model, adapter.pipeline_module_class()):
        if ff.enabled:
            raise ConfigError("fast_failover: pipeline parallelism is not supported; set \"enabled\": false")
        return adapter.plain_initialize(**kwargs)
    engine = _build(ff.enabled, dict(kwargs, mesh_param=mesh_param))
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _build(enabled: bool, kwargs):
    from .ds import adapter
    from .engine import FailoverEngine
    from .failover import membership

    def build(**kw):
        return adapter.build_engine(FailoverEngine, **kw)

    if enabled and membership.under_supervisor():
        from .failover.controller import failover_initialize

        return failover_initialize(build, kwargs)  # spares wait inside until they replace a rank
    return build(**kwargs)


def __getattr__(name: str):
    if name == "FailoverEngine":  # lazy: importing deepspeed costs seconds
        from .engine import FailoverEngine

        return FailoverEngine
    raise AttributeError(name)
