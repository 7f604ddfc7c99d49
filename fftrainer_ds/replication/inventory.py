"""Replica inventories published to the coordination store, readable when ranks are dead."""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

Version = Tuple[int, int]  # (generation, step)


def inventory_key(generation: int, holder: int) -> str:
    """Store key under which `holder` publishes the replicas it has committed (JSON, see below)."""
    return f"fftrainer/replication/gen{generation}/holder/{holder}"


def read_inventory(store, generation: int, world_size: int) -> Dict[int, Dict[int, List[Version]]]:
    """source -> {holder -> committed versions}, from what holders published to `store`.

    Works when ranks are dead (their last publication stays: intersect with the live ranks).
    Value of each key: {"holder": h, "generation": g, "sources": {"<src>": [[gen, step], ...]}}.
    """
    out: Dict[int, Dict[int, List[Version]]] = {src: {} for src in range(world_size)}
    for holder in range(world_size):
        key = inventory_key(generation, holder)
        if not store.check([key]):
            continue
        doc = json.loads(store.get(key).decode())
        for src, versions in doc["sources"].items():
            out.setdefault(int(src), {})[holder] = [tuple(v) for v in versions]
    return out
