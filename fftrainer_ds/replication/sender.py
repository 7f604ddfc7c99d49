"""Source side of replication: one thread per holder streams the latest offered version to it.

The wire protocol, the gloo facts the threads rely on and the watchdog are in transport.py.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..secret import Purpose, current as job_secret
from .transport import (KIND_CLOSE, Channel, ChunkHeader, OpWatch, OutgoingVersion, TransportError, TransportHooks,
                        data_tag, hdr_tag)

logger = logging.getLogger("fftrainer_ds.replication")


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
            h = v.header(i, self.src, self.stream_generation)  # sealed: HMAC over the fields and the chunk
            data = self._hooks().before_send(self.dst, h, data)
            h = self._hooks().header_on_wire(self.dst, h)
            self.channel.send([(h.encode(), hdr_tag(self.src)), (data, data_tag(self.src))], self.dst, self.watch)
            if self.dropped is not None:  # expired while blocked: the holder is gone for good
                return
            self._on_sent(int(data.numel()))
        self.delivered = (v.generation, v.step)
        self.versions_sent += 1

    def _send_close(self) -> None:
        h = ChunkHeader(KIND_CLOSE, self.stream_generation, 0, 0, self.src, 0, 0, 0, 0, 0, 0).sealed(
            job_secret().key(Purpose.REPLICATION, self.stream_generation))
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
