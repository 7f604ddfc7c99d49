"""Chunked, verified point-to-point transport of snapshot versions over a torch.distributed group.

Wire protocol, per (source -> holder) stream, strictly sequential:

    header (int64[HEADER_LEN], tag hdr_tag(src))  then  data (uint8[chunk_len], tag data_tag(src))
    ... one header+data pair per chunk, chunks of one version in order 0..n-1 ...
    a CLOSE header (no data) when the source shuts the stream down.

The header carries (stream generation, version generation, step, source rank, chunk index,
chunk count, total bytes, offset, chunk length, FF31 checksum of the chunk), a check word over
those fields (corruption) and an HMAC-SHA256 tag over those fields, keyed with the job secret's
key of the purpose and generation (secret.py; replication: per stream generation). The chunk's
bytes must match the FF31 sum the tag vouches for, so a chunk made without the key is refused
like a corrupt one and never committed. What the tag does not stop: FF31 is no cryptographic hash
(a word and the same word +- (2^31 - 1) have the same sum), so an attacker on the path who sees a
genuine header can send other bytes with the same sum under it. Such an attacker can alter the
training collectives as well; a tag over the bytes would cost 6x FF31's CPU per byte and halve the
stream rate (benchmarks/RESULTS.md, "Authentication"). Tags depend on the source rank, so the two
directions between a pair of ranks and the header/data messages never share a tag.

The same headers carry the blocking one-version transfer of direct.py (recovery), with control
kinds of their own, on tags from DIRECT_TAG_BASE.

Threads: one `SenderThread` (sender.py) per holder on the source side, one `ReceiverThread`
(receiver.py) per source on the holder side, and a watchdog in the service. gloo facts this relies
on (measured with torch 2.13): a send completes only once the peer has posted the matching recv, so
a stalled receiver blocks its sender; a wait that hits its timeout poisons the whole gloo context
("Application timeout caused pair closure" on every pair of the group, other peers included);
`Work.is_completed()` stays False until someone waits and `get_future()` is not implemented, so an
op cannot be polled; a blocked wait can be ended neither by `ProcessGroup.abort()` nor by
`shutdown()`, only by the message, a peer failure or some timeout in the group. Hence every
replication wait uses IDLE_WAIT (never reached), each thread reports the op it is blocked in to an
`OpWatch`, and the service's watchdog drops a peer whose op overruns `peer_timeout_s`: its thread is
abandoned (a daemon, blocked until the peer moves or dies) and never talks to that peer again.
Sources end streams with a CLOSE header; at close, threads still blocked are woken on purpose by
`Channel.interrupt_all()`.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Callable, List, Optional, Tuple

import torch

from ..secret import MAC_BYTES, Purpose, current as job_secret

MAGIC = 0x46465245504C  # "FFREPL"
KIND_DATA = 1
KIND_CLOSE = 2
# direct.py's control messages: every kind of the wire format is defined here, so none is reused
KIND_REQUEST = 3  # receiver -> holder: send me the version
KIND_NOT_NEEDED = 4  # receiver -> holder: another holder delivered it
KIND_OFFER = 5  # holder -> receiver: the version's layout (count, total, chunk size); chunks follow
KIND_MISSING = 6  # holder -> receiver: the version is no longer held here
KIND_VERDICT = 7  # receiver -> holder: how many chunks failed verification; their indices follow
_FIELDS = 12  # MAGIC, kind and the 10 fields of ChunkHeader
_MAC_WORDS = MAC_BYTES // 8
HEADER_LEN = _FIELDS + 1 + _MAC_WORDS  # the fields, the check word, the HMAC tag (4 words)
from ..ops.reference import FF31_PRIME  # noqa: E402 (the check word uses the FF31 prime)
_TAG_BASE = 1 << 12
# Above every replication tag (_TAG_BASE + 2 * rank) for worlds under 2**23 ranks, and below
# gloo's int32 tag limit for worlds under 2**29: the two protocols never match each other's messages.
DIRECT_TAG_BASE = 1 << 24
_INTERRUPT_TAG = _TAG_BASE - 1  # never sent: a recv on it only ever times out
IDLE_WAIT = timedelta(days=30)  # gloo's own timeout, never reached: overruns are the watchdog's job


def hdr_tag(src: int, base: int = _TAG_BASE) -> int:
    """Tag of the header messages sent by rank `src` (`base`: DIRECT_TAG_BASE for direct.py)."""
    return base + 2 * src


def data_tag(src: int, base: int = _TAG_BASE) -> int:
    """Tag of the data messages sent by rank `src`."""
    return base + 2 * src + 1


def round_chunk_bytes(chunk_bytes: int) -> int:
    """Chunk size rounded down to a multiple of 64 (aligned views for every checksum backend)."""
    return max(64, (int(chunk_bytes) // 64) * 64)


def chunk_count(total: int, chunk_bytes: int) -> int:
    """Chunks of a version of `total` bytes (at least one, so that an empty version has a header)."""
    return max(1, -(-total // chunk_bytes))


def chunk_span(i: int, total: int, chunk_bytes: int) -> Tuple[int, int]:
    """(offset, length) of chunk i; the last chunk may be short."""
    offset = i * chunk_bytes
    return offset, max(0, min(total, offset + chunk_bytes) - offset)


class TransportError(RuntimeError):
    """A send or recv failed or timed out: the peer is dropped for this generation."""


class StreamError(RuntimeError):
    """A header that cannot be trusted (bad check word, wrong source or generation)."""


@dataclass(frozen=True)
class ChunkHeader:
    kind: int
    stream_generation: int
    generation: int
    step: int
    src: int
    index: int
    count: int
    total_bytes: int
    offset: int
    length: int
    checksum: int
    tag: bytes = field(default=bytes(MAC_BYTES), compare=False, repr=False)  # HMAC-SHA256 (`sealed`)

    def _fields(self) -> List[int]:
        return [MAGIC, self.kind, self.stream_generation, self.generation, self.step, self.src,
                self.index, self.count, self.total_bytes, self.offset, self.length, self.checksum]

    def _mac(self, key: bytes, payload: Optional[torch.Tensor]) -> bytes:
        h = hmac.new(key, struct.pack(f"<{_FIELDS}q", *self._fields()), hashlib.sha256)
        if payload is not None and payload.numel():
            h.update(memoryview(payload.reshape(-1).view(torch.uint8).numpy()))  # GIL released by hashlib
        return h.digest()

    def sealed(self, key: bytes, payload: Optional[torch.Tensor] = None) -> "ChunkHeader":
        """This header with its tag: HMAC-SHA256 over the fields (the chunk's FF31 sum included) and
        `payload` (a verdict's indices; None for chunks and other control words)."""
        return replace(self, tag=self._mac(key, payload))

    def authentic(self, key: bytes, payload: Optional[torch.Tensor] = None) -> bool:
        """The tag verifies with `key` over these fields and `payload` (constant-time compare)."""
        return hmac.compare_digest(self.tag, self._mac(key, payload))

    def encode(self) -> torch.Tensor:
        """The int64[HEADER_LEN] wire form: the 12 fields (MAGIC first), the check word, the 4 tag words."""
        fields = self._fields()
        return torch.tensor(fields + [_check(fields)] + list(struct.unpack(f"<{_MAC_WORDS}q", self.tag)),
                            dtype=torch.int64)

    @classmethod
    def decode(cls, t: torch.Tensor) -> "ChunkHeader":
        """Parse a received header; StreamError if the magic or the check word is wrong. The tag is
        read, not checked: `authentic` needs the key and, for a chunk, its bytes."""
        vals = [int(v) for v in t.tolist()]
        if len(vals) != HEADER_LEN or vals[0] != MAGIC or vals[_FIELDS] != _check(vals[:_FIELDS]):
            raise StreamError(f"corrupt replication header {vals[:_FIELDS + 1]}")
        return cls(*vals[1:_FIELDS], tag=struct.pack(f"<{_MAC_WORDS}q", *vals[_FIELDS + 1:]))

    @property
    def version(self) -> tuple:
        return (self.generation, self.step)


def _check(fields: List[int]) -> int:
    return sum((i + 1) * (v % FF31_PRIME) for i, v in enumerate(fields)) % FF31_PRIME


class OpWatch:
    """What one transport thread is blocked in, for the watchdog: `begin(desc)` / `end()` around a
    watched wait; `overdue(now)` is True once per overrun of `timeout_s`."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._started: Optional[float] = None
        self.desc = ""
        self.expired = False

    def begin(self, desc: str) -> None:
        self.desc, self._started = desc, time.monotonic()

    def end(self) -> None:
        self._started = None

    def overdue(self, now: float) -> bool:
        started = self._started
        if self.expired or started is None or now - started <= self.timeout_s:
            return False
        self.expired = True
        return True


class Channel:
    """Point-to-point send/recv of CPU tensors on one process group (ranks are group ranks).

    `send`/`recv` block the calling thread until done and raise TransportError on failure. With a
    `watch`, the wait is reported to it (the watchdog's deadline); without one (header recvs) it
    may last as long as the peer stays silent. Thread-safe for one thread per (peer, direction).
    """

    def __init__(self, group, wait_timeout: Optional[timedelta] = IDLE_WAIT) -> None:
        """`wait_timeout` None: each wait ends at the group's own timeout (direct.py, where no
        watchdog runs and a silent peer must not block a recovery for longer than a collective)."""
        self.group = group
        self.wait_timeout = wait_timeout

    def send(self, msgs: List[Tuple[torch.Tensor, int]], dst: int, watch: Optional[OpWatch]) -> None:
        """Post every (tensor, tag) send to dst at once, then wait for all (one round trip)."""
        self._wait(lambda: [self.group.send([t], dst, tag) for t, tag in msgs], watch, f"send to rank {dst}")

    def recv(self, t: torch.Tensor, src: int, tag: int, watch: Optional[OpWatch]) -> None:
        self._wait(lambda: [self.group.recv([t], src, tag)], watch, f"recv from rank {src}")

    def interrupt_all(self, rank: int, world_size: int) -> bool:
        """Make every pending op of this group, in every thread, fail now (the group is unusable
        afterwards; peers see "Connection closed"). Done by letting a recv that nothing matches time
        out, which makes gloo signal every pair of the context. True if that happened."""
        probe = torch.empty(1, dtype=torch.uint8)
        for peer in range(world_size):
            if peer == rank:
                continue
            try:
                self.group.recv([probe], peer, _INTERRUPT_TAG).wait(timedelta(milliseconds=1))
            except Exception as exc:  # "Timed out waiting 1ms ...": done; a closed pair: try the next
                if "Timed out" in str(exc):
                    return True
        return False

    def _wait(self, post: Callable, watch: Optional[OpWatch], desc: str) -> None:
        if watch is not None:
            watch.begin(desc)
        try:
            for work in post():
                if self.wait_timeout is None:
                    work.wait()
                else:
                    work.wait(self.wait_timeout)
        except Exception as exc:  # gloo raises RuntimeError / DistBackendError
            raise TransportError(f"{desc} failed: {exc}") from exc
        finally:
            if watch is not None:
                watch.end()


class TransportHooks:
    """Fault-injection points, no-ops here; `fftrainer_ds.testing.faults` installs rules.

    Called from the transport threads: `before_send` on the source for each chunk (may return
    other bytes to put on the wire) and `header_on_wire` right after it (may return another header),
    `before_recv` on the holder before each header recv (may sleep or raise), `after_recv` on the
    holder after each data recv, before verification.
    """

    def before_send(self, dst: int, header: ChunkHeader, data: torch.Tensor) -> torch.Tensor:
        return data

    def before_recv(self, src: int) -> None:
        return None

    def after_recv(self, src: int, header: ChunkHeader, data: torch.Tensor) -> None:
        return None

    def header_on_wire(self, dst: int, header: ChunkHeader) -> ChunkHeader:
        """On the source, right after `before_send`: the header actually sent (a forgery may replace it)."""
        return header


class OutgoingVersion:
    """One offered snapshot shared by the sender threads of its holders.

    Holds the caller's lease and releases it when the last user calls `unref()`. Chunk
    checksums are computed once, by whichever sender needs them first. `key`: the key of the
    headers' tags; None: the job's replication key of the stream generation of each header.
    """

    def __init__(self, ref, chunk_bytes: int, checksum: Callable[[torch.Tensor], int],
                 key: Optional[bytes] = None) -> None:
        self.ref = ref
        self.step = int(ref.step)
        self.generation = int(ref.generation)
        self.buffer = ref.buffer.reshape(-1)
        self.total = int(self.buffer.numel())
        self.chunk_bytes = chunk_bytes
        self.count = chunk_count(self.total, chunk_bytes)
        self._checksum = checksum
        self._sums: List[Optional[int]] = [None] * self.count
        self._key = key
        self._lock = threading.Lock()
        self._refs = 1

    def chunk(self, i: int) -> torch.Tensor:
        offset, length = chunk_span(i, self.total, self.chunk_bytes)
        return self.buffer[offset:offset + length]

    def header(self, i: int, src: int, stream_generation: int) -> ChunkHeader:
        """The sealed KIND_DATA header of chunk i as sent by rank `src` (its tag vouches for the
        chunk's FF31 sum; a couple of microseconds)."""
        offset, length = chunk_span(i, self.total, self.chunk_bytes)
        h = ChunkHeader(KIND_DATA, stream_generation, self.generation, self.step, src, i, self.count,
                        self.total, offset, length, self.chunk_sum(i))
        return h.sealed(self._key or job_secret().key(Purpose.REPLICATION, stream_generation))

    def chunk_sum(self, i: int) -> int:
        with self._lock:
            if self._sums[i] is None:
                self._sums[i] = int(self._checksum(self.chunk(i)))
            return self._sums[i]

    def add_ref(self) -> None:
        with self._lock:
            self._refs += 1

    def unref(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.ref.release()
