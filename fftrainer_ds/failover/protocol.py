"""The coordination-store protocol of fftrainer-launch: every key, who writes it, who reads it.

One `torch.distributed.TCPStore` is hosted by the coordinator (the supervisor of node 0), outside every
worker. Supervisors of the other nodes and every worker are clients. Our keys live under ``ff/``; the
process groups of generation g live under the prefix ``gen{g}/`` (``PrefixStore(f"gen{g}", store)``),
so a rebuilt group never sees a dead generation's rendezvous keys.

| key                               | value                       | writer            | reader |
|-----------------------------------|-----------------------------|-------------------|--------|
| ``ff/job``                        | JSON `JobSpec`              | coordinator       | all    |
| ``ff/state``                      | `JobState`: "running", "done", "failed: <why>" | coordinator | supervisors |
| ``ff/node/{n}``                   | JSON `NodeRegistration` (host, pid, spawned slots) | supervisor n | coordinator |
| ``ff/node/{n}/hb``                | counter, +1 per supervisor loop tick | supervisor n | coordinator |
| ``ff/node/{n}/nev``               | number of events posted     | supervisor n      | coordinator |
| ``ff/node/{n}/ev/{i}``            | JSON `NodeEvent` (exit, failure, spare) | supervisor n | coordinator |
| ``ff/node/{n}/bye``               | "1" once node n stopped its children | supervisor n | coordinator |
| ``ff/slot/{slot}``                | JSON `SlotInfo` (pid, node, host) | supervisor  | anyone |
| ``ff/slot/{slot}/error``          | last line of an uncaught exception | worker (excepthook) | supervisor |
| ``ff/slot/{slot}/finished``       | "1": heartbeats stopped, exiting 0 | worker (`Agent.finish`) | supervisor |
| ``ff/hb/{slot}``                  | counter, +1 per heartbeat   | worker / spare    | its supervisor |
| ``ff/gen``                        | latest generation (decimal) | coordinator, last | all |
| ``ff/gen/{g}``                    | JSON `GenerationInfo`       | coordinator, before ``ff/gen`` | all |
| ``ff/gen/{g}/join/{rank}``        | slot that entered generation g's group | worker | workers, coordinator |
| ``ff/gen/{g}/x/{name}/{rank}``    | JSON value of `Agent.allgather(name, ...)` | worker | workers |
| ``ff/err/n``, ``ff/err/{i}``      | counter; JSON `ErrorReport` (collective error/timeout) | worker | coordinator |
| ``ff/progress/{rank}``            | JSON `Progress` (step, gen, time) | worker      | anyone (informational) |

A process is named by its *slot*, unique for the whole job: ``n{node}.w{local}`` (initial worker),
``n{node}.s{i}`` (hot spare), ``n{node}.x{k}`` (k-th restarted replacement). A rank is a seat that
slots occupy in turn; `GenerationInfo.ranks` says which slot holds each rank in a generation.
Heartbeats are counters, so staleness is measured on the supervisor's own monotonic clock (no clock
skew between hosts). Timestamps in records are `time.time()` of the writer. Closed sets of strings
(event kinds, slot kinds, generation reasons, job states) are `str` enums: the JSON carries the plain
string, and parsing a record turns it back into the member (an unknown string raises ValueError).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, get_type_hints

# --- environment of the children (set by fftrainer-launch) ---------------------------------------
ENV_SLOT = "FFTRAINER_SLOT"                  # this process's slot; marks "running under fftrainer-launch"
ENV_NODE_RANK = "FFTRAINER_NODE_RANK"
ENV_STORE_ADDR = "FFTRAINER_STORE_ADDR"
ENV_STORE_PORT = "FFTRAINER_STORE_PORT"
ENV_SPARE_ID = "FFTRAINER_SPARE_ID"          # set only on hot spares
ENV_REPLACEMENT = "FFTRAINER_REPLACEMENT"    # "1" on a restarted replacement process
ENV_SUPERVISOR_PID = "FFTRAINER_SUPERVISOR_PID"
ENV_HEARTBEAT_INTERVAL_S = "FFTRAINER_HEARTBEAT_INTERVAL_S"
ENV_HEARTBEAT_TIMEOUT_S = "FFTRAINER_HEARTBEAT_TIMEOUT_S"
ENV_COLLECTIVE_TIMEOUT_S = "FFTRAINER_COLLECTIVE_TIMEOUT_S"


# --- closed sets of strings ------------------------------------------------------------------------
class WireEnum(str, Enum):
    """A `str` enum: json.dumps writes its value, and f-strings/logs show the value too (as StrEnum,
    which Python 3.10 lacks), so the bytes in the store are the plain strings."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class JobState(WireEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"        # written as "failed: <why>"


