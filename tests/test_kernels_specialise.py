"""Kernel entry points and quantizers made by factories (qcpu.kernels.specialise) stay cached across
processes: Numba's cache key hashes a closure's captured values, so they must pickle the same in every
process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from qcpu.kernels import specialise

# Calls every registered kernel and block quantizer once on a tiny input (compiling or loading each from
# Numba's cache).
_CALL_ALL = """
import numpy as np
from gguf import GGML_QUANT_SIZES
from qcpu.kernels import REGISTRY
from quant.quantizers import QUANTIZERS
for t, k in REGISTRY.items():
    block, size = GGML_QUANT_SIZES[t]
    w = np.zeros((3, 256 // block * size), np.uint8)
    k.dequantize(w, np.empty((3, 256), np.float32))
    k.matvec(w, np.ones(256, np.float32), np.empty(3, np.float32))
for q in QUANTIZERS.values():
    q.quantize_rows(np.ones((3, 256), np.float32))
"""


def test_second_start_compiles_nothing():
    env = {**os.environ, "NUMBA_DEBUG_CACHE": "1"}
    runs = [subprocess.run([sys.executable, "-c", _CALL_ALL], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    log = runs[1].stdout + runs[1].stderr
    assert "data loaded" in log
    assert "data saved" not in log, [line for line in log.splitlines() if "saved" in line]


# A kernel in gemm.py that inlines a function of kernels/__init__.py (check_rows).
_CALL_CHECK_SHAPES = """
import numpy as np
from qcpu.kernels import gemm
gemm.check_shapes(np.zeros((2, 144), np.uint8), np.zeros((1, 256), np.float32), np.zeros((1, 2), np.float32), 256, 144)
"""


def test_editing_a_module_recompiles_the_kernels_that_inline_it(tmp_path):
    # Numba alone stamps a cached function with its own file: this edit would leave gemm.check_shapes
    # running the old check_rows (qcpu.jit_cache).
    root = Path(__file__).resolve().parents[1]
    for package in ("qcpu", "quant"):
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "NUMBA_DEBUG_CACHE": "1", "PYTHONPATH": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)

    def saved():
        run = subprocess.run([sys.executable, "-c", _CALL_CHECK_SHAPES], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
        log = run.stdout + run.stderr
        assert str(tmp_path / "qcpu") in log, log  # the copy ran, not the installed package
        return [line for line in log.splitlines() if "data saved" in line and "gemm.check_shapes" in line]

    assert saved()  # compiled
    assert not saved()  # loaded
    with open(tmp_path / "qcpu" / "kernels" / "__init__.py", "a") as f:
        f.write("\n# edited\n")
    assert saved()  # compiled again


def test_specialise_rejects_captured_jitted_functions():
    helper = numba.njit(lambda v: v + 1)

    def make():
        def f(v):
            return helper(v)
        return f

    with pytest.raises(TypeError, match="plain constants"):
        specialise(make(), "f_with_helper")


def test_specialise_reads_captured_constants():
    def make(k):
        def f(v):
            return v * k if k > 1 else v
        return f

    f2, f3 = specialise(make(2), "test_times_2"), specialise(make(3), "test_times_3")
    assert (f2(np.float32(4.0)), f3(np.float32(4.0))) == (8.0, 12.0)
    assert f2.__name__ == "test_times_2"
