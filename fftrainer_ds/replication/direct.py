"""Blocking transfer of one snapshot version from a holder to the rank that needs it, verified.

The recovery (failover/recovery.py) moves replicas with it, in the replication wire format
(transport.py): the same ChunkHeader, check word, FF31 chunk checksums and HMAC tags (keyed with the
job secret's RECOVERY_TRANSFER key; a chunk whose tag fails is a bad chunk, re-sent like a corrupt
one; a control message whose tag fails is a StreamError), on tags from DIRECT_TAG_BASE, in the
calling thread. Every rank derives from the recovery plan which exchanges it takes part in and in
which order, so every wait below is for a message the peer is bound to send.

One exchange: a receiver and its ordered candidate holders h0, h1, ... Each candidate calls
`serve` and waits for a control word; the receiver calls `fetch`, which for each candidate in
turn, until one delivers:

    receiver -> h:  REQUEST
    h -> receiver:  OFFER(count, total, chunk size)       or MISSING (no lease: next candidate)
    rounds 0..MAX_RESEND_ROUNDS:
        h -> receiver:  header + data of each pending chunk (round 0: all), in index order
        receiver -> h:  VERDICT(n) + the n indices that failed verification (FF31 in the header)
        n == 0: delivered. Otherwise those chunks are the next round's pending ones.
    chunks still bad after the last round: both ends give up on h (they saw the same verdicts).

then NOT_NEEDED to every candidate it did not ask, so all candidates return. A corrupt chunk
header only marks its chunk bad (the receiver knows each chunk's length from the offer, so the
stream stays in step); a control message that fails its check leaves the pair unable to agree:
StreamError, for the caller to abandon the group.

Waits for a peer that is busy in an earlier exchange (the control word on the candidate side, the
REQUEST / NOT_NEEDED sends on the receiver side) last as long as that exchange: no fixed timeout
bounds them, so they use IDLE_WAIT and end with the message or with the peer's connection. Every
wait inside an exchange, where the peer is engaged, ends at the group's own timeout.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import SnapshotError
from ..secret import Purpose, current as job_secret
from .transport import (DIRECT_TAG_BASE, HEADER_LEN, IDLE_WAIT, KIND_DATA, KIND_MISSING, KIND_NOT_NEEDED,
                        KIND_OFFER, KIND_REQUEST, KIND_VERDICT, Channel, ChunkHeader, OutgoingVersion, StreamError,
                        TransportHooks, chunk_count, chunk_span, data_tag, hdr_tag, round_chunk_bytes)

logger = logging.getLogger("fftrainer_ds.replication")

MAX_RESEND_ROUNDS = 3  # re-send rounds after the first full send, before the receiver tries another holder
DIRECT_CHUNK_BYTES = 4 << 20
_WINDOW_CHUNKS = 8  # chunks posted per send: the pipeline depth, and the most hooked copies alive at once
_STREAM = 0  # stream_generation field: one exchange, no stream to tell apart from an older one


class Served(Enum):
    """How a candidate holder's part of an exchange ended."""

    NOT_NEEDED = "not needed"
    DELIVERED = "delivered"
    MISSING = "missing"  # no lease on that step: the receiver asked the next candidate
    REJECTED = "rejected"  # chunks still failed verification after the last re-send round


@dataclass(frozen=True)
class Fetched:
    """The verified bytes and where they came from."""

    buffer: torch.Tensor
    holder: int
    resent_chunks: int
    failed_holders: List[int]


@dataclass(frozen=True)
class _Pulled:
    buffer: Optional[torch.Tensor]
    resent_chunks: int
    problem: str = ""


@dataclass(frozen=True)
class _Lease:
    """A recovery lease as OutgoingVersion reads it (a lease need only have `.buffer`, `.release()`)."""

    buffer: torch.Tensor
    step: int
    generation: int
    release: Callable[[], None]


