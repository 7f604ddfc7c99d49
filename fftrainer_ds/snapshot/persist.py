"""Write committed snapshots to disk in the background: one file per rank, atomically renamed.

Writer threads are non-daemon, so a normal interpreter exit waits for pending writes. This module
owns the on-disk layout: `<dir>/rankNNNNN.ffsnap` per rank, and under `persist_dir` one directory
per persisted step, `step{step:08d}/` (`step_dir`, `persisted_steps`).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import List, Optional

from ..errors import SnapshotError
from .pool import SnapshotRef

logger = logging.getLogger("fftrainer_ds")


_STEP_PREFIX = "step"


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank:05d}.ffsnap")


def step_dir(persist_dir: str, step: int) -> str:
    """The directory of the snapshots persisted at `step` under `persist_dir`."""
    return os.path.join(persist_dir, f"{_STEP_PREFIX}{step:08d}")


def persisted_steps(persist_dir: Optional[str], rank: int) -> List[int]:
    """Steps under `persist_dir` that hold a complete file of `rank` (writes are atomic renames)."""
    if not persist_dir or not os.path.isdir(persist_dir):
        return []
    out = []
    for name in os.listdir(persist_dir):
        digits = name[len(_STEP_PREFIX):]
        if name.startswith(_STEP_PREFIX) and digits.isdigit() and \
                os.path.exists(rank_file(os.path.join(persist_dir, name), rank)):
            out.append(int(digits))
    return sorted(out)


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

