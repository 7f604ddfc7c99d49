"""Which replica versions each holder has committed: the one inventory, gathered from the holders.

A holder knows its own (`ReplicationService.local_inventory`); the job-wide view is an all-gather
over the replication group (`gather`), the same route recovery uses for its `RankInfo`s. There is
no second copy in the coordination store: a view read from there could be stale, and writing it
cost a store round trip per committed replica.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple

import torch.distributed as dist

from ..errors import RecoverableError


class Version(NamedTuple):
    """One snapshot version of a source rank: the generation that produced it and its step."""

    generation: int
    step: int


Inventory = Dict[int, Dict[int, List[Version]]]  # source rank -> {holder rank -> committed versions}


def gather(local: Dict[int, List[Version]], group, world_size: int) -> Inventory:
    """source -> {holder -> versions} over every rank of `group`. COLLECTIVE; a dead or stalled
    member makes it fail with RecoverableError (recovery, not this call, handles lost ranks)."""
    gathered: List[object] = [None] * world_size
    try:
        dist.all_gather_object(gathered, {src: [tuple(v) for v in vs] for src, vs in local.items()}, group=group)
    except Exception as exc:  # gloo raises RuntimeError / DistBackendError when a peer is gone
        raise RecoverableError(f"replica inventory: gather over the replication group failed ({exc})") from exc
    out: Inventory = {src: {} for src in range(world_size)}
    for holder, inv in enumerate(gathered):
        for src, versions in inv.items():
            out[int(src)][holder] = [Version(*v) for v in versions]
    return out
