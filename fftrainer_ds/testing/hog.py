"""A CPU hog: busy processes beside a job, to check that recovery does not depend on an idle machine.

    python -m fftrainer_ds.testing.hog [--per-core 2] -- COMMAND ARGS...   # runs COMMAND beside the hog
    with cpu_hog(per_core=2): ...                                        # the same inside Python

Each hog process spins in pure Python at normal priority, so the job's processes get about
1 / (1 + per_core) of a core each when they want one. The hogs die with their parent (PDEATHSIG on
Linux) and are killed when the block or the command ends.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from typing import Iterator, List, Optional, Sequence

_SPIN = "while True:\n    pass\n"


def _preexec() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def cpu_hog(per_core: float = 2.0, cores: Optional[int] = None) -> Iterator[List[subprocess.Popen]]:
    """Run round(per_core * cores) spinning processes for the duration of the block."""
    n = max(1, round(per_core * (cores or os.cpu_count() or 1)))
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN], preexec_fn=_preexec) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fftrainer_ds.testing.hog", description=__doc__.split("\n\n")[0])
    p.add_argument("--per-core", type=float, default=2.0, help="busy processes per CPU core")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... to run beside the hog")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give a command after --")
    with cpu_hog(args.per_core):
        return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
