"""The activation side of llama.cpp's products, for the paths that multiply in float.

llama.cpp multiplies every weight by activations converted to the weight type's `vec_dot_type` (Q8_0
blocks for the legacy types, Q8_K for the K-quants, fp16 for F16...). The matvecs and the integer GEMM
(gemm.py) quantize and dot in integers; the paths that hand float arrays to BLAS (the float weight types'
batched products, prefill attention's q) round the activations the same way first (quantize, then
dequantize): real-number-equal to the integer dot, so their results track llama.cpp's too.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from qcpu.kernels.k_quants import QK_K, quantize_q8_K
from qcpu.kernels.legacy import QK, quantize_q8_0


@njit(parallel=True, cache=True)
def _round_q8_0(x, out):
    for r in prange(x.shape[0]):
        qs, d = quantize_q8_0(x[r])
        for b in range(d.shape[0]):
            for j in range(QK):
                out[r, b * QK + j] = np.float32(qs[b * QK + j]) * d[b]


@njit(parallel=True, cache=True)
def _round_q8_K(x, out):
    n_blocks = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        qs = np.empty(x.shape[1], np.int8)
        d = np.empty(n_blocks, np.float32)
        bsums = np.empty(n_blocks * 16, np.int16)
        quantize_q8_K(x[r], qs, d, bsums)
        for b in range(n_blocks):
            for j in range(QK_K):
                out[r, b * QK_K + j] = np.float32(qs[b * QK_K + j]) * d[b]


def _rounder(kernel):
    def round_rows(x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        kernel(np.ascontiguousarray(x, dtype=np.float32), out)
        return out
    return round_rows


def _round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


_Q8_0, _Q8_K = _rounder(_round_q8_0), _rounder(_round_q8_K)

# GGML weight type -> rounding of activations to its vec_dot_type (ggml-cpu.c's type_traits_cpu).
# Q4_1/Q5_1 use Q8_1, whose quants and scales are Q8_0's (plus a block sum), so the values agree.
ACTIVATION_ROUNDING = {
    T.F32: None, T.F16: _round_f16, T.BF16: _round_bf16,
    T.Q4_0: _Q8_0, T.Q4_1: _Q8_0, T.Q5_0: _Q8_0, T.Q5_1: _Q8_0, T.Q8_0: _Q8_0,
    T.Q2_K: _Q8_K, T.Q3_K: _Q8_K, T.Q4_K: _Q8_K, T.Q5_K: _Q8_K, T.Q6_K: _Q8_K,
}
