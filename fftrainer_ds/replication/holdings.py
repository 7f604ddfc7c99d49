"""Replicas this rank holds, across process-group generations.

A regroup closes the generation's `ReplicationService` and builds a new one, but the closed
service's committed replicas are exactly what the next recovery reads (the new service has received
nothing yet). `Holdings` keeps the live service and up to `KEEP_RETIRED` retired ones, each with the
last step still valid in it: after a rollback to step R, versions newer than R are a future that
will not happen, and must never be chosen by a later recovery.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

KEEP_RETIRED = 4  # generations back; a storm of failures within a few steps needs no more


@dataclass
class Retired:
    """A closed service of an earlier generation and the newest step still valid in it."""

    service: object
    valid_through: float = float("inf")


class Holdings:
    """The live replication service (or None) and the retired ones, newest first."""

    def __init__(self) -> None:
        self.live = None
        self._retired: List[Retired] = []

    def retire_live(self, close_timeout_s: float) -> None:
        """Close the live service (bounded) and keep its replicas readable."""
        old, self.live = self.live, None
        if old is not None:
            old.close(timeout_s=close_timeout_s)
            self._retired = (self._retired + [Retired(old)])[-KEEP_RETIRED:]

    def _all(self) -> Iterator[Tuple[object, float]]:
        if self.live is not None:
            yield self.live, float("inf")
        for r in reversed(self._retired):
            yield r.service, r.valid_through

    def steps(self) -> Dict[int, List[int]]:
        """source rank -> steps of the committed replicas held here (every generation kept)."""
        out: Dict[int, set] = {}
        for svc, valid in self._all():
            for src, versions in svc.local_inventory().items():
                out.setdefault(src, set()).update(v.step for v in versions if v.step <= valid)
        return {src: sorted(steps) for src, steps in out.items()}

    def lease(self, src: int, step: int):
        """A lease on the held replica of `src` at `step` (release it), or None."""
        for svc, valid in self._all():
            if step > valid:
                continue
            ref = svc.replica(src, step)
            if ref is not None:
                return ref
        return None

    def rolled_back(self, step: int) -> None:
        """Versions after `step` held by retired services will never be valid again."""
        for r in self._retired:
            r.valid_through = min(r.valid_through, step)

    def close(self) -> None:
        for svc, _ in self._all():
            svc.close()
