"""Kernel entry points and quantizers made by factories (qcpu.kernels.specialise) stay cached across
processes: Numba's cache key hashes a closure's captured values, so they must pickle the same in every
process."""

from __future__ import annotations

import os
import subprocess
import sys

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
