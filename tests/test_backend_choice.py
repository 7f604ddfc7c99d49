"""Backend selection: auto falls back and says so; an explicit native request without the module fails loudly."""
import logging
import subprocess
import sys

import pytest
import torch

from fftrainer_ds import ops
from fftrainer_ds.ops import native, reference

# A child interpreter where the native module cannot be imported (as on a machine that never built it).
_NO_NATIVE = "import sys; sys.modules['fftrainer_ds._C'] = None\n"


def _run(code):
    return subprocess.run([sys.executable, "-c", _NO_NATIVE + code], capture_output=True, text=True, timeout=120)


def test_explicit_native_without_module_raises_with_cause():
    r = _run("from fftrainer_ds import ops\n"
             "try:\n    ops.get_backend('native')\nexcept ImportError as e:\n"
             "    print('ERR', e, '| cause:', type(e.__cause__).__name__)\n")
    assert "ERR fast_failover.snapshot_backend='native' but fftrainer_ds._C is not built" in r.stdout
    assert "cause: ModuleNotFoundError" in r.stdout  # the original import error is chained


def test_auto_without_module_falls_back_to_reference_and_logs_it():
    r = _run("import logging; logging.basicConfig(level=logging.INFO)\n"
             "from fftrainer_ds import ops\nprint('BACKEND', ops.get_backend('auto').name)\n")
    assert "BACKEND reference" in r.stdout
    assert "native module unavailable" in r.stderr and "snapshot pack backend = reference" in r.stderr


def test_auto_with_module_is_native_and_logged(caplog):
    ops._cache.clear()
    with caplog.at_level(logging.INFO, logger="fftrainer_ds"):
        assert ops.get_backend("auto").name.startswith("native")
    assert "snapshot pack backend = native" in caplog.text


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="'auto', 'native', 'triton', 'reference'"):
        ops.get_backend("gpu")


def test_native_and_reference_agree_on_a_real_layout():
    srcs = [torch.randn(1001), torch.tensor(7, dtype=torch.int64), torch.randint(0, 255, (13,), dtype=torch.uint8)]
    offs = [0, 4032, 4096]
    a, b = torch.zeros(4160, dtype=torch.uint8), torch.zeros(4160, dtype=torch.uint8)
    assert ops.get_backend("native").pack(a, srcs, offs) == ops.get_backend("reference").pack(b, srcs, offs)
    assert torch.equal(a, b)


def test_native_module_imports_before_torch():
    """A fresh interpreter whose first import is the native module: the build must find and load torch itself."""
    try:
        native.load()
    except ImportError as exc:
        pytest.skip(f"fftrainer_ds._C not built: {exc}")
    data = torch.arange(37, dtype=torch.uint8)
    code = ("import fftrainer_ds._C as C\n"
            "import torch\n"
            "print('SUM', C.checksum(torch.arange(37, dtype=torch.uint8)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"SUM {reference.checksum(data)}" in r.stdout
