"""Error hierarchy: what a caller can recover from versus what ends the job."""


class FailoverError(Exception):
    """Base class of every error raised by fftrainer_ds."""


class ConfigError(FailoverError, ValueError):
    """An invalid `fast_failover` config value; the message names the key and the allowed values."""


class SnapshotError(FailoverError):
    """A snapshot that must not be loaded: corrupt, truncated, or from another job layout."""


class RecoverableError(FailoverError):
    """A failure the job survives by regrouping (a peer died, a collective failed or timed out)."""


class TerminalError(FailoverError):
    """A failure that stops the job: no copy of some shard survives and no persisted snapshot exists."""
