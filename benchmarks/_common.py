"""Shared bits of the CPU benchmarks: launching ranks and summarising paired measurements."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence


def paired_overhead(off: Sequence[float], on: Sequence[float]) -> Dict[str, float]:
    """Median of per-pair ratios (on/off - 1), plus the medians themselves."""
    ratios = [b / a - 1.0 for a, b in zip(off, on)]
    return {"off_s": statistics.median(off), "on_s": statistics.median(on),
            "overhead_pct": 100.0 * statistics.median(ratios)}


def timed_steps(engine, batches: Iterator, n: int, after: Optional[Callable[[], None]] = None) -> List[float]:
    """Wall time of `n` training steps, each started together on every rank (a barrier before it);
    `after()` runs after each step, outside its time."""
    import torch.distributed as dist

    times = []
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine(next(batches))
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        if after is not None:
            after()
    return times


def table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])
