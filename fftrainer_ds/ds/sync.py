"""Keep DeepSpeed's device-wide synchronizes from waiting for the snapshot stream.

`torch.cuda.synchronize()` waits for every stream of the device, so each one that DeepSpeed issues
during a step also waits for the low-priority snapshot pack and serializes it with training
(measured on the H100: ZeRO-2 bf16 syncs twice per step, +8.9 % step time for a 0.55 GB
side-stream copy). `.item()`, `stream.synchronize()` and `event.synchronize()` wait for one
stream or event only and are harmless.

Device-wide synchronizes in DeepSpeed 0.19.8 (all `get_accelerator().synchronize()`, which is
`torch.cuda.synchronize()` on CUDA), paths relative to site-packages/deepspeed:

In every step (ZeRO 1/2/3):
- utils/timer.py:238  ThroughputTimer.start, from engine.forward (runtime/engine.py:2946, when the
  engine was built without training_data) while `"timers": {"throughput": {"synchronized": true}}`
  (the default).
- utils/timer.py:256  ThroughputTimer.stop, from engine.step (runtime/engine.py:3622), same setting.
  These two are the two syncs per step counted with ZeRO-2 bf16.
With `overlap_comm` (default on for ZeRO-3 only), once per gradient reduction, waiting for the
reduction stream before the previous bucket's grads are cleared:
- runtime/zero/stage_1_and_2.py:1028  independent_gradient_partition_epilogue (engine.py:3336)
- runtime/zero/stage_1_and_2.py:2413  allreduce_and_copy
- runtime/zero/stage_1_and_2.py:2487  _allreduce_noncontiguous_bucket_preserving_fp32
ZeRO-3 parameter gathers outside the prefetch coordinator (CUDA does not "resolve data dependency"):
- runtime/zero/partition_parameters.py:1989  _allgather_param
- runtime/zero/partition_parameters.py:2128  _allgather_params_coalesced
- runtime/zero/partition_parameters.py:2188  _allgather_params_sequential
Only when enabled: comm/comm.py:133 (comms_logger), runtime/activation_checkpointing/
checkpointing.py:589, 649, 674, 777, 817, 909, 1003, 1033 (`synchronize_checkpoint_boundary`),
runtime/utils.py:772 (memory_status debugging).
Not in the step path: stage_1_and_2.py:763 and stage3.py:549 (destroy), stage_1_and_2.py:3928,
4000 and stage3.py:4001 (offload/reload states), stage3.py:2210 (quantize_nontrainable_params),
engine.py:5602 (module state dict), pipe/p2p.py:93 (pipeline), sequence/fpdt_layer.py:859.

`no_device_sync(streams)` is the one place that changes this: while active, on CUDA only, the
accelerator object's `synchronize` waits for the *current* stream plus the given `streams`
(pass `deepspeed_streams(optimizer)`: the overlap_comm syncs above exist to wait for DeepSpeed's
reduction stream, which must still be waited for) instead of the whole device. The original is
restored on exit, also on an exception; DeepSpeed's files are not touched. The patch is process
wide while active (other threads calling the accelerator's synchronize see it too).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterable, Iterator, List, Optional

import torch

_lock = threading.Lock()
_MISSING = object()


def deepspeed_streams(*owners: object) -> List["torch.cuda.Stream"]:
    """The CUDA streams DeepSpeed keeps on these objects (the ZeRO optimizer, its parameter_offload):
    stage 1/2 `reduction_stream`, stage 3 `reduce_and_partition_stream`, the all-gather stream."""
    if not torch.cuda.is_available():
        return []
    found: List[torch.cuda.Stream] = []
    todo = [o for o in owners if o is not None]
    for owner in list(todo):
        offload = getattr(owner, "parameter_offload", None)
        if offload is not None:
            todo.append(offload)
    for owner in todo:
        for value in vars(owner).values():
            if isinstance(value, torch.cuda.Stream) and all(value != s for s in found):
                found.append(value)
    return found


def _current_stream_sync(streams: List["torch.cuda.Stream"]) -> Callable[..., None]:
    def synchronize(device_index: Optional[int] = None) -> None:
        torch.cuda.current_stream(device_index).synchronize()
        for s in streams:
            s.synchronize()

    synchronize.fftrainer_current_stream_only = True  # type: ignore[attr-defined]
    return synchronize


@contextlib.contextmanager
def _patched(accelerator: object, replacement: Callable[..., None]) -> Iterator[None]:
    """Shadow accelerator.synchronize with `replacement` (an instance attribute); restore on exit."""
    with _lock:
        previous = vars(accelerator).get("synchronize", _MISSING)
        accelerator.synchronize = replacement  # type: ignore[attr-defined]
    try:
        yield
    finally:
        with _lock:
            if previous is _MISSING:
                vars(accelerator).pop("synchronize", None)
            else:
                accelerator.synchronize = previous  # type: ignore[attr-defined]


def _cuda_accelerator() -> Optional[object]:
    if not torch.cuda.is_available():
        return None
    from deepspeed.accelerator import get_accelerator  # noqa: WPS433 (only on CUDA)

    acc = get_accelerator()
    return acc if acc.device_name() == "cuda" else None


@contextlib.contextmanager
def no_device_sync(streams: Iterable["torch.cuda.Stream"] = ()) -> Iterator[bool]:
    """While active, DeepSpeed's device-wide synchronize waits for the current stream and `streams`
    only. Yields whether the patch is in effect (False on CPU, where it is a no-op)."""
    acc = _cuda_accelerator()
    if acc is None:
        yield False
        return
    with _patched(acc, _current_stream_sync(list(streams))):
        yield True


@contextlib.contextmanager
def count_device_syncs(accelerator: Optional[object] = None) -> Iterator[List[int]]:
    """Count calls of the accelerator's synchronize (device-wide or patched) inside the block:
    yields a one-element list holding the count. A diagnostic for tests and benchmarks."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator  # noqa: WPS433

        accelerator = get_accelerator()
    count = [0]
    inner = accelerator.synchronize  # type: ignore[attr-defined]

    def counting(*args, **kwargs):
        count[0] += 1
        return inner(*args, **kwargs)

    with _patched(accelerator, counting):
        yield count