class EventKind(WireEnum):
    EXIT = "exit"            # rc == 0: the child finished
    FAILURE = "failure"      # non-zero exit, signal, hang, declared failed
    SPARE = "spare"          # a new hot spare was spawned (replenishing one given a rank or lost)


class SlotKind(WireEnum):
    WORKER = "worker"        # spawned at start with a rank
    SPARE = "spare"          # spawned at start without a rank
    RESTART = "restart"      # spawned after a failure when no spare was left


class GenReason(WireEnum):
    START = "start"
    FAILURE = "failure"      # some rank's holder failed
    REGROUP = "regroup"      # collectives failed with no process failure: same processes, new group


def encode_state(state: JobState, why: str = "") -> str:
    """The value of ``ff/state``: "running", "done", "failed: <why>"."""
    return f"{state.value}: {why}" if state is JobState.FAILED else state.value


def decode_state(raw: bytes) -> Tuple[JobState, str]:
    """``ff/state`` back into (state, why); ValueError for an unknown state."""
    text = raw.decode() if isinstance(raw, (bytes, bytearray)) else raw
    state, _, why = text.partition(": ")
    return JobState(state), why


# --- keys -----------------------------------------------------------------------------------------
JOB = "ff/job"
STATE = "ff/state"
GEN = "ff/gen"
ERR_COUNT = "ff/err/n"


@dataclass(frozen=True)
class KeyPattern:
    """A family of store keys (or slot names): ``node_hb_key(3) == "ff/node/3/hb"``."""
    pattern: str

    def __call__(self, *parts: object) -> str:
        if len(parts) != self.pattern.count("{}"):
            raise TypeError(f"{self.pattern!r} takes {self.pattern.count('{}')} parts, got {len(parts)}")
        return self.pattern.format(*parts)


node_key = KeyPattern("ff/node/{}")                       # (node)
node_hb_key = KeyPattern("ff/node/{}/hb")                 # (node)
node_nev_key = KeyPattern("ff/node/{}/nev")               # (node)
node_event_key = KeyPattern("ff/node/{}/ev/{}")           # (node, i)
node_bye_key = KeyPattern("ff/node/{}/bye")               # (node)
slot_key = KeyPattern("ff/slot/{}")                       # (slot)
slot_error_key = KeyPattern("ff/slot/{}/error")           # (slot)
slot_finished_key = KeyPattern("ff/slot/{}/finished")     # (slot)
heartbeat_key = KeyPattern("ff/hb/{}")                    # (slot)
gen_key = KeyPattern("ff/gen/{}")                         # (g)
join_key = KeyPattern("ff/gen/{}/join/{}")                # (g, rank)
exchange_key = KeyPattern("ff/gen/{}/x/{}/{}")            # (g, name, rank)
err_key = KeyPattern("ff/err/{}")                         # (i)
progress_key = KeyPattern("ff/progress/{}")               # (rank)
# Prefix of generation g's process-group keys: ``PrefixStore(group_prefix(g), store)``.
group_prefix = KeyPattern("gen{}")                        # (g)
worker_slot = KeyPattern("n{}.w{}")                       # (node, local)
spare_slot = KeyPattern("n{}.s{}")                        # (node, i)
restart_slot = KeyPattern("n{}.x{}")                      # (node, k)


# --- records --------------------------------------------------------------------------------------
def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def loads(raw: bytes) -> Any:
    return json.loads(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)


R = TypeVar("R", bound="Record")


