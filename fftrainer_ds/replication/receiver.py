"""Holder side: a replica store per source (the last committed versions + the in-flight one) and the
thread that fills it.

A version becomes committed only when every chunk arrived in order and verified; the newest committed
buffer is never written, nor any buffer while a `ReplicaRef` lease on it is held.
`ReceiverThread` reads one source's stream (transport.py protocol) into it.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, List, Optional

import torch

from .transport import (KIND_CLOSE, KIND_DATA, HEADER_LEN, Channel, ChunkHeader, OpWatch, StreamError,
                        TransportError, TransportHooks, data_tag, hdr_tag)

from ..secret import Purpose, current as job_secret
from .inventory import Version

logger = logging.getLogger("fftrainer_ds.replication")


class ReplicaRef:
    """A lease on a committed replica, shaped like `SnapshotRef`: step, generation, rank (the
    source), buffer (1-D uint8 CPU tensor of exactly the snapshot bytes). Release it (or use
    `with`); until then the store never writes that buffer."""

    def __init__(self, owner: "SourceReplica", slot: int, version: Version, buffer: torch.Tensor) -> None:
        self._owner, self._slot = owner, slot
        self.generation, self.step = version
        self.rank = owner.src
        self.buffer = buffer
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._unlease(self._slot)

    def __enter__(self) -> "ReplicaRef":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Slot:
    __slots__ = ("buf", "nbytes", "version", "leases")

    def __init__(self) -> None:
        self.buf: Optional[torch.Tensor] = None
        self.nbytes = 0
        self.version: Optional[Version] = None
        self.leases = 0


class SourceReplica:
    """The last `keep` committed versions of one source plus the in-flight one. Writer: one receiver
    thread; readers: any.

    Two committed versions, not one: a replica lags its source by at most one step, so with the two
    newest versions of every source some step is common to every shard whatever the lags at the moment
    of a failure (with one, shard A held only at step N and shard B only at N-1 leave no common step).

    Writer call order per version: `begin()` -> fill the returned tensor -> `commit()` or `abort()`.
    """

    def __init__(self, src: int, keep: int = 2) -> None:
        self.src = src
        self.keep = keep
        self._slots = [_Slot() for _ in range(keep + 1)]
        self._committed: List[int] = []  # slot indices, oldest first
        self._inflight: Optional[int] = None
        self._lock = threading.Lock()

    def _writable(self) -> Optional[int]:
        """A slot neither committed nor leased; else the oldest committed one (never the newest) that
        no reader holds; else None (busy)."""
        free = [i for i, s in enumerate(self._slots) if i not in self._committed and not s.leases]
        free += [i for i in self._committed[:-1] if not self._slots[i].leases]
        return free[0] if free else None

    def begin(self, version: Version, nbytes: int) -> Optional[torch.Tensor]:
        """Start an in-flight version; its buffer, or None when every writable slot is leased (busy)."""
        with self._lock:
            if self._inflight is not None:
                self._slots[self._inflight].version = None
            idx = self._inflight = self._writable()
            if idx is None:
                return None
            if idx in self._committed:
                self._committed.remove(idx)
            slot = self._slots[idx]
            if slot.buf is None or slot.buf.numel() < nbytes:
                slot.buf = None  # free the old one before allocating
                slot.buf = torch.empty(nbytes, dtype=torch.uint8)
            slot.nbytes, slot.version = nbytes, Version(*version)
            return slot.buf[:nbytes]

    def commit(self) -> Version:
        """Make the in-flight version the newest committed one (the oldest beyond `keep` becomes free)."""
        with self._lock:
            if self._inflight is None:
                raise RuntimeError("commit without an in-flight version")
            self._committed.append(self._inflight)
            self._inflight = None
            del self._committed[:-self.keep]
            return self._slots[self._committed[-1]].version

    def abort(self) -> None:
        """Forget the in-flight version; the committed ones are untouched."""
        with self._lock:
            if self._inflight is not None:
                self._slots[self._inflight].version = None
            self._inflight = None

    def committed_versions(self) -> List[Version]:
        """Every committed version held, oldest first."""
        with self._lock:
            return [self._slots[i].version for i in self._committed]

    def committed_version(self) -> Optional[Version]:
        """The newest committed version, or None."""
        versions = self.committed_versions()
        return versions[-1] if versions else None

    def lease(self, step: Optional[int] = None) -> Optional[ReplicaRef]:
        """Lease the newest committed version (or the one of `step`), or None if there is none."""
        with self._lock:
            for idx in reversed(self._committed):
                slot = self._slots[idx]
                if step is None or slot.version.step == step:
                    slot.leases += 1
                    return ReplicaRef(self, idx, slot.version, slot.buf[:slot.nbytes])
            return None

    def _unlease(self, idx: int) -> None:
        with self._lock:
            self._slots[idx].leases -= 1


class ReceiverThread:
    """Reads source `src`'s stream into its `SourceReplica`; one daemon thread per source.

    Each chunk is verified as it arrives: its header's HMAC tag (the job's replication key of this
    stream generation) before the header is used at all, then its bytes against the FF31 sum the tag
    vouches for; a version commits only after its last chunk with every chunk in order and verified.
    A failed chunk (corrupt, or forged: a tag that does not verify) drops the version
    (the service's versions_dropped, logged with the reason), the rest of its chunks are still read
    so that the stream stays in step. A CLOSE header (its tag verified) ends the thread;
    a transport failure or an untrustworthy header marks the source dropped (`dropped`, `on_drop`)
    and ends it, keeping the committed replica. A data recv is watched (`watch`: the source sends it
    right after its header, so an overrun means a stalled source and the watchdog calls `expire()`);
    a header recv is not, since a source may pause for long between chunks (window closed,
    throttled, baseline). So `stop()` takes effect at the next message, and `join(timeout)`
    abandons a thread blocked on a silent source (it is a daemon).
    """

    def __init__(self, channel: Channel, src: int, stream_generation: int, store: SourceReplica,
                 timeout_s: float, checksum: Callable[[torch.Tensor], int], hooks: Callable[[], TransportHooks],
                 on_commit: Callable[[int, Version], None], on_bad_version: Callable[[int, Version, str], None],
                 on_drop: Callable[[int, str], None]) -> None:
        self.channel, self.src, self.stream_generation = channel, src, stream_generation
        self.store = store
        self.watch = OpWatch(timeout_s)
        self._checksum, self._hooks = checksum, hooks
        self._key = job_secret().key(Purpose.REPLICATION, stream_generation)
        self._on_commit, self._on_bad, self._on_drop = on_commit, on_bad_version, on_drop
        self._stop = threading.Event()
        self._scratch: Optional[torch.Tensor] = None
        self._target: Optional[torch.Tensor] = None
        self._problem: Optional[str] = None
        self._next_index = self._next_offset = 0
        self.dropped: Optional[str] = None
        self.thread = threading.Thread(target=self._run, name=f"ffrepl-recv-{src}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        self.thread.join(timeout_s)
        return not self.thread.is_alive()

    def _run(self) -> None:
        current: Optional[ChunkHeader] = None  # first header of the version being read
        try:
            while not self._stop.is_set() and self.dropped is None:
                self._hooks().before_recv(self.src)
                hbuf = torch.empty(HEADER_LEN, dtype=torch.int64)
                self.channel.recv(hbuf, self.src, hdr_tag(self.src), None)
                if self.dropped is not None:
                    return
                h = ChunkHeader.decode(hbuf)
                if h.src != self.src or h.stream_generation != self.stream_generation:
                    raise StreamError(f"header of source {h.src} generation {h.stream_generation} on the "
                                      f"stream of source {self.src} generation {self.stream_generation}")
                if h.kind == KIND_CLOSE:  # a version cut short by the source's close() is not counted
                    if not h.authentic(self._key):
                        raise StreamError("a CLOSE header failed authentication (not from the source)")
                    return
                if h.kind != KIND_DATA:
                    raise StreamError(f"unknown header kind {h.kind}")
                current = self._on_chunk(current, h)
        except (TransportError, StreamError) as exc:
            self._drop(str(exc))
        except Exception as exc:  # a bug or an injected fault: this source is dropped, the process lives
            logger.warning("replication receiver for source rank %d died: %r", self.src, exc)
            self._drop(f"receiver thread died: {exc!r}")
        finally:
            if current is not None:
                self.store.abort()

    def _on_chunk(self, current: Optional[ChunkHeader], h: ChunkHeader) -> Optional[ChunkHeader]:
        """Read one chunk's data; return the version still in flight (None after its last chunk)."""
        if not h.authentic(self._key):  # before the header may start, interrupt or size anything
            return self._refuse(current, h)
        if h.index == 0 or current is None or h.version != current.version:
            if current is not None:
                self._finish(current, "interrupted by a newer version")
            current = h
            self._next_index, self._next_offset = 0, 0
            self._target = self.store.begin(h.version, h.total_bytes) if h.index == 0 else None
            self._problem = None if self._target is not None else (
                "no free buffer (the other one is leased)" if h.index == 0 else "its first chunk was not seen")
        if self._problem is None and (h.index != self._next_index or h.offset != self._next_offset
                                      or h.count != current.count or h.total_bytes != current.total_bytes
                                      or h.offset + h.length > h.total_bytes):
            self._problem = f"chunk {h.index} out of order or inconsistent"
        view = self._recv_data(h, self._target if self._problem is None else None)
        if self.dropped is not None:  # expired while blocked: never commit anything from here on
            return current
        if self._problem is None:
            self._hooks().after_recv(self.src, h, view)
            got = int(self._checksum(view))
            if got != h.checksum:  # the header's tag vouches for this sum: the bytes must match it
                self._problem = f"chunk {h.index}/{h.count} checksum mismatch (got {got:016x}, header {h.checksum:016x})"
        self._next_index += 1
        self._next_offset += h.length
        if h.index != h.count - 1:
            return current
        if self._problem is None and self._next_offset != h.total_bytes:
            self._problem = "incomplete version"
        self._finish(current, self._problem)
        return None

    def _refuse(self, current: Optional[ChunkHeader], h: ChunkHeader) -> Optional[ChunkHeader]:
        """A chunk header whose tag fails (made without the job's key): nothing of it is trusted, its data
        message is read into scratch to stay in step, and the version in flight cannot commit any more."""
        logger.warning("replication: refused chunk %d/%d of step %d from source rank %d: failed authentication "
                       "(its HMAC tag does not verify with the job's key)", h.index, h.count, h.step, self.src)
        self._recv_data(h, None)
        if current is not None and self._problem is None:
            self._problem = f"chunk {h.index}/{h.count} failed authentication (forged header)"
        return current

    def _recv_data(self, h: ChunkHeader, target: Optional[torch.Tensor]) -> torch.Tensor:
        if target is not None:
            view = target[h.offset:h.offset + h.length]
        else:
            if self._scratch is None or self._scratch.numel() < h.length:
                self._scratch = torch.empty(h.length, dtype=torch.uint8)
            view = self._scratch[:h.length]
        self.channel.recv(view, self.src, data_tag(self.src), self.watch)
        return view

    def _finish(self, first: ChunkHeader, problem: Optional[str]) -> None:
        if problem is None and self.dropped is None:
            self._on_commit(self.src, self.store.commit())
            return
        self.store.abort()
        self._on_bad(self.src, first.version, problem or "the source was dropped")

    def expire(self) -> None:
        """Watchdog: the current data recv overran its deadline."""
        self._drop(f"{self.watch.desc} made no progress for {self.watch.timeout_s:g} s (source stalled)")

    def _drop(self, reason: str) -> None:
        if self.dropped is not None:
            return
        self.dropped = reason
        if self._stop.is_set():  # woken by close(): not a peer failure
            logger.info("replication: receiver of source rank %d ended at close: %s", self.src, reason)
            return
        logger.warning("replication: dropping source rank %d: %s", self.src, reason)
        self._on_drop(self.src, reason)