@dataclass(frozen=True)
class Wire:
    """One rank's end of direct transfers on one process group (ranks are group ranks)."""

    engaged: Channel  # waits end at the group's timeout
    idle: Channel  # waits for a peer still busy in an earlier exchange
    rank: int
    hooks: TransportHooks
    checksum: Callable[[torch.Tensor], int]
    key: bytes = field(default=b"", repr=False)  # HMAC key of every header and chunk

    @classmethod
    def on(cls, group, rank: int, hooks: TransportHooks, checksum: Callable[[torch.Tensor], int],
           key: Optional[bytes] = None) -> "Wire":
        """`key`: the RECOVERY_TRANSFER key of the recovery's generation (recovery.transfer passes it);
        by default the job-wide one."""
        return cls(Channel(group, wait_timeout=None), Channel(group, IDLE_WAIT), rank, hooks, checksum,
                   key or job_secret().key(Purpose.RECOVERY_TRANSFER))

    def control(self, kind: int, step: int, count: int = 0, total: int = 0, length: int = 0,
                checksum: int = 0, payload: Optional[torch.Tensor] = None) -> ChunkHeader:
        """A sealed control header (its tag also covers `payload`, the verdict's indices)."""
        return ChunkHeader(kind, _STREAM, 0, step, self.rank, 0, count, total, 0, length, checksum).sealed(
            self.key, payload)

    def send(self, peer: int, msgs: List[Tuple[ChunkHeader, Optional[torch.Tensor]]], idle: bool = False) -> None:
        """Post (header, payload or None) pairs to `peer` at once, then wait for all of them."""
        wire: List[Tuple[torch.Tensor, int]] = []
        for h, payload in msgs:
            wire.append((h.encode(), hdr_tag(self.rank, DIRECT_TAG_BASE)))
            if payload is not None:
                wire.append((payload, data_tag(self.rank, DIRECT_TAG_BASE)))
        (self.idle if idle else self.engaged).send(wire, peer, None)

    def recv_header(self, peer: int, out: torch.Tensor, idle: bool = False) -> None:
        (self.idle if idle else self.engaged).recv(out, peer, hdr_tag(peer, DIRECT_TAG_BASE), None)

    def recv_data(self, peer: int, out: torch.Tensor) -> None:
        self.engaged.recv(out, peer, data_tag(peer, DIRECT_TAG_BASE), None)

    def recv_control(self, peer: int, step: int, kinds: Sequence[int], idle: bool = False) -> ChunkHeader:
        hbuf = torch.empty(HEADER_LEN, dtype=torch.int64)
        self.recv_header(peer, hbuf, idle)
        h = ChunkHeader.decode(hbuf)
        if h.kind not in kinds or h.src != peer or h.step != step:
            raise StreamError(f"rank {self.rank}: unexpected control message from rank {peer} for step {step}: {h}")
        if not (h.kind == KIND_VERDICT and h.count) and not h.authentic(self.key):  # else: checked with its data
            raise StreamError(f"rank {self.rank}: a control message from rank {peer} failed authentication: {h}")
        return h


# ---------------------------------------------------------------- holder side
def serve(wire: Wire, dst: int, step: int, lease: Callable[[], Optional[object]],
          chunk_bytes: int = DIRECT_CHUNK_BYTES) -> Served:
    """Candidate holder: wait for `dst`'s control word; when asked, send the leased version of
    `step` until `dst` verified every chunk or the re-send rounds ran out."""
    ask = wire.recv_control(dst, step, (KIND_REQUEST, KIND_NOT_NEEDED), idle=True)
    if ask.kind == KIND_NOT_NEEDED:
        return Served.NOT_NEEDED
    ref = lease()
    if ref is None:
        logger.warning("recovery transfer: rank %d no longer holds step %d for rank %d", wire.rank, step, dst)
        wire.send(dst, [(wire.control(KIND_MISSING, step), None)])
        return Served.MISSING
    v = OutgoingVersion(_Lease(ref.buffer, step, int(getattr(ref, "generation", 0)), ref.release),
                        round_chunk_bytes(chunk_bytes), wire.checksum, wire.key)
    try:
        wire.send(dst, [(wire.control(KIND_OFFER, step, v.count, v.total, v.chunk_bytes), None)])
        pending = list(range(v.count))
        for round_no in range(MAX_RESEND_ROUNDS + 1):
            if round_no:
                logger.warning("recovery transfer: rank %d re-sends %d chunk(s) of step %d to rank %d (round %d/%d)",
                               wire.rank, len(pending), step, dst, round_no, MAX_RESEND_ROUNDS)
            _send_chunks(wire, dst, v, pending)
            pending = _recv_verdict(wire, dst, step, v.count)
            if not pending:
                return Served.DELIVERED
    finally:
        v.unref()
    logger.warning("recovery transfer: rank %d gave up sending step %d to rank %d: %d chunk(s) still failed "
                   "verification after %d re-send rounds", wire.rank, step, dst, len(pending), MAX_RESEND_ROUNDS)
    return Served.REJECTED


def _send_chunks(wire: Wire, dst: int, v: OutgoingVersion, indices: List[int]) -> None:
    for start in range(0, len(indices), _WINDOW_CHUNKS):
        msgs = []
        for i in indices[start:start + _WINDOW_CHUNKS]:
            h = v.header(i, wire.rank, _STREAM)
            payload = wire.hooks.before_send(dst, h, v.chunk(i))
            msgs.append((wire.hooks.header_on_wire(dst, h), payload))
        wire.send(dst, msgs)


def _recv_verdict(wire: Wire, dst: int, step: int, count: int) -> List[int]:
    h = wire.recv_control(dst, step, (KIND_VERDICT,))
    if h.count == 0:
        return []
    idx = torch.empty(h.count, dtype=torch.int64)
    wire.recv_data(dst, idx)
    bad = [int(i) for i in idx.tolist()]
    if int(wire.checksum(idx.view(torch.uint8))) != h.checksum or any(not 0 <= i < count for i in bad) \
            or not h.authentic(wire.key, idx):
        raise StreamError(f"rank {wire.rank}: corrupt or unauthenticated verdict from rank {dst}: {bad[:8]}")
    return bad


