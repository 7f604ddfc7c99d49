"""The `"fast_failover"` section of the DeepSpeed JSON config, validated like DeepSpeed's own."""
from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

SECTION = "fast_failover"

# Keys that are no longer part of the section, with where that setting lives now: a config written
# for an older version gets told where to go instead of a bare "unknown key".
REMOVED_KEYS = {
    "heartbeat_interval_s": "heartbeats are set with `fftrainer-launch --heartbeat-interval-s` "
                            "(workers take the launcher's interval; no worker reads this key)",
}


class FastFailoverConfig(BaseModel):
    """Settings of fast failover. Present section: enabled unless `"enabled": false`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    enabled: bool = True
    """Master switch. With false (or no section) the engine behaves exactly like plain DeepSpeed."""

    snapshot_interval_steps: Union[int, str] = Field(1, union_mode="left_to_right")
    """Take a snapshot every N optimizer steps (>= 1), or "auto": the engine picks the smallest interval
    whose measured snapshot cost fits `snapshot_overhead_budget_pct`, and reports the resulting RPO."""

    snapshot_overhead_budget_pct: float = Field(1.0, gt=0, le=100)
    """Step-time overhead allowed for snapshots when `snapshot_interval_steps` is "auto" (percent)."""

    snapshot_backend: Literal["auto", "native", "triton", "reference"] = "auto"
    """Pack kernel: "auto" (native if built, else reference), "native" (C++/CUDA, fails if not built),
    "triton" (GPU fallback), "reference" (pure torch)."""

    pack_threads: int = Field(0, ge=0)
    """CPU threads of the native pack kernel; 0 = all hardware threads."""

    pin_memory: bool = True
    """Page-lock the host snapshot buffers (CUDA pinned memory on GPU, mlock on CPU where permitted)."""

    max_snapshot_buffers: int = Field(3, ge=2)
    """Host buffers per rank for its own snapshots (2 = strict double buffering; a third absorbs slow readers)."""

    replication_factor: int = Field(1, ge=0)
    """Number of peers (k) that hold a copy of each rank's snapshot; 0 disables replication."""

    replication_backend: Literal["gloo", "nccl"] = "gloo"
    """Process-group backend of the dedicated replication group (nccl: GPU send/recv)."""

    chunk_mb: float = Field(4.0, gt=0, le=1024)
    """Replication chunk size in MiB; each chunk carries its own checksum."""

    max_bandwidth_mbps: Optional[float] = Field(None, gt=0)
    """Upper limit of replication traffic per rank in MB/s (None: no fixed limit)."""

    adaptive_throttle: bool = True
    """Back off (AIMD) when replication inflates the step time beyond `max_overhead_pct`."""

    max_overhead_pct: float = Field(2.0, gt=0, le=100)
    """Step-time inflation (percent over a baseline measured with replication held) that triggers back-off
    (never below the rate that keeps the replica lag at one step)."""

    max_host_memory_gb: Optional[float] = Field(None, gt=0)
    """Host memory budget per rank for own snapshots plus held replicas, in GB (None: unchecked)."""

    heartbeat_timeout_s: float = Field(3.0, gt=0)
    """A worker whose last heartbeat is older than this is declared hung."""

    collective_timeout_s: float = Field(30.0, gt=0)
    """Timeout of collectives in the rebuilt process groups, and how long a replication peer may make no
    progress before it is dropped for the generation."""

    persist_dir: Optional[str] = None
    """Directory for asynchronous on-disk snapshots (the fallback when every in-memory copy is lost)."""

    persist_interval_steps: int = Field(0, ge=0)
    """Persist every N steps to `persist_dir` (0: never)."""

    @field_validator("snapshot_interval_steps", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> Union[int, str]:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError('must be an integer >= 1 or "auto"')

    @model_validator(mode="after")
    def _cross_field(self) -> "FastFailoverConfig":
        if self.persist_interval_steps and not self.persist_dir:
            raise ValueError("persist_interval_steps > 0 needs persist_dir")
        return self

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mb * (1 << 20))


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    key = f"{SECTION}.{loc}" if loc else SECTION
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden" and loc in REMOVED_KEYS:
        return f"{key}: no longer a config key: {REMOVED_KEYS[loc]}"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(FastFailoverConfig.model_fields)
        return f"{key}: unknown key; allowed keys: {allowed}"
    got = first.get("input")
    got_s = "" if isinstance(got, Mapping) else f" (got {got!r})"
    return f"{key}: {msg}{got_s}"


def parse_config(ds_config: Optional[Mapping[str, Any]]) -> FastFailoverConfig:
    """Validate the `fast_failover` section of a DeepSpeed config dict (absent section: disabled)."""
    section = (ds_config or {}).get(SECTION)
    if section is None:
        return FastFailoverConfig(enabled=False)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{SECTION}: must be a JSON object, got {type(section).__name__}")
    try:
        return FastFailoverConfig(**section)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
