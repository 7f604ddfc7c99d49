"""The one loader of the native module `fftrainer_ds._C` (csrc/, built by setup.py).

The module is optional: a source checkout that was never built, or a machine whose build broke,
still runs on the pure-torch reference. Callers that can do without it ask `load_cuda()` (None
when unusable); callers that cannot ask `load()` and get the original ImportError.
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional


@functools.lru_cache(maxsize=None)
def _import() -> ModuleType:
    # Imported here, not at module level: importing fftrainer_ds.ops must not fail on a machine
    # without the build. lru_cache does not cache exceptions, so a failed import is retried on the
    # next call (and a test that hides the module from sys.modules sees the failure).
    from fftrainer_ds import _C  # noqa: WPS433

    return _C


def load() -> ModuleType:
    """The native module; raises ImportError (with the loader's cause) when it is not built or loadable."""
    return _import()


def load_cuda() -> Optional[ModuleType]:
    """The native module when it was built with the CUDA kernels, else None (also when it is not built)."""
    try:
        mod = load()
    except ImportError:
        return None
    return mod if mod.has_cuda() else None
