"""Chunked, verified point-to-point transport of snapshot versions over a torch.distributed group.

Wire protocol, per (source -> holder) stream, strictly sequential:

    header (int64[HEADER_LEN], tag hdr_tag(src))  then  data (uint8[chunk_len], tag data_tag(src))
    ... one header+data pair per chunk, chunks of one version in order 0..n-1 ...
    a CLOSE header (no data) when the source shuts the stream down.

The header carries (stream generation, version generation, step, source rank, chunk index,
chunk count, total bytes, offset, chunk length, FF31 checksum of the chunk) and a check word over
those fields. Tags depend on the source rank, so the two directions between a pair of ranks and
the header/data messages never share a tag.

Threads: one `SenderThread` per holder on the source side, one `ReceiverThread` (receiver.py) per
source on the holder side, and a watchdog in the service. gloo facts this relies on (measured
with torch 2.13): a send completes only once the peer has posted the matching recv, so a stalled
receiver blocks its sender; a wait that hits its timeout poisons the whole gloo context ("Application
timeout caused pair closure" on every pair of the group, other peers included); `Work.is_completed()`
stays False until someone waits and `get_future()` is not implemented, so an op cannot be polled;
a blocked wait can be ended neither by `ProcessGroup.abort()` nor by `shutdown()`, only by the
message, a peer failure or some timeout in the group. Hence every wait here uses IDLE_WAIT (never
reached), each thread reports the op it is blocked in to an `OpWatch`, and the service's watchdog
drops a peer whose op overruns `peer_timeout_s`: its thread is abandoned (a daemon, blocked until
the peer moves or dies) and never talks to that peer again. Sources end streams with a CLOSE
header; at close, threads still blocked are woken on purpose by `Channel.interrupt_all()`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Optional, Tuple

import torch

logger = logging.getLogger("fftrainer_ds.replication")

MAGIC = 0x46465245504C  # "FFREPL"
KIND_DATA = 1
KIND_CLOSE = 2
HEADER_LEN = 13
_P = (1 << 31) - 1
_TAG_BASE = 1 << 12
_INTERRUPT_TAG = _TAG_BASE - 1  # never sent: a recv on it only ever times out
IDLE_WAIT = timedelta(days=30)  # gloo's own timeout, never reached: overruns are the watchdog's job


def hdr_tag(src: int) -> int:
    """Tag of the header messages of source `src`."""
    return _TAG_BASE + 2 * src


def data_tag(src: int) -> int:
    """Tag of the data messages of source `src`."""
    return _TAG_BASE + 2 * src + 1


def round_chunk_bytes(chunk_bytes: int) -> int:
    """Chunk size rounded down to a multiple of 64 (aligned views for every checksum backend)."""
    return max(64, (int(chunk_bytes) // 64) * 64)


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

    def _fields(self) -> List[int]:
        return [MAGIC, self.kind, self.stream_generation, self.generation, self.step, self.src,
                self.index, self.count, self.total_bytes, self.offset, self.length, self.checksum]

    def encode(self) -> torch.Tensor:
        """The int64[HEADER_LEN] wire form: 11 fields (MAGIC first) and the check word."""
        fields = self._fields()[:HEADER_LEN - 1]
        return torch.tensor(fields + [_check(fields)], dtype=torch.int64)

    @classmethod
    def decode(cls, t: torch.Tensor) -> "ChunkHeader":
        """Parse a received header; StreamError if the magic or the check word is wrong."""
        vals = [int(v) for v in t.tolist()]
        if vals[0] != MAGIC or vals[-1] != _check(vals[:-1]):
            raise StreamError(f"corrupt replication header {vals}")
        return cls(*vals[1:HEADER_LEN - 1])

    @property
    def version(self) -> tuple:
        return (self.generation, self.step)


def _check(fields: List[int]) -> int:
    return sum((i + 1) * (v % _P) for i, v in enumerate(fields)) % _P


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

    def __init__(self, group) -> None:
        self.group = group

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

    @staticmethod
    def _wait(post: Callable, watch: Optional[OpWatch], desc: str) -> None:
        if watch is not None:
            watch.begin(desc)
        try:
            for work in post():
                work.wait(IDLE_WAIT)
        except Exception as exc:  # gloo raises RuntimeError / DistBackendError
            raise TransportError(f"{desc} failed: {exc}") from exc
        finally:
            if watch is not None:
                watch.end()


class TransportHooks:
    """Fault-injection points, no-ops here; `fftrainer_ds.testing.faults` installs rules.

    Called from the transport threads: `before_send` on the source for each chunk (may return
    other bytes to put on the wire), `before_recv` on the holder before each header recv (may
    sleep or raise), `after_recv` on the holder after each data recv, before verification.
    """

    def before_send(self, dst: int, header: ChunkHeader, data: torch.Tensor) -> torch.Tensor:
        return data

    def before_recv(self, src: int) -> None:
        return None

    def after_recv(self, src: int, header: ChunkHeader, data: torch.Tensor) -> None:
        return None


class OutgoingVersion:
    """One offered snapshot shared by the sender threads of its holders.

    Holds the caller's lease and releases it when the last user calls `unref()`. Chunk
    checksums are computed once, by whichever sender needs them first.
    """

    def __init__(self, ref, chunk_bytes: int, checksum: Callable[[torch.Tensor], int]) -> None:
        self.ref = ref
        self.step = int(ref.step)
        self.generation = int(ref.generation)
        self.buffer = ref.buffer.reshape(-1)
        self.total = int(self.buffer.numel())
        self.chunk_bytes = chunk_bytes
        self.count = max(1, -(-self.total // chunk_bytes))
        self._checksum = checksum
        self._sums: List[Optional[int]] = [None] * self.count
        self._lock = threading.Lock()
        self._refs = 1

    def chunk(self, i: int) -> torch.Tensor:
        return self.buffer[i * self.chunk_bytes:min(self.total, (i + 1) * self.chunk_bytes)]

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


class SenderThread:
    """Streams the latest offered version to one holder; one daemon thread per holder.

    Call order: `start()`; `submit(v)` any number of times (a version not yet started is
    superseded by a newer one; the version being sent is always finished); `stop()` then
    `join(timeout)`. On a transport failure, or when the watchdog calls `expire()` because a
    send overran `watch.timeout_s`, the holder is marked dropped (`dropped` holds the reason,
    `on_drop` is called), the leases are released and nothing is sent to it again; an expired
    thread stays blocked in gloo until the holder moves or dies. `gate(stop)` blocks while sending
    is not allowed (window closed, baseline pause) and returns False on stop; `acquire(n, stop)`
    is the shared rate limiter.
    """

    def __init__(self, channel: Channel, src: int, dst: int, stream_generation: int, timeout_s: float,
                 gate: Callable[[threading.Event], bool], acquire: Callable[[int, threading.Event], bool],
                 hooks: Callable[[], TransportHooks], on_sent: Callable[[int], None],
                 on_drop: Callable[[int, str], None], on_superseded: Callable[[], None]) -> None:
        self.channel, self.src, self.dst = channel, src, dst
        self.stream_generation = stream_generation
        self.watch = OpWatch(timeout_s)
        self._gate, self._acquire, self._hooks = gate, acquire, hooks
        self._on_sent, self._on_drop, self._on_superseded = on_sent, on_drop, on_superseded
        self._cond = threading.Condition()
        self._pending: Optional[OutgoingVersion] = None
        self._current: Optional[OutgoingVersion] = None
        self._stop = threading.Event()
        self.dropped: Optional[str] = None
        self.delivered: Optional[tuple] = None  # (generation, step) of the last fully sent version
        self.versions_sent = 0
        self.thread = threading.Thread(target=self._run, name=f"ffrepl-send-{src}->{dst}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, v: OutgoingVersion) -> bool:
        """Queue v (taking a reference); False if this holder is dropped or stopping."""
        with self._cond:
            if self.dropped is not None or self._stop.is_set():
                return False
            v.add_ref()
            old, self._pending = self._pending, v
            self._cond.notify_all()
        if old is not None:
            old.unref()
            self._on_superseded()
        return True

    def idle(self) -> bool:
        with self._cond:
            return self._pending is None and self._current is None

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout_s: float) -> bool:
        self.thread.join(timeout_s)
        return not self.thread.is_alive()

    def expire(self) -> None:
        """Watchdog: the current send overran its deadline."""
        self._drop(f"{self.watch.desc} made no progress for {self.watch.timeout_s:g} s (holder stalled)")

    def _next(self) -> Optional[OutgoingVersion]:
        with self._cond:
            while self._pending is None and not self._stop.is_set() and self.dropped is None:
                self._cond.wait(0.5)
            if self._stop.is_set() or self.dropped is not None:
                return None
            self._current, self._pending = self._pending, None
            return self._current

    def _release(self) -> None:
        """Give back the leases this sender holds (idempotent; the thread or the watchdog)."""
        with self._cond:
            held = [v for v in (self._current, self._pending) if v is not None]
            self._current = self._pending = None
        for v in held:
            v.unref()

    def _run(self) -> None:
        try:
            while True:
                v = self._next()
                if v is None:
                    break
                self._send_version(v)
                with self._cond:
                    done, self._current = self._current, None
                if done is not None:
                    done.unref()
        except TransportError as exc:
            self._drop(str(exc))
        except Exception as exc:  # a bug or an injected fault: drop, never kill the process
            logger.exception("replication sender %d->%d failed", self.src, self.dst)
            self._drop(f"sender thread failed: {exc!r}")
        finally:
            self._release()
        if self.dropped is None:
            self._send_close()

    def _send_version(self, v: OutgoingVersion) -> None:
        for i in range(v.count):
            if not self._gate(self._stop):
                return
            data = v.chunk(i)
            if not self._acquire(int(data.numel()), self._stop):
                return
            h = ChunkHeader(KIND_DATA, self.stream_generation, v.generation, v.step, self.src, i, v.count,
                            v.total, i * v.chunk_bytes, int(data.numel()), v.chunk_sum(i))
            data = self._hooks().before_send(self.dst, h, data)
            self.channel.send([(h.encode(), hdr_tag(self.src)), (data, data_tag(self.src))], self.dst, self.watch)
            if self.dropped is not None:  # expired while blocked: the holder is gone for good
                return
            self._on_sent(int(data.numel()))
        self.delivered = (v.generation, v.step)
        self.versions_sent += 1

    def _send_close(self) -> None:
        h = ChunkHeader(KIND_CLOSE, self.stream_generation, 0, 0, self.src, 0, 0, 0, 0, 0, 0)
        try:
            self.channel.send([(h.encode(), hdr_tag(self.src))], self.dst, self.watch)
        except TransportError as exc:
            logger.info("replication: CLOSE to rank %d not delivered (%s)", self.dst, exc)

    def _drop(self, reason: str) -> None:
        with self._cond:
            if self.dropped is not None:
                return
            self.dropped = reason
            self._cond.notify_all()
        self._release()
        if self._stop.is_set():  # woken by close(): not a peer failure
            logger.info("replication: sender to rank %d ended at close: %s", self.dst, reason)
            return
        logger.warning("replication: dropping holder rank %d of source rank %d: %s", self.dst, self.src, reason)
        self._on_drop(self.dst, reason)
