"""Dense ops (qcpu/ops.py) against float64 NumPy."""

from __future__ import annotations

import numpy as np
from numba import njit

from qcpu.ops import _expf, rms_norm, swiglu


def _ref_swiglu(g, u):
    g = g.astype(np.float64)
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g)) * u.astype(np.float64)


def test_swiglu_matches_float64_over_the_whole_range():
    """Every kind of input: the normal range, both ends where exp over/underflows (ggml's expf switches
    to its scaled path past |n| > 126 and saturates past 192), zeros, tiny values. ggml's expf is within
    ~1.5 ulp, the division and product add one rounding each: 4 float32 ulps of the result bound it.
    Below about x = -88, exp(-x) overflows float32 and the result is 0 where float64 keeps ~1e-37: the
    absolute floor 1e-35 allows that (numpy's float32 does the same)."""
    rng = np.random.default_rng(0)
    g = np.concatenate([
        np.array([0.0, -0.0, 1e-30, -1e-30, 87.3, 88.7, -87.3, -88.7, -103.9, -150, -200, 89, 100]),
        rng.standard_normal(200_000) * 6,
        rng.uniform(-110, 100, 200_000),
    ]).astype(np.float32)
    g = g[:len(g) // 13 * 13].reshape(-1, 13)  # rows of one 8-value vector and a scalar tail of 5
    u = rng.standard_normal(g.shape).astype(np.float32)
    got = swiglu(g, u)
    ref = _ref_swiglu(g, u)
    assert np.isfinite(got).all()
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert (np.abs(got - ref) <= 4 * ulp + 1e-35).all()


def test_swiglu_shapes_and_rows():
    """[n, ffn] in, [n, ffn] out, rows independent (prange), odd lengths (4 vectors and a tail of 5)."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((5, 37)).astype(np.float32)
    u = rng.standard_normal((5, 37)).astype(np.float32)
    whole = swiglu(g, u)
    assert whole.shape == (5, 37) and whole.dtype == np.float32
    for r in range(5):
        assert np.array_equal(swiglu(g[r:r + 1], u[r:r + 1])[0], whole[r])
    assert np.allclose(whole, _ref_swiglu(g, u), rtol=1e-6, atol=0)


@njit(cache=True)
def _scalar_swiglu(g, u):
    out = np.empty_like(g)
    for r in range(g.shape[0]):
        for i in range(g.shape[1]):
            x = g[r, i]
            out[r, i] = x / (np.float32(1.0) + _expf(-x)) * u[r, i]
    return out


def test_swiglu_vectors_are_the_scalar_expf_bit_for_bit():
    """The vector IR (ggml_v_expf's AVX2 blend of both range ends) against ops._expf one value at a time,
    on the serial and the parallel path: the same bits everywhere, infinities, NaN, zeros, subnormals and
    both range ends included."""
    rng = np.random.default_rng(5)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 87.0, -87.0, 88.7, -88.7, 89.0,
                        -89.0, 103.9, -103.9, 130.0, -130.0, 200.0, -200.0, 1e30, -1e30], np.float32)
    g = np.concatenate([special, rng.standard_normal(40_000) * 8, rng.uniform(-220, 220, 40_000)]).astype(np.float32)
    for cols, rows in ((8 * 61 + 3, 60), (8 * 4096, 2)):  # within SERIAL_VALUES, then past it (the prange)
        gg = g[:rows * cols].reshape(rows, cols)
        u = rng.standard_normal(gg.shape).astype(np.float32)
        got, want = swiglu(gg, u), _scalar_swiglu(gg, u)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_rms_norm_matches_float64():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, 896)) * 3).astype(np.float32)
    w = rng.standard_normal(896).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-6) * w
    assert np.allclose(rms_norm(x, w, 1e-6), ref, rtol=1e-6, atol=1e-6)