@lru_cache(maxsize=None)
def _enum_fields(cls: type) -> Dict[str, Type[Enum]]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Enum)}


def _build(cls: Type[R], d: Mapping[str, Any]) -> R:
    """`cls` from parsed JSON: enum fields from their strings (ValueError if unknown); an unknown or
    missing field is a TypeError."""
    enums = _enum_fields(cls)
    return cls(**{k: enums[k](v) if k in enums else v for k, v in d.items()})


class Record:
    """A dataclass stored as one JSON object; its enum fields travel as their strings."""

    def to_json(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def from_dict(cls: Type[R], d: Mapping[str, Any]) -> R:
        return _build(cls, d)

    @classmethod
    def from_json(cls: Type[R], raw: bytes) -> R:
        return cls.from_dict(loads(raw))


@dataclass
class JobSpec(Record):
    nnodes: int
    nproc_per_node: int
    world_size: int
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    collective_timeout_s: float
    max_restarts: int


@dataclass
class RankSlot(Record):
    """Who holds a rank in one generation."""
    slot: str
    node: int
    host: str
    pid: Optional[int]          # None for a restart not yet spawned (then see ``ff/slot/{slot}``)
    kind: SlotKind
    local_rank: int


@dataclass
class RegisteredSlot(Record):
    """One child a supervisor spawned at start (inside `NodeRegistration.slots`)."""
    kind: SlotKind
    pid: int
    local_rank: int
    rank: Optional[int]         # None for a spare


@dataclass
class NodeRegistration(Record):
    """What supervisor n writes at ``ff/node/{n}`` once its workers and spares are spawned."""
    host: str
    pid: int
    nproc: int
    slots: Dict[str, RegisteredSlot]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NodeRegistration":
        return _build(cls, dict(d, slots={s: RegisteredSlot.from_dict(v) for s, v in d["slots"].items()}))


@dataclass
class SlotInfo(Record):
    """Where a slot's process runs (``ff/slot/{slot}``), written when it is spawned."""
    pid: int
    node: int
    host: str


@dataclass
class Progress(Record):
    """The last completed step of a rank (``ff/progress/{rank}``)."""
    step: int
    gen: int
    time: float


@dataclass
class GenerationInfo(Record):
    """What the coordinator publishes at ``ff/gen/{g}`` before setting ``ff/gen`` to g."""
    generation: int
    world_size: int
    ranks: Dict[int, RankSlot]
    failed: List[int] = field(default_factory=list)        # ranks whose holder failed since g-1
    failed_slots: List[str] = field(default_factory=list)  # their slots (supervisors kill any still alive)
    causes: Dict[int, str] = field(default_factory=dict)
    recovery_start: float = 0.0                           # time.time() when g was published
    detected_at: Optional[float] = None                   # time.time() of the earliest detection
    reason: GenReason = GenReason.START
    restarts_used: int = 0

    def to_json(self) -> str:
        d = asdict(self)
        d["ranks"] = {str(r): v for r, v in d["ranks"].items()}    # JSON object keys are strings
        d["causes"] = {str(r): v for r, v in d["causes"].items()}
        return dumps(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenerationInfo":
        return _build(cls, dict(d, ranks={int(r): RankSlot.from_dict(v) for r, v in d["ranks"].items()},
                                causes={int(r): v for r, v in d["causes"].items()}))

    def rank_of(self, slot: str) -> Optional[int]:
        for r, rs in self.ranks.items():
            if rs.slot == slot:
                return r
        return None


@dataclass
class NodeEvent(Record):
    """A supervisor's observation of one of its children (posted at ``ff/node/{n}/ev/{i}``)."""
    kind: EventKind
    slot: str
    node: int
    host: str
    pid: int
    time: float                 # time.time() at detection
    rc: Optional[int] = None
    cause: str = ""
    local_rank: Optional[int] = None   # SPARE events: the new spare's LOCAL_RANK (its `RankSlot.local_rank`)


@dataclass
class ErrorReport(Record):
    """A worker's report that a collective raised or timed out (posted at ``ff/err/{i}``)."""
    rank: int
    slot: str
    generation: int
    cause: str
    time: float
