"""The job secret and the keys derived from it (docs/FORMAT.md "Authentication", README "Security").

Where the secret comes from, in each worker (`current()`, read once per process):
- `FFTRAINER_SECRET_FILE` names a file holding it (at least 16 bytes, readable by its owner only).
  `fftrainer-launch` sets it for its children to a 0600 copy in a private 0700 temp directory that it
  removes when it ends (`HandOff`); with `--secret-file PATH` that copy holds PATH's bytes, else 32
  random bytes (`secrets.token_bytes`). The secret is never on a command line nor in the coordination
  store; only the file's path is in the environment. A file, not an inherited pipe: replacements and
  restarted ranks are spawned later in the job and each needs the secret again.
- Otherwise (plain `deepspeed`, torchrun, `testing.run_ranks`) the job has no secret, and every key
  is derived from a PUBLIC constant (`FALLBACK`): anyone can compute it. Snapshots, replica chunks and
  recovery exchanges are then protected against corruption, never against an attacker. The constant
  is deliberately not derived from MASTER_ADDR/MASTER_PORT/WORLD_SIZE: those are no secret either,
  and a key that changed with the port would refuse this job's own persisted snapshots in the next
  run (torchrun --standalone and run_ranks pick a new port each time).

Keys: HKDF-style with HMAC-SHA256 (RFC 5869 extract, then one expand block per key), one per
purpose and, for traffic inside one process-group generation, per generation:
`key(Purpose.REPLICATION, 3)`. Persisted data (snapshots) uses generation None: a new run with the
same secret must verify them.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

from .errors import ConfigError

ENV_SECRET_FILE = "FFTRAINER_SECRET_FILE"
SECRET_BYTES = 32  # what fftrainer-launch draws
MIN_SECRET_BYTES = 16  # a user's file shorter than this is refused (128 bits)
_MAX_SECRET_BYTES = 1 << 16
_SALT = b"fftrainer_ds job secret v1"
# Public, on purpose: see the module docstring. Anyone can derive the keys of a job without a secret.
FALLBACK = b"fftrainer_ds: no job secret configured (public fallback, integrity only)"
MAC_BYTES = 32  # HMAC-SHA256 tag size


class Purpose(str, enum.Enum):
    """What a key authenticates; each purpose gets its own keys (a tag of one never verifies another)."""

    SNAPSHOT = "snapshot"                    # snapshot header + manifest + meta (generation: None)
    REPLICATION = "replication"              # replica chunk streams of one generation
    RECOVERY_TRANSFER = "recovery-transfer"  # replication/direct.py transfers during a recovery
    RECOVERY_EXCHANGE = "recovery-exchange"  # the RankInfo all-gather of a recovery
    INVENTORY = "inventory"                  # the replica inventory all-gather


@dataclass(frozen=True)
class JobSecret:
    """The extracted secret of a job (never the raw bytes) and where it came from."""

    prk: bytes = field(repr=False)
    origin: str
    keyed: bool  # False for the public fallback

    @classmethod
    def from_bytes(cls, secret: bytes, origin: str, keyed: bool = True) -> "JobSecret":
        return cls(hmac.new(_SALT, secret, hashlib.sha256).digest(), origin, keyed)

    def key(self, purpose: Purpose, generation: Optional[int] = None) -> bytes:
        """The 32-byte key of `purpose` in `generation` (None: the same key in every generation)."""
        return _derive(self.prk, Purpose(purpose).value, generation)


def _derive(prk: bytes, purpose: str, generation: Optional[int]) -> bytes:
    scope = "*" if generation is None else str(int(generation))
    info = f"fftrainer_ds/{purpose}/{scope}".encode()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()  # HKDF-Expand, first block


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over the concatenation of `parts`."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


def write_secret_file(path: str) -> str:
    """Create `path` (0600) with 32 fresh random bytes unless it exists; for a multi-node job's nodes
    to share (copy it to every host over a trusted channel). Returns `path`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def read_secret_file(path: str) -> bytes:
    """The secret in `path`; ConfigError if it is missing, not a regular file, open to group/others,
    or too short."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigError(f"job secret file {path}: cannot open it ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"job secret file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"job secret file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others "
                              f"access it; only its owner may (chmod 600 {path})")
        data = os.read(fd, _MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if not MIN_SECRET_BYTES <= len(data) <= _MAX_SECRET_BYTES:
        raise ConfigError(f"job secret file {path}: holds {len(data)} bytes, needs {MIN_SECRET_BYTES} to "
                          f"{_MAX_SECRET_BYTES} (e.g. head -c 32 /dev/urandom > {path})")
    return data


def load(environ: Mapping[str, str] = os.environ) -> JobSecret:
    """The job secret named by the environment (not cached; see `current`)."""
    path = environ.get(ENV_SECRET_FILE)
    if path:
        return JobSecret.from_bytes(read_secret_file(path), f"secret file {path}")
    return JobSecret.from_bytes(FALLBACK, "public fallback (no job secret)", keyed=False)


_lock = threading.Lock()
_current: Optional[JobSecret] = None


def current() -> JobSecret:
    """This process's job secret: read on first use, then kept (the file is not read again)."""
    global _current
    with _lock:
        if _current is None:
            _current = load()
        return _current


def _forget_for_tests() -> None:
    """Tests that change FFTRAINER_SECRET_FILE in-process read it again."""
    global _current
    with _lock:
        _current = None


class HandOff:
    """fftrainer-launch's copy of the secret for its children: a 0600 file in a private (0700) temp
    directory; `env()` names it, `remove()` deletes it (at the launcher's end; a SIGKILLed launcher
    leaves it behind, readable by its user only)."""

    def __init__(self, secret: bytes) -> None:
        self.directory = tempfile.mkdtemp(prefix="fftrainer-secret-")  # mode 0700
        self.path = os.path.join(self.directory, "job.secret")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secret)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, secret_file: Optional[str]) -> "HandOff":
        """The user's secret (`--secret-file`) or, without one, 32 random bytes."""
        return cls(read_secret_file(secret_file) if secret_file else secrets.token_bytes(SECRET_BYTES))

    def env(self) -> Dict[str, str]:
        return {ENV_SECRET_FILE: self.path}

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
