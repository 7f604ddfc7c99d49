"""Spawn N real worker processes (gloo on loopback) running one function, and collect results.

The parent hosts a `TCPStore(port=0)` (no port probing); each child gets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT (the store's port) and FFTRAINER_STORE_PORT in its env,
runs `module:function(**kwargs)` and returns its pickled result through a file. Any child that
fails, or a run that exceeds `timeout_s`, kills every child: no orphans.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch.distributed as dist

_CHILD = "fftrainer_ds.testing._child"


@dataclass
class RankResult:
    rank: int
    returncode: int
    value: Any
    log: str


def run_ranks(target: str, world_size: int, kwargs: Optional[Dict[str, Any]] = None, timeout_s: float = 300,
              env: Optional[Dict[str, str]] = None, expect_success: bool = True,
              extra_env_per_rank: Optional[Dict[int, Dict[str, str]]] = None) -> List[RankResult]:
    """Run `target` ("pkg.module:function") in `world_size` processes; return one RankResult per rank.

    With expect_success, raises RuntimeError with every rank's log tail if any rank fails.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    port = store.port
    tmp = tempfile.mkdtemp(prefix="fftrainer_ranks_")
    with open(os.path.join(tmp, "kwargs.pkl"), "wb") as f:
        pickle.dump(kwargs or {}, f)
    procs, logs = [], []
    try:
        for rank in range(world_size):
            child_env = dict(os.environ)
            child_env.update(env or {})
            child_env.update({
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "FFTRAINER_STORE_PORT": str(port), "FFTRAINER_TEST_DIR": tmp,
                "OMP_NUM_THREADS": child_env.get("OMP_NUM_THREADS", "1"),
            })
            child_env.update((extra_env_per_rank or {}).get(rank, {}))
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", _CHILD, target, tmp], env=child_env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout_s
        failed = False
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failed = True
                break
            if expect_success and any(p.poll() not in (None, 0) for p in procs):
                # One rank failed: give the others a moment to report their own error, then stop.
                time.sleep(2.0)
                failed = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
    results = _collect(procs, logs, tmp)
    del store
    if expect_success and (failed or any(r.returncode != 0 for r in results)):
        tails = "\n".join(f"--- rank {r.rank} (rc={r.returncode}) ---\n{r.log[-4000:]}" for r in results)
        raise RuntimeError(f"run_ranks({target}) failed or timed out after {timeout_s}s:\n{tails}")
    return results


def _collect(procs, logs, tmp: str) -> List[RankResult]:
    """Each rank's exit code, its result (pickled by the child; the parent's own temp dir) and log."""
    results = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text = log.read()
        log.close()
        value = None
        path = os.path.join(tmp, f"result{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                value = pickle.load(f)
        results.append(RankResult(rank, p.returncode, value, text))
    return results


def worker_init_process_group(backend: str = "gloo", timeout_s: float = 60) -> None:
    """In a child of run_ranks: join the default process group through the parent's store."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["FFTRAINER_STORE_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))
