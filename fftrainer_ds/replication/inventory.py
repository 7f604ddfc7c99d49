"""Which replica versions each holder has committed: the one inventory, gathered from the holders.

A holder knows its own (`ReplicationService.local_inventory`); the job-wide view is an authenticated
JSON all-gather over the replication group (`gather`, exchange.py: no pickle), the same route recovery
uses for its `RankInfo`s. There is no second copy in the coordination store: a view read from there
could be stale, and writing it cost a store round trip per committed replica.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..errors import RecoverableError
from ..secret import Purpose, current as job_secret
from .exchange import all_gather_json, int_list


class Version(NamedTuple):
    """One snapshot version of a source rank: the generation that produced it and its step."""

    generation: int
    step: int


Inventory = Dict[int, Dict[int, List[Version]]]  # source rank -> {holder rank -> committed versions}


def gather(local: Dict[int, List[Version]], group, world_size: int, generation: Optional[int] = None) -> Inventory:
    """source -> {holder -> versions} over every rank of `group`. COLLECTIVE; a dead or stalled member,
    or a message that fails authentication or parsing, makes it fail with RecoverableError (recovery,
    not this call, handles lost ranks). `generation`: the key's (None: the job-wide inventory key)."""
    doc = [[int(src), [[int(v[0]), int(v[1])] for v in vs]] for src, vs in sorted(local.items())]
    key = job_secret().key(Purpose.INVENTORY, generation)
    gathered = all_gather_json(doc, key, "replica inventory", group)
    if len(gathered) != world_size:
        raise RecoverableError(f"replica inventory: {len(gathered)} ranks answered, expected {world_size}")
    out: Inventory = {src: {} for src in range(world_size)}
    for holder, inv in enumerate(gathered):
        try:
            for src, versions in _entries(inv, world_size):
                out[src][holder] = versions
        except ValueError as exc:
            raise RecoverableError(f"replica inventory: malformed entry from rank {holder} ({exc})") from None
    return out


def _entries(inv: Any, world_size: int) -> List[Tuple[int, List[Version]]]:
    """[(source, its versions)] of one holder's message, every value checked (ValueError)."""
    if type(inv) is not list:
        raise ValueError("not a list")
    out = []
    for entry in inv:
        if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not int or not 0 <= entry[0] < world_size:
            raise ValueError(f"bad entry {entry!r:.80}")
        out.append((entry[0], _versions(entry[1])))
    return out


def _versions(x: Any) -> List[Version]:
    if type(x) is not list:
        raise ValueError(f"versions must be a list, got {x!r:.80}")
    pairs = [int_list(v, "a version") for v in x]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"a version must be [generation, step], got {x!r:.80}")
    return [Version(*p) for p in pairs]