# ---------------------------------------------------------------- receiver side
def fetch(wire: Wire, holders: Sequence[int], step: int) -> Fetched:
    """Receiver: the verified version of `step` from the first candidate in `holders` that
    delivers it; the others are told NOT_NEEDED. SnapshotError when none does (all were asked)."""
    problems: List[str] = []
    for pos, holder in enumerate(holders):
        wire.send(holder, [(wire.control(KIND_REQUEST, step), None)], idle=True)
        pulled = _pull(wire, holder, step)
        if pulled.buffer is not None:
            for other in holders[pos + 1:]:
                wire.send(other, [(wire.control(KIND_NOT_NEEDED, step), None)], idle=True)
            return Fetched(pulled.buffer, holder, pulled.resent_chunks, list(holders[:pos]))
        problems.append(f"rank {holder}: {pulled.problem}")
        if pos + 1 < len(holders):
            logger.warning("recovery transfer: rank %d switches from holder rank %d to rank %d for step %d (%s)",
                           wire.rank, holder, holders[pos + 1], step, pulled.problem)
    raise SnapshotError(f"recovery: rank {wire.rank} got no verified copy of its shard at step {step}; holders "
                        f"tried: {list(holders)} ({'; '.join(problems) or 'no holder'})")


def _pull(wire: Wire, holder: int, step: int) -> _Pulled:
    offer = wire.recv_control(holder, step, (KIND_OFFER, KIND_MISSING))
    if offer.kind == KIND_MISSING:
        return _Pulled(None, 0, "it no longer holds that step")
    if offer.length <= 0 or offer.count != chunk_count(offer.total_bytes, offer.length):
        raise StreamError(f"rank {wire.rank}: inconsistent offer from rank {holder}: {offer}")
    buf = torch.empty(offer.total_bytes, dtype=torch.uint8)
    pending, resent, bad = list(range(offer.count)), 0, {}
    for round_no in range(MAX_RESEND_ROUNDS + 1):
        if round_no:
            resent += len(pending)
        bad = _recv_chunks(wire, holder, offer, buf, pending)
        idx = torch.tensor(sorted(bad), dtype=torch.int64)
        sums = int(wire.checksum(idx.view(torch.uint8))) if bad else 0
        data = idx if bad else None
        wire.send(holder, [(wire.control(KIND_VERDICT, step, count=len(bad), checksum=sums, payload=data), data)])
        if not bad:
            return _Pulled(buf, resent)
        logger.warning("recovery transfer: rank %d: %d chunk(s) of step %d from rank %d failed verification in "
                       "round %d (%s)", wire.rank, len(bad), step, holder, round_no, next(iter(bad.values())))
        pending = sorted(bad)
    return _Pulled(None, resent, f"{len(bad)} chunk(s) still failed verification after {MAX_RESEND_ROUNDS} "
                                 f"re-send rounds ({next(iter(bad.values()))})")


def _recv_chunks(wire: Wire, holder: int, offer: ChunkHeader, buf: torch.Tensor,
                 indices: List[int]) -> Dict[int, str]:
    """Read the pending chunks into `buf`; chunk index -> why it failed verification."""
    bad: Dict[int, str] = {}
    hbuf = torch.empty(HEADER_LEN, dtype=torch.int64)
    for i in indices:
        offset, length = chunk_span(i, offer.total_bytes, offer.length)
        view = buf[offset:offset + length]
        wire.hooks.before_recv(holder)
        wire.recv_header(holder, hbuf)
        wire.recv_data(holder, view)
        problem = _chunk_problem(wire, holder, offer, i, hbuf, view)
        if problem is not None:
            bad[i] = problem
    return bad


def _chunk_problem(wire: Wire, holder: int, offer: ChunkHeader, i: int, hbuf: torch.Tensor,
                   view: torch.Tensor) -> Optional[str]:
    try:
        h = ChunkHeader.decode(hbuf)
    except StreamError as exc:
        return f"chunk {i}: {exc}"
    offset, length = chunk_span(i, offer.total_bytes, offer.length)
    if (h.kind, h.src, h.step, h.index, h.count, h.total_bytes, h.offset, h.length) != (
            KIND_DATA, holder, offer.step, i, offer.count, offer.total_bytes, offset, length):
        return f"chunk {i}: header does not match the offer ({h})"
    wire.hooks.after_recv(holder, h, view)
    got = int(wire.checksum(view))
    if got != h.checksum:
        return f"chunk {i}/{h.count} checksum mismatch (got {got:016x}, header {h.checksum:016x})"
    if not h.authentic(wire.key):  # the tag vouches for the FF31 sum just checked
        logger.warning("recovery transfer: rank %d refused chunk %d/%d of step %d from rank %d: its HMAC tag does "
                       "not verify with the job's key", wire.rank, i, h.count, h.step, holder)
        return f"chunk {i}/{h.count} failed authentication (forged header)"
    return None
