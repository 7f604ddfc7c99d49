"""Write committed snapshots to disk in the background: one file per rank, atomically renamed.

Writer threads are non-daemon, so a normal interpreter exit waits for pending writes.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import List, Optional

from ..errors import SnapshotError
from .pool import SnapshotRef

logger = logging.getLogger("fftrainer_ds")


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank:05d}.ffsnap")


def _write(ref: SnapshotRef, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(ref.buffer.numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        ref.release()
        if os.path.exists(tmp):
            os.unlink(tmp)


class Persister:
    """Background writer; `wait()` joins every pending write and re-raises the first error."""

    def __init__(self) -> None:
        self._threads: List[threading.Thread] = []
        self._errors: List[BaseException] = []

    def persist(self, ref: SnapshotRef, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = rank_file(directory, ref.rank)

        def run():
            try:
                _write(ref, path)
                logger.info("fftrainer_ds: rank %d persisted step %d to %s", ref.rank, ref.step, path)
            except BaseException as exc:  # surfaced by wait()
                self._errors.append(exc)

        t = threading.Thread(target=run, name=f"fftrainer-persist-{ref.step}", daemon=False)
        self._threads = [th for th in self._threads if th.is_alive()] + [t]
        t.start()
        return path

    def wait(self) -> None:
        for t in self._threads:
            t.join()
        self._threads = []
        if self._errors:
            err, self._errors = self._errors[0], []
            raise err


def read_file(path: str) -> bytearray:
    """Whole snapshot file as bytes; SnapshotError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return bytearray(f.read())
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read snapshot ({exc.strerror})") from None


def resolve(path: str, rank: int) -> str:
    """A directory written by persist() (-> this rank's file) or a snapshot file itself."""
    return rank_file(path, rank) if os.path.isdir(path) else path


__all__ = ["Persister", "rank_file", "read_file", "resolve", "Optional"]
