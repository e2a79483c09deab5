"""fp16 / bf16 conversions (qcpu.kernels.halves): exact against numpy's float16 and ggml's bf16 rule, on
every half and on the float32 values where rounding decides."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import types
from numba.extending import intrinsic

from qcpu.kernels import halves

ALL_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _each(fn, dtype):
    """fn (a scalar Numba function) applied to every element of a 1-D array, in Numba."""
    @numba.njit
    def run(a):
        out = np.empty(a.shape[0], dtype)
        for i in range(a.shape[0]):
            out[i] = fn(a[i])
        return out

    return run


_decode, _encode = _each(halves.f16_to_f32, np.float32), _each(halves.f32_to_f16, np.uint16)


def test_f16_decode_all_65536_patterns():
    h = ALL_HALVES
    assert np.array_equal(_decode(h).view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))


def test_f16_row_conversion_both_paths():
    h = ALL_HALVES
    want = h.view(np.float16).astype(np.float32).view(np.uint32)
    got = np.empty(h.size, np.float32)
    halves._halves_to_f32_portable(h, got)
    assert np.array_equal(got.view(np.uint32), want)
    if halves.F16C:
        conv = halves._halves_to_f32_f16c

        @numba.njit
        def run(src, dst):
            conv(src, dst)

        for n in (h.size, 13):  # the 8-wide body and the scalar tail
            got = np.zeros(n, np.float32)
            run(h[-n:], got)
            # vcvtph2ps quiets signalling NaNs; every other pattern must match exactly
            keep = ~np.isnan(h[-n:].view(np.float16))
            assert np.array_equal(got.view(np.uint32)[keep], want[-n:][keep])
            assert np.isnan(got[~keep]).all()


@numba.njit
def _decode_f16_at(bits):
    out = np.empty(bits.shape[0] // 2, np.float32)
    for i in range(out.shape[0]):
        out[i] = halves.f16_at(bits, 2 * i)
    return out


def _decode_ir(f16c):
    @intrinsic
    def half_at(typingctx, row, o):
        def codegen(context, b, signature, args):
            base = context.make_array(signature.args[0])(context, b, args[0]).data
            return halves.ir_half_at(b, base, args[1], f16c)

        return types.float32(row, o), codegen

    @numba.njit
    def decode(bits):
        out = np.empty(bits.shape[0] // 2, np.float32)
        for i in range(out.shape[0]):
            out[i] = half_at(bits, 2 * i)
        return out

    return decode


@pytest.mark.parametrize("decode", [_decode_f16_at, _decode_ir(halves.F16C), _decode_ir(False)],
                         ids=["numba-bytes", "ir-native", "ir-portable"])
def test_f16_decode_from_bytes(decode):
    ours = decode(ALL_HALVES.view(np.uint8))
    ref = ALL_HALVES.view(np.float16).astype(np.float32)
    finite = np.isfinite(ref)
    assert np.array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))  # incl. -0, subnormals
    assert np.array_equal(np.isnan(ours), np.isnan(ref)) and np.array_equal(ours[np.isinf(ref)], ref[np.isinf(ref)])


def test_f16_encode_rounds_like_numpy():
    rng = np.random.default_rng(1)
    h = ALL_HALVES.view(np.float16)
    fin = np.sort(h[np.isfinite(h)].astype(np.float64))
    mids = ((fin[1:] + fin[:-1]) / 2).astype(np.float32)  # exact ties: round-half-even decides
    f = np.concatenate([
        mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        fin.astype(np.float32),
        (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32),
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # any bits
        np.array([np.inf, -np.inf, 65504.0, 65519.99, 65520.0, -65520.0, 1e-30, -0.0, 3e38, 2.0**-24, 2.0**-25,
                  3 * 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11], np.float32),
    ])
    f = f[~np.isnan(f)]
    with np.errstate(over="ignore"):
        want = f.astype(np.float16).view(np.uint16)
    assert np.array_equal(_encode(f), want)
    assert (_encode(np.array([np.nan, -np.nan], np.float32)) & 0x7FFF == 0x7E00).all()  # quiet NaN


def _bf16_reference(x):
    """ggml_compute_fp32_to_bf16 in NumPy: round half to even on the top 16 bits; NaN forced quiet."""
    n = x.view(np.uint32)
    rounded = ((n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where((n & 0x7FFFFFFF) > 0x7F800000, ((n >> 16) | 64).astype(np.uint16), rounded)


def test_bf16_round_trip():
    rng = np.random.default_rng(2)
    x = np.concatenate([
        rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # NaNs included
        (ALL_HALVES.astype(np.uint32) << 16).view(np.float32),  # every bf16 value exactly
        ((ALL_HALVES.astype(np.uint32) << 16) | 0x8000).view(np.float32),  # every tie
    ])
    bits = halves.bf16_bits(x)
    assert np.array_equal(bits, _bf16_reference(x))
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    finite = ~np.isnan(x)
    assert np.array_equal(halves.rounded(x[finite], True).view(np.uint32), back[finite].view(np.uint32))


def test_rounded_to_f16_is_numpy_round_trip():
    x = np.random.default_rng(3).standard_normal(10_000).astype(np.float32) * 300
    assert np.array_equal(halves.rounded(x, False), x.astype(np.float16).astype(np.float32))
