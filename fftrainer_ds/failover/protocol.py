"""The coordination-store protocol of fftrainer-launch: every key, who writes it, who reads it.

One `torch.distributed.TCPStore` is hosted by the coordinator (the supervisor of node 0), outside every
worker. Supervisors of the other nodes and every worker are clients. Our keys live under ``ff/``; the
process groups of generation g live under the prefix ``gen{g}/`` (``PrefixStore(f"gen{g}", store)``),
so a rebuilt group never sees a dead generation's rendezvous keys.

| key                               | value                       | writer            | reader |
|-----------------------------------|-----------------------------|-------------------|--------|
| ``ff/job``                        | JSON `JobSpec`              | coordinator       | all    |
| ``ff/state``                      | "running", "done", "failed: <why>" | coordinator | supervisors |
| ``ff/node/{n}``                   | JSON registration (host, pid, spawned slots) | supervisor n | coordinator |
| ``ff/node/{n}/hb``                | counter, +1 per supervisor loop tick | supervisor n | coordinator |
| ``ff/node/{n}/nev``               | number of events posted     | supervisor n      | coordinator |
| ``ff/node/{n}/ev/{i}``            | JSON `NodeEvent` (exit, hang) | supervisor n    | coordinator |
| ``ff/node/{n}/bye``               | "1" once node n stopped its children | supervisor n | coordinator |
| ``ff/slot/{slot}``                | JSON {pid, node, host}      | supervisor        | anyone |
| ``ff/slot/{slot}/error``          | last line of an uncaught exception | worker (excepthook) | supervisor |
| ``ff/slot/{slot}/finished``       | "1": heartbeats stopped, exiting 0 | worker (`Agent.finish`) | supervisor |
| ``ff/hb/{slot}``                  | counter, +1 per heartbeat   | worker / spare    | its supervisor |
| ``ff/gen``                        | latest generation (decimal) | coordinator, last | all |
| ``ff/gen/{g}``                    | JSON `GenerationInfo`       | coordinator, before ``ff/gen`` | all |
| ``ff/gen/{g}/join/{rank}``        | slot that entered generation g's group | worker | workers, coordinator |
| ``ff/gen/{g}/x/{name}/{rank}``    | JSON value of `Agent.allgather(name, ...)` | worker | workers |
| ``ff/err/n``, ``ff/err/{i}``      | counter; JSON `ErrorReport` (collective error/timeout) | worker | coordinator |
| ``ff/progress/{rank}``            | JSON {step, gen, time}      | worker            | anyone (informational) |

A process is named by its *slot*, unique for the whole job: ``n{node}.w{local}`` (initial worker),
``n{node}.s{i}`` (hot spare), ``n{node}.x{k}`` (k-th restarted replacement). A rank is a seat that
slots occupy in turn; `GenerationInfo.ranks` says which slot holds each rank in a generation.
Heartbeats are counters, so staleness is measured on the supervisor's own monotonic clock (no clock
skew between hosts). Timestamps in records are `time.time()` of the writer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

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

STATE_RUNNING, STATE_DONE, STATE_FAILED = "running", "done", "failed"

# --- keys -----------------------------------------------------------------------------------------
JOB = "ff/job"
STATE = "ff/state"
GEN = "ff/gen"
ERR_COUNT = "ff/err/n"


def node_key(node: int) -> str:
    return f"ff/node/{node}"


def node_hb_key(node: int) -> str:
    return f"ff/node/{node}/hb"


def node_nev_key(node: int) -> str:
    return f"ff/node/{node}/nev"


def node_event_key(node: int, i: int) -> str:
    return f"ff/node/{node}/ev/{i}"


def node_bye_key(node: int) -> str:
    return f"ff/node/{node}/bye"


def slot_key(slot: str) -> str:
    return f"ff/slot/{slot}"


def slot_error_key(slot: str) -> str:
    return f"ff/slot/{slot}/error"


def slot_finished_key(slot: str) -> str:
    return f"ff/slot/{slot}/finished"


def heartbeat_key(slot: str) -> str:
    return f"ff/hb/{slot}"


def gen_key(g: int) -> str:
    return f"ff/gen/{g}"


def join_key(g: int, rank: int) -> str:
    return f"ff/gen/{g}/join/{rank}"


def exchange_key(g: int, name: str, rank: int) -> str:
    return f"ff/gen/{g}/x/{name}/{rank}"


def err_key(i: int) -> str:
    return f"ff/err/{i}"


def progress_key(rank: int) -> str:
    return f"ff/progress/{rank}"


def group_prefix(g: int) -> str:
    """Prefix of generation g's process-group keys: ``PrefixStore(group_prefix(g), store)``."""
    return f"gen{g}"


def worker_slot(node: int, local: int) -> str:
    return f"n{node}.w{local}"


def spare_slot(node: int, i: int) -> str:
    return f"n{node}.s{i}"


def restart_slot(node: int, k: int) -> str:
    return f"n{node}.x{k}"


# --- records --------------------------------------------------------------------------------------
def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def loads(raw: bytes) -> Any:
    return json.loads(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)


@dataclass
class JobSpec:
    nnodes: int
    nproc_per_node: int
    world_size: int
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    collective_timeout_s: float
    max_restarts: int


@dataclass
class RankSlot:
    """Who holds a rank in one generation."""
    slot: str
    node: int
    host: str
    pid: Optional[int]          # None for a restart not yet spawned (then see ``ff/slot/{slot}``)
    kind: str                   # "worker" | "spare" | "restart"
    local_rank: int


@dataclass
class GenerationInfo:
    """What the coordinator publishes at ``ff/gen/{g}`` before setting ``ff/gen`` to g."""
    generation: int
    world_size: int
    ranks: Dict[int, RankSlot]
    failed: List[int] = field(default_factory=list)        # ranks whose holder failed since g-1
    failed_slots: List[str] = field(default_factory=list)  # their slots (supervisors kill any still alive)
    causes: Dict[int, str] = field(default_factory=dict)
    recovery_start: float = 0.0                           # time.time() when g was published
    detected_at: Optional[float] = None                   # time.time() of the earliest detection
    reason: str = "start"                                  # "start" | "failure" | "regroup"
    restarts_used: int = 0

    def to_json(self) -> str:
        d = asdict(self)
        d["ranks"] = {str(r): v for r, v in d["ranks"].items()}
        d["causes"] = {str(r): v for r, v in d["causes"].items()}
        return dumps(d)

    @classmethod
    def from_json(cls, raw: bytes) -> "GenerationInfo":
        d = loads(raw)
        d["ranks"] = {int(r): RankSlot(**v) for r, v in d["ranks"].items()}
        d["causes"] = {int(r): v for r, v in d["causes"].items()}
        return cls(**d)

    def rank_of(self, slot: str) -> Optional[int]:
        for r, rs in self.ranks.items():
            if rs.slot == slot:
                return r
        return None


@dataclass
class NodeEvent:
    """A supervisor's observation of one of its children (posted at ``ff/node/{n}/ev/{i}``)."""
    kind: str                   # "exit" (rc==0: finished) | "failure" (non-zero exit, signal, hang)
    slot: str
    node: int
    host: str
    pid: int
    time: float                 # time.time() at detection
    rc: Optional[int] = None
    cause: str = ""


@dataclass
class ErrorReport:
    """A worker's report that a collective raised or timed out (posted at ``ff/err/{i}``)."""
    rank: int
    slot: str
    generation: int
    cause: str
    time: float
