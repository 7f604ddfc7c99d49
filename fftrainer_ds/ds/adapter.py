"""The one place that touches DeepSpeed beyond `deepspeed.initialize`'s public surface.

Supported: DeepSpeed 0.19.x (measured facts in ../shared/NOTES-deepspeed.md). Every other module
calls these functions instead of reaching into engine or optimizer attributes.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import deepspeed
import torch
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: F401  (the base class of FailoverEngine)

logger = logging.getLogger("fftrainer_ds")
SUPPORTED_VERSIONS = ("0.19.",)

if not deepspeed.__version__.startswith(SUPPORTED_VERSIONS):
    logger.warning("fftrainer_ds: DeepSpeed %s is untested (supported: %s)", deepspeed.__version__,
                   ", ".join(v + "x" for v in SUPPORTED_VERSIONS))


def build_engine(engine_cls, *, args, model, optimizer, model_parameters, training_data, lr_scheduler,
                 distributed_port, mpu, dist_init_required, collate_fn, config, mesh_param):
    """Mirror of `deepspeed.initialize` (0.19.8) for non-pipeline models, building `engine_cls`.

    `deepspeed.initialize` hard-codes `DeepSpeedEngine`; instead of reassigning that global we
    repeat its few set-up calls here.
    """
    from deepspeed import comm as dist
    from deepspeed import zero
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    import deepspeed as ds

    zero.partition_parameters.shutdown_init_context()
    reset_zero3_counters()  # a process that built an engine before (a warmed-up spare) numbers params anew
    dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                          distributed_port=distributed_port, dist_init_required=dist_init_required)
    if mesh_param:
        raise NotImplementedError("fast_failover does not support mesh_param (sequence parallelism) yet")
    config_class = _config_class(config, mpu, model)
    if config_class.hybrid_engine.enabled:
        raise NotImplementedError("fast_failover does not support the hybrid engine")
    engine = engine_cls(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                        training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                        dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                        mesh_device=None, config_class=config_class)
    zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine


def _config_class(config: Dict[str, Any], mpu, model):
    import deepspeed as ds
    from deepspeed import comm as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    ds.merge_tp_model_init_into_config(config, mpu, None, dist)
    config_class = DeepSpeedConfig(config, mpu)
    ds.set_optimizer_flags(config_class, model)
    return config_class


def load_config_dict(args, config, config_params) -> Dict[str, Any]:
    """Resolve the config the way `deepspeed.initialize` does (args.deepspeed_config, path or dict)."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    if config is None and config_params is not None:
        config = config_params
    if getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise ValueError("config given both as args.deepspeed_config and as initialize(config=...)")
        config = args.deepspeed_config
    if config is None:
        raise ValueError("DeepSpeed requires --deepspeed_config or initialize(config=...)")
    return config if isinstance(config, dict) else load_ds_config(config)


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def dtype_config(engine) -> str:
    if engine.bfloat16_enabled():
        return "bf16"
    if engine.fp16_enabled():
        return "fp16"
    return "fp32"


def dp_group(engine):
    return engine.optimizer.dp_process_group


def optimizer_state(engine) -> Dict[str, Any]:
    """This rank's ZeRO shard: fp32 master partition, optimizer moments/step, loss scaler.

    `state_dict()` returns live references; the caller packs them before the next optimizer step.
    """
    return engine.optimizer.state_dict()


def load_optimizer_state(engine, state: Dict[str, Any]) -> None:
    """Put a shard back in memory through DeepSpeed's own checkpoint route (collective)."""
    from deepspeed import comm as dist

    group = dp_group(engine)
    shards: List[Optional[Dict[str, Any]]] = [None] * dist.get_world_size(group=group)
    shards[dist.get_rank(group=group)] = state
    opt = engine.optimizer
    opt.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)
    if zero_stage(engine) == 3:
        opt.checkpoint_event_epilogue()
    else:
        opt.update_lp_params()  # fp32 partition -> low-precision params, all-gathered


def counters(engine) -> Dict[str, int]:
    return {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "micro_steps": engine.micro_steps, "skipped_steps": engine.skipped_steps}


def set_counters(engine, values: Dict[str, int]) -> None:
    for key, value in values.items():
        setattr(engine, key, value)


def scheduler_state(engine) -> Optional[Dict[str, Any]]:
    return None if engine.lr_scheduler is None else engine.lr_scheduler.state_dict()


def load_scheduler_state(engine, state: Optional[Dict[str, Any]]) -> None:
    if state is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state)


def param_layout(engine) -> List[tuple]:
    """(name, full shape) of every parameter: the model-shape part of the snapshot fingerprint."""
    out = []
    for name, p in engine.module.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        out.append((name, tuple(int(s) for s in shape), str(p.dtype)))
    return out


