"""The records a run of examples/train_gpt.py leaves, and their bitwise comparison with a failure-free run.

Each rank appends ``{"step", "loss", ...}`` lines to ``OUT/losses.rank{R}.jsonl`` (every time any process
holding rank R completed a step, so a step replayed after a rollback appears twice) and writes
``OUT/final.rank{R}.json`` (digest of the final weights and optimizer state, steps, recovery timelines).
A run with failures is correct when every rank recorded every step with exactly the failure-free loss,
each time it recorded it, and ended with the same digest.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Set, Tuple

Losses = Dict[Tuple[int, int], List[float]]     # (rank, step) -> the loss each time it was recorded


class RunRecord(NamedTuple):
    losses: Losses
    finals: Dict[int, Dict[str, Any]]            # rank -> final.rank{R}.json


def read_run(out: str, world: int) -> RunRecord:
    losses: Losses = {}
    finals: Dict[int, Dict[str, Any]] = {}
    for r in range(world):
        with open(os.path.join(out, f"losses.rank{r}.jsonl")) as f:
            for line in f:
                x = json.loads(line)
                losses.setdefault((r, x["step"]), []).append(x["loss"])
        with open(os.path.join(out, f"final.rank{r}.json")) as f:
            finals[r] = json.load(f)
    return RunRecord(losses, finals)


def step_times(out: str, rank: int = 0) -> List[float]:
    """time.time() at which `rank` recorded each of its loss lines, in step order (a failure-free run's pace)."""
    with open(os.path.join(out, f"losses.rank{rank}.jsonl")) as f:
        return [x["t"] for x in sorted((json.loads(line) for line in f), key=lambda x: x["step"])]


def recoveries(finals: Dict[int, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every recovery timeline the final processes recorded (`RecoveryTimeline.to_dict()`)."""
    return [rec for f in finals.values() for rec in f["recoveries"]]


def unlogged_ok(finals: Dict[int, Dict[str, Any]], extra: Iterable[Dict[str, Any]] = ()) -> Set[Tuple[int, int]]:
    """(rank, step) pairs whose loss line may be missing: a process SIGKILLed after completing the step its
    replacement resumed from had no chance to write it (the loss is written after engine.step() returns).
    That step's state is still checked: every later loss and the final digest depend on it bit for bit.

    `extra`: records with the same "recovery_step" and "failed_ranks" keys for recoveries that no final
    process lived through (a long soak replaces every rank, and a timeline dies with its process)."""
    return {(r, rec["recovery_step"]) for rec in [*recoveries(finals), *extra]
            if rec.get("recovery_step") is not None for r in rec["failed_ranks"]}


def mismatches(base: RunRecord, run: RunRecord, steps: int, extra: Iterable[Dict[str, Any]] = ()) -> List[str]:
    """Every way `run` differs from the failure-free `base` (empty: bitwise equal, no step missing)."""
    exempt = unlogged_ok(run.finals, extra)
    bad: List[str] = []
    for r in sorted(base.finals):
        final = run.finals[r]
        if final["steps"] != steps:
            bad.append(f"rank {r}: ended at step {final['steps']}, not {steps}")
        if final["digest"] != base.finals[r]["digest"]:
            bad.append(f"rank {r}: final weights differ")
        for step in range(1, steps + 1):
            seen = run.losses.get((r, step))
            if not seen:
                if (r, step) not in exempt:
                    bad.append(f"rank {r} never recorded step {step}")
                continue
            if any(x != base.losses[(r, step)][0] for x in seen):
                bad.append(f"rank {r} step {step}: {seen} != {base.losses[(r, step)][0]}")
    return bad


def assert_bitwise(base: RunRecord, run: RunRecord, steps: int, extra: Iterable[Dict[str, Any]] = ()) -> None:
    bad = mismatches(base, run, steps, extra)
    assert not bad, f"{len(bad)} difference(s) from the failure-free run:\n" + "\n".join(bad[:20])
