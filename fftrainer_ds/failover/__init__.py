"""Failure detection and membership of fftrainer-launch: the launcher side (`supervisor`: one per node,
spawns and watches its children; `coordinator`: node 0, turns failures into generations) and the
worker side (`membership`), talking through the coordination store whose keys `protocol` lists.

`membership` (which imports torch.distributed) is loaded on first use of the names below."""
from typing import Any

__all__ = ["Agent", "Assignment", "GenerationChanged", "join", "under_supervisor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import membership

        return getattr(membership, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