def shard_layout(engine) -> List[tuple]:
    """Shapes of this rank's fp32 master partitions (the optimizer layout part of the fingerprint)."""
    opt = engine.optimizer
    flats = opt.fp32_partitioned_groups_flat if zero_stage(engine) == 3 else opt.single_partition_of_fp32_groups
    return [tuple(int(s) for s in t.shape) for t in flats]


def local_param_tensors(engine) -> List[torch.Tensor]:
    """This rank's low-precision parameter storage (full params for ZeRO-1/2, the partition for ZeRO-3)."""
    if zero_stage(engine) == 3:
        return [p.ds_tensor.detach() for p in engine.module.parameters()]
    return [p.detach() for p in engine.module.parameters()]


def release_groups() -> None:
    """Destroy the default process group and every DeepSpeed group cache built on it."""
    import torch.distributed as tdist
    from deepspeed import comm as dist

    if tdist.is_initialized():
        dist.destroy_process_group()


def dismantle_engine(engine, keep: Dict[str, Any]) -> None:
    """Remove DeepSpeed's hooks and group references from a dead generation's engine and module, then
    forget every attribute of the engine but `keep` (all the rest is DeepSpeed's).

    Objects the user may still hold (the last loss and its autograd graph reach the parameters)
    must not keep the old process group alive: its sockets close only with its last reference.
    """
    if "optimizer" in engine.__dict__:  # not released already
        module = engine.__dict__.get("_modules", {}).get("module")
        try:
            DeepSpeedEngine.destroy(engine)  # removes the optimizer's gradient hooks
        except Exception:  # a half-broken engine: dropping the references below is what matters
            pass
        for p in module.parameters() if module is not None else ():
            for attr in ("ds_process_group", "_hp_mapping"):
                if hasattr(p, attr):
                    setattr(p, attr, None)
            p.grad = None
    engine.__dict__.clear()
    engine.__dict__.update(keep)


def reset_zero3_counters() -> None:
    """ZeRO-3 numbers parameters with two process-global counters; a rebuilt engine on a survivor
    must number them like a fresh process does (NOTES-deepspeed.md, "Process groups and recovery")."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partition_parameters import Init

    Init.param_id = 0
    DeepSpeedZeRoOffload._register_deepspeed_module.__defaults__[0][0] = 0


def reinit_engine(engine, init_kwargs: Dict[str, Any], keep: Dict[str, Any]) -> None:
    """Run DeepSpeedEngine.__init__ again on the same object (new groups, fresh module in kwargs);
    the attributes in `keep` (not DeepSpeed's) are put back afterwards."""
    from deepspeed import zero

    reset_zero3_counters()
    zero.partition_parameters.shutdown_init_context()
    init_kwargs = dict(init_kwargs, config_class=_config_class(init_kwargs["config"], init_kwargs.get("mpu"),
                                                                init_kwargs["model"]))
    DeepSpeedEngine.__init__(engine, **init_kwargs)
    zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    engine.__dict__.update(keep)


def module_buffers(engine) -> Dict[str, torch.Tensor]:
    """Module buffers (e.g. norm running statistics): not optimizer state, but part of the model.

    Copies, not the live tensors: the pack runs during the next forward, which updates running
    statistics in place (the optimizer state, by contrast, changes only at the next optimizer step,
    which the fence keeps after the pack)."""
    return {name: buf.detach().clone() for name, buf in engine.module.named_buffers()}


def load_module_buffers(engine, buffers: Dict[str, torch.Tensor]) -> None:
    own = dict(engine.module.named_buffers())
    for name, value in buffers.items():
        own[name].data.copy_(value)


def skip_shm_comm_build() -> None:
    """Skip the one-time JIT build of deepspeed_shm_comm on CPU (tests, demo): gloo is used instead."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def report_metrics(engine, rank: int, step: int, metrics: Dict[str, Any]) -> None:
    """Metrics to DeepSpeed's logger, and to its monitor (rank 0) when one is enabled."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.info("fftrainer_ds rank %d step %d: %s", rank, step,
                   ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled and rank == 0:
        monitor.write_events([(f"fftrainer/{k}", float(v), engine.global_samples) for k, v in metrics.items()])


def pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    return PipelineModule


def default_port() -> int:
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    return TORCH_DISTRIBUTED_DEFAULT_PORT


def plain_initialize(**kwargs):
    """`deepspeed.initialize` itself (pipeline models, which fast failover does not handle)."""
    return deepspeed.initialize(**kwargs)


def full_state_tensors(engine, param) -> List[Optional[torch.Tensor]]:
    """Full (unpartitioned) low-precision weight, fp32 master and Adam moments of one parameter.
    Collective under ZeRO-3 (the weight is gathered): every rank calls it in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if zero_stage(engine) == 3:
        with deepspeed.zero.GatheredParameters([param]):
            weight = param.data.clone()
    else:
        weight = param.data
    return [weight, safe_get_full_fp32_param(param), safe_get_full_optimizer_state(param, "exp_avg"),
            safe_get_full_optimizer_state(param, "exp_avg_sq")]
