"""Failure detection and membership: the supervisor side (`detector`) and the worker side (`membership`)
of fftrainer-launch, talking through the coordination store whose keys `protocol` lists.

`membership` (which imports torch.distributed) is loaded on first use of the names below."""
from typing import Any

__all__ = ["Agent", "Assignment", "GenerationChanged", "join", "under_supervisor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import membership

        return getattr(membership, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
