"""Fault injection for the replication transport (for tests, ours and users').

Install on one rank's `ReplicationService` and add rules; the rules run inside that rank's
transport threads (or pass a `ReplicationFaults()` as the `hooks` of a recovery
`failover.recovery.transfer`, where they run in the calling thread; there the receiver faults act
before each chunk header recv):

    f = faults.install(svc)
    f.corrupt_chunk(dst=1, step=3, chunk_index=1)   # flip a byte of that chunk on the wire
    f.forge_chunk(dst=1, step=3)                    # replace it by a forgery made without the job's key
    f.stall_receiver(seconds=30, src=0)             # the receiver of source 0 stops reading
    f.kill_receiver(src=0)                          # ... or its thread dies

Corruption happens on a copy on the source side after the chunk's checksum was computed, so the
source's own snapshot is untouched and the holder sees exactly what a corrupted wire would give.
A forgery is what an attacker without the key can put on the wire: other bytes with their FF31
sum recomputed and a tag made with a key of its own (refused: the tag), or (`collide=True`) other
bytes with the same FF31 sum under the genuine header, which needs a genuine header seen on the
path (not refused: the tag covers the header and FF31 sum, not the bytes; docs/FORMAT.md).
Receiver faults act before the receiver's next header recv (the message it is blocked on, if any,
is still read first); a stall is a plain sleep that `close()` cannot cut short.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch

from .. import ops
from ..ops.reference import FF31_PRIME
from ..replication.transport import ChunkHeader, TransportHooks


class InjectedFault(RuntimeError):
    """Raised inside a transport thread by `kill_receiver`."""


@dataclass
class _Rule:
    kind: str  # "corrupt", "forge", "collide", "stall", "kill"
    peer: Optional[int]  # dst for corrupt, src for receiver faults; None: any
    step: Optional[int] = None
    chunk_index: Optional[int] = None
    seconds: float = 0.0
    times: int = 1


class ReplicationFaults(TransportHooks):
    """The hooks object holding the rules; counters say what fired, and how many chunks passed."""

    def __init__(self) -> None:
        self._rules: List[_Rule] = []
        self._lock = threading.Lock()
        self.sent = 0  # chunks put on the wire by this rank, re-sends included
        self.received = 0  # chunks read by this rank, before verification
        self.corrupted = 0
        self.forged = 0
        self.stalled = 0
        self.killed = 0
        self._forged_headers: Dict[Tuple[int, int, int, int], ChunkHeader] = {}  # (dst, gen, step, index)

    def corrupt_chunk(self, dst: Optional[int] = None, step: Optional[int] = None, chunk_index: Optional[int] = 0,
                      times: int = 1) -> None:
        """Corrupt the next `times` matching chunks sent to `dst` (None: any) of `step` (None: any)."""
        self._add(_Rule("corrupt", dst, step, chunk_index, times=times))

    def forge_chunk(self, dst: Optional[int] = None, step: Optional[int] = None, chunk_index: Optional[int] = 0,
                    times: int = 1, collide: bool = False) -> None:
        """Replace the next `times` matching chunks sent to `dst` by forgeries (see the module docstring)."""
        self._add(_Rule("collide" if collide else "forge", dst, step, chunk_index, times=times))

    def stall_receiver(self, seconds: float, src: Optional[int] = None) -> None:
        """The receiver thread of `src` (None: the first that gets there) sleeps `seconds` once."""
        self._add(_Rule("stall", src, seconds=seconds))

    def kill_receiver(self, src: Optional[int] = None) -> None:
        """The receiver thread of `src` (None: the first that gets there) raises InjectedFault once."""
        self._add(_Rule("kill", src))

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _take(self, kind: str, peer: int, header: Optional[ChunkHeader] = None) -> Optional[_Rule]:
        with self._lock:
            for rule in self._rules:
                if rule.kind != kind or rule.times <= 0 or rule.peer not in (None, peer):
                    continue
                if header is not None and ((rule.step is not None and rule.step != header.step) or
                                           (rule.chunk_index is not None and rule.chunk_index != header.index)):
                    continue
                rule.times -= 1
                return rule
        return None

    # ---- TransportHooks ----
    def before_send(self, dst: int, header: ChunkHeader, data: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.sent += 1
        if self._take("corrupt", dst, header) is not None:
            bad = data.clone()
            if bad.numel():
                bad[bad.numel() // 2] ^= 0x5A
            self.corrupted += 1
            return bad
        if self._take("collide", dst, header) is not None:
            self.forged += 1
            return same_ff31(data)
        if self._take("forge", dst, header) is None:
            return data
        bad = data.clone()
        if bad.numel():
            bad[bad.numel() // 2] ^= 0x5A
        forged = replace(header, checksum=int(ops.checksum(bad))).sealed(secrets.token_bytes(32), bad)
        with self._lock:
            self._forged_headers[(dst, header.generation, header.step, header.index)] = forged
        self.forged += 1
        return bad

    def header_on_wire(self, dst: int, header: ChunkHeader) -> ChunkHeader:
        with self._lock:
            return self._forged_headers.pop((dst, header.generation, header.step, header.index), header)

    def before_recv(self, src: int) -> None:
        rule = self._take("stall", src)
        if rule is not None:
            self.stalled += 1
            time.sleep(rule.seconds)
        if self._take("kill", src) is not None:
            self.killed += 1
            raise InjectedFault(f"injected fault: receiver thread of source {src} killed")

    def after_recv(self, src: int, header: ChunkHeader, data: torch.Tensor) -> None:
        with self._lock:
            self.received += 1


def same_ff31(data: torch.Tensor) -> torch.Tensor:
    """A copy of `data` with one 32-bit word changed and the same FF31 checksum: the word w becomes
    w -+ (2^31 - 1), equal modulo the FF31 prime at the same position (docs/FORMAT.md)."""
    out = data.clone()
    if out.numel() < 4:
        return out
    lo = (out.numel() // 8) * 4  # a whole word near the middle, aligned to the chunk's start
    word = int.from_bytes(bytes(out[lo:lo + 4].tolist()), "little")
    twin = word - FF31_PRIME if word >= FF31_PRIME else word + FF31_PRIME
    out[lo:lo + 4] = torch.tensor(list(twin.to_bytes(4, "little")), dtype=torch.uint8)
    return out


def install(service) -> ReplicationFaults:
    """Attach (or return the already attached) fault hooks of a ReplicationService."""
    if not isinstance(service.hooks, ReplicationFaults):
        service.hooks = ReplicationFaults()
    return service.hooks
