"""Block quantizers: float32 rows -> GGML blocks, byte for byte what llama.cpp writes.

One table, `QUANTIZERS`, keyed by GGML type (the counterpart of `qcpu.kernels.REGISTRY`, which holds the
dequantizers). Every quantized type goes through one Numba kernel, made per type by `_rows_kernel`, that
runs rows in parallel and calls the type's block function on each block.

Reference: ggml/src/ggml-quants.c of the llama.cpp vendored by llama-cpp-python 0.3.36 —
quantize_row_{q4_0,q4_1,q5_0,q5_1,q8_0}_ref and quantize_row_q{2,3,4,5,6}_K_ref, which is what
`llama-quantize` runs when no importance matrix is given (quantize_q*_K(..., quant_weights=NULL)).
Exactness rules followed throughout:
  * every value is float32 and every operation is a single float32 operation in the C order of
    evaluation (`w*l*l` is `(w*l)*l`); Python ints and floats are float64 in Numba, so every constant
    and every integer that meets a float goes through `F(...)` first;
  * no fused multiply-add (ggml-base is built without FMA; Numba does not contract without fastmath);
  * `nearest_int` is ggml's add-1.5*2^23 trick (round half to even, with its exact out-of-range bits);
  * float16 stores round to nearest even (ggml's GGML_FP32_TO_FP16) and the K-quants re-read the stored
    half (GGML_FP16_TO_FP32) before using it, as the C code does (qcpu.kernels.halves' conversions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic, overload

from qcpu.errors import QcpuError
from qcpu.kernels import specialise
from qcpu.kernels.halves import bf16_bits, f16_to_f32, f32_to_f16, put_f16

F = np.float32
QK_K = 256
GROUP_MAX_EPS = F(1e-15)


# ----------------------------------------------------------------------------------------------------
# Scalar helpers: bit cast, nearest_int


@intrinsic
def _f32_bits(typingctx, x):
    """Reinterpret a float32's bits as uint32 (C's union pun)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(cache=True)
def nearest_int(fval):
    """ggml's nearest_int: the low 23 bits of (fval + 1.5*2^23) as float32, minus 2^22.

    Round half to even for |fval| <= 2^22; outside that, the same mantissa bits llama.cpp gets.
    """
    return np.int64(_f32_bits(fval + F(12582912.0)) & 0x7FFFFF) - 0x400000


@njit(cache=True)
def _clamp(v, lo, hi):
    return lo if v < lo else (hi if v > hi else v)


# ----------------------------------------------------------------------------------------------------
# Bit packing shared by several types


@njit(cache=True)
def _pack_nibbles(L, lo, y, o, n):
    """y[o + j] = L[lo + j] | L[lo + j + n] << 4 for j < n: the first n levels in the low nibbles, the
    next n in the high nibbles (Q4_0/Q4_1/Q5_x low bits; Q4_K/Q5_K per 64 weights)."""
    for j in range(n):
        y[o + j] = (L[lo + j] & 0xF) | ((L[lo + j + n] & 0xF) << 4)


@njit(cache=True)
def _pack_fifth_bits32(L, lo, y, o):
    """Q5_0/Q5_1 qh: bit j of a little-endian uint32 = bit 4 of level j (j < 32)."""
    qh = 0
    for j in range(32):
        qh |= ((L[lo + j] >> 4) & 1) << j
    for b in range(4):
        y[o + b] = (qh >> (8 * b)) & 0xFF


@njit(cache=True)
def _pack_crumbs(L, y, o):
    """Q2_K / Q3_K low 2 bits: per 128 weights, 32 bytes; byte l holds weights l, l+32, l+64, l+96 at bit
    offsets 0, 2, 4, 6.

        qs[32*h + l] = L[128h+l] | L[128h+l+32] << 2 | L[128h+l+64] << 4 | L[128h+l+96] << 6
    """
    for h in range(2):
        j = 128 * h
        for l in range(32):
            y[o + 32 * h + l] = ((L[j + l] & 3) | ((L[j + l + 32] & 3) << 2) | ((L[j + l + 64] & 3) << 4)
                                 | ((L[j + l + 96] & 3) << 6))


@njit(cache=True)
def _pack_scale_min_k4(ls, lm, y, o):
    """Eight 6-bit scales (ls) and mins (lm) of Q4_K / Q5_K into the 12 bytes y[o:o+12].

    Capital = scale, small = min; A..H are sub-blocks 0..7:
       0 EEAAAAAA    4 eeaaaaaa    8 eeeeEEEE
       1 FFBBBBBB    5 ffbbbbbb    9 ffffFFFF
       2 GGCCCCCC    6 ggcccccc   10 ggggGGGG
       3 HHDDDDDD    7 hhdddddd   11 hhhhHHHH
    """
    for j in range(4):
        y[o + j] = ls[j] | ((ls[j + 4] >> 4) << 6)
        y[o + j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6)
        y[o + j + 8] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)


@njit(cache=True)
def _get_scale_min_k4(j, y, o):
    """Inverse of _pack_scale_min_k4 for sub-block j (ggml's get_scale_min_k4)."""
    if j < 4:
        return np.int64(y[o + j]) & 63, np.int64(y[o + j + 4]) & 63
    a = np.int64(y[o + j + 4])
    return (a & 0xF) | ((np.int64(y[o + j - 4]) >> 6) << 4), (a >> 4) | ((np.int64(y[o + j]) >> 6) << 4)


# ----------------------------------------------------------------------------------------------------
# Legacy 32-weight blocks (quantize_row_q{4_0,4_1,5_0,5_1,8_0}_ref)


@njit(cache=True)
def _symmetric_levels(x, xo, L, nmax, top):
    """Q4_0 / Q5_0: d = (the value of largest magnitude) / -nmax; level = min(top, trunc(x/d + nmax + .5)).
    Returns d."""
    amax = F(0)
    vmax = F(0)
    for j in range(32):
        v = x[xo + j]
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    d = vmax / F(-nmax)
    idd = F(1) / d if d != 0 else F(0)
    bias = F(nmax) + F(0.5)
    for j in range(32):
        L[j] = min(top, np.int64(x[xo + j] * idd + bias))  # C: (int8_t) cast truncates toward zero
    return d


@njit(cache=True)
def _affine_levels(x, xo, L, top):
    """Q4_1 / Q5_1: d = (max - min) / top; level = min(top, trunc((x - min)/d + .5)). Returns (d, min)."""
    vmin = F(3.4028234663852886e38)
    vmax = F(-3.4028234663852886e38)
    for j in range(32):
        v = x[xo + j]
        if v < vmin:
            vmin = v
        if v > vmax:
            vmax = v
    d = (vmax - vmin) / F(top)
    idd = F(1) / d if d != 0 else F(0)
    for j in range(32):
        L[j] = min(top, np.int64((x[xo + j] - vmin) * idd + F(0.5)))
    return d, vmin


@njit(cache=True)
def _block_q4_0(x, xo, y, yo, s):
    # d:f16 @0 | qs[16] @2 (weights j and j+16 in the low / high nibble of byte j)
    L = s[0]
    d = _symmetric_levels(x, xo, L, 8, 15)
    put_f16(y, yo, f32_to_f16(d))
    _pack_nibbles(L, 0, y, yo + 2, 16)


@njit(cache=True)
def _block_q5_0(x, xo, y, yo, s):
    # d:f16 @0 | qh:u32 @2 (5th bit of each weight) | qs[16] @6
    L = s[0]
    d = _symmetric_levels(x, xo, L, 16, 31)
    put_f16(y, yo, f32_to_f16(d))
    _pack_fifth_bits32(L, 0, y, yo + 2)
    _pack_nibbles(L, 0, y, yo + 6, 16)


@njit(cache=True)
def _block_q4_1(x, xo, y, yo, s):
    # d:f16 @0 | m:f16 @2 | qs[16] @4
    L = s[0]
    d, m = _affine_levels(x, xo, L, 15)
    put_f16(y, yo, f32_to_f16(d))
    put_f16(y, yo + 2, f32_to_f16(m))
    _pack_nibbles(L, 0, y, yo + 4, 16)


@njit(cache=True)
def _block_q5_1(x, xo, y, yo, s):
    # d:f16 @0 | m:f16 @2 | qh:u32 @4 | qs[16] @8
    L = s[0]
    d, m = _affine_levels(x, xo, L, 31)
    put_f16(y, yo, f32_to_f16(d))
    put_f16(y, yo + 2, f32_to_f16(m))
    _pack_fifth_bits32(L, 0, y, yo + 4)
    _pack_nibbles(L, 0, y, yo + 8, 16)


@njit(cache=True)
def _block_q8_0(x, xo, y, yo, s):
    # d:f16 @0 | qs: int8[32] @2;  d = max|x| / 127, q = roundf(x / d) (half away from zero)
    amax = F(0)
    for j in range(32):
        v = abs(x[xo + j])
        amax = amax if amax > v else v
    d = amax / F(127)
    idd = F(1) / d if d != 0 else F(0)
    put_f16(y, yo, f32_to_f16(d))
    for j in range(32):
        v = x[xo + j] * idd
        r = math.floor(abs(np.float64(v)) + 0.5)  # exact: float32 + 0.5 fits a float64
        y[yo + 2 + j] = np.int64(-r if v < 0 else r) & 0xFF


# ----------------------------------------------------------------------------------------------------
# K-quant helpers (make_qkx2_quants, make_qx_quants, make_q3_quants)


@njit(cache=True)
def _make_qkx2_quants(n, nmax, x, xo, w, L, lo, Laux, rmin, rdelta, nstep, use_mad):
    """Levels 0..nmax with a scale and a min for x[xo:xo+n] under weights w, searching nstep+1 trial
    scales around nmax/(max - min) for the least weighted error (squared, or absolute if use_mad).
    Writes L[lo:lo+n]; returns (scale, -min)."""
    vmin = x[xo]
    vmax = x[xo]
    sum_w = w[0]
    sum_x = sum_w * x[xo]
    for i in range(1, n):
        xi = x[xo + i]
        if xi < vmin:
            vmin = xi
        if xi > vmax:
            vmax = xi
        wi = w[i]
        sum_w += wi
        sum_x += wi * xi
    if vmin > 0:
        vmin = F(0)
    if vmax == vmin:
        for i in range(n):
            L[lo + i] = 0
        return F(0), -vmin
    iscale = F(nmax) / (vmax - vmin)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        l = _clamp(nearest_int(iscale * (x[xo + i] - vmin)), 0, nmax)
        L[lo + i] = l
        diff = scale * F(l) + vmin - x[xo + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += w[i] * diff
    if nstep < 1:
        return scale, -vmin
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F(step) + F(nmax)) / (vmax - vmin)
        sum_l = F(0)
        sum_l2 = F(0)
        sum_xl = F(0)
        for i in range(n):
            l = _clamp(nearest_int(iscale * (x[xo + i] - vmin)), 0, nmax)
            Laux[i] = l
            fl = F(l)
            wi = w[i]
            sum_l += wi * fl
            sum_l2 += wi * fl * fl
            sum_xl += wi * fl * x[xo + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[xo + i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += w[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, -vmin


@njit(cache=True)
def _qx_sums(n, nmax, x, xo, iscale):
    """sum(w*x*l), sum(w*l*l) with w = x^2 and l = clamp(nearest_int(iscale*x), -nmax, nmax-1)."""
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        xi = x[xo + i]
        fl = F(_clamp(nearest_int(iscale * xi), -nmax, nmax - 1))
        w = xi * xi
        sumlx += w * xi * fl
        suml2 += w * fl * fl
    return sumlx, suml2


@njit(cache=True)
def _qx_levels(n, nmax, x, xo, iscale, L, lo):
    for i in range(n):
        L[lo + i] = nmax + _clamp(nearest_int(iscale * x[xo + i]), -nmax, nmax - 1)


@njit(cache=True)
def _signed_max(n, x, xo):
    """(the value of largest magnitude, its magnitude), first one wins."""
    vmax = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            vmax = x[xo + i]
    return vmax, amax


@njit(cache=True)
def _make_qx_quants(n, nmax, x, xo, L, lo):
    """make_qx_quants(..., rmse_type=1, qw=NULL): symmetric levels 0..2*nmax-1 (offset nmax), weights x^2,
    scale chosen among 19 trial inverse scales -(nmax + 0.1*is)/max. Writes L[lo:lo+n]; returns scale."""
    vmax, amax = _signed_max(n, x, xo)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return F(0)
    iscale = F(-nmax) / vmax
    _qx_levels(n, nmax, x, xo, iscale, L, lo)
    sumlx, suml2 = _qx_sums(n, nmax, x, xo, iscale)
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / vmax
        sumlx, suml2 = _qx_sums(n, nmax, x, xo, iscale)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            _qx_levels(n, nmax, x, xo, iscale, L, lo)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def _make_q3_quants(n, nmax, x, xo, L, lo):
    """make_q3_quants(..., do_rmse=true): symmetric levels, then up to 5 passes moving single levels
    while that improves the x^2-weighted fit. Writes L[lo:lo+n] (offset nmax); returns scale."""
    vmax, amax = _signed_max(n, x, xo)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return F(0)
    iscale = F(-nmax) / vmax
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        xi = x[xo + i]
        l = _clamp(nearest_int(iscale * xi), -nmax, nmax - 1)
        L[lo + i] = l
        w = xi * xi
        sumlx += w * xi * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            xi = x[xo + i]
            w = xi * xi
            li = F(L[lo + i])
            slx = sumlx - w * xi * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                new_l = _clamp(nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                if new_l != L[lo + i]:
                    fnew = F(new_l)
                    slx += w * xi * fnew
                    sl2 += w * fnew * fnew
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[lo + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[lo + i] += nmax
    return sumlx / suml2 if suml2 > 0 else F(0)


# ----------------------------------------------------------------------------------------------------
# K-quant super-blocks of 256 weights (quantize_row_q*_K_ref)


@njit(cache=True)
def _k_scale_min_levels(x, xo, y, yo, L, Laux, w, scales, mins, nmax, rmin, nstep):
    """Q4_K / Q5_K shared part: 8 sub-blocks of 32 with a 6-bit scale and min each.

    Writes d @yo, dmin @yo+2, the 12 scale/min bytes @yo+4, and the final levels 0..nmax into L."""
    max_scale = F(0)
    max_min = F(0)
    for j in range(8):
        o = xo + 32 * j
        sum_x2 = F(0)
        for l in range(32):
            sum_x2 += x[o + l] * x[o + l]
        av_x = np.sqrt(sum_x2 / F(32))
        for l in range(32):
            w[l] = av_x + abs(x[o + l])
        scales[j], mins[j] = _make_qkx2_quants(32, nmax, x, o, w, L, 32 * j, Laux, rmin, F(0.1), nstep, False)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    ls = Laux[0:8]  # Laux is free again: reuse it for the 6-bit scales and mins
    lm = Laux[8:16]
    for j in range(8):
        ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # C stores it in a uint8_t first
        lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    _pack_scale_min_k4(ls, lm, y, yo + 4)
    dh = f32_to_f16(max_scale / F(63))
    mh = f32_to_f16(max_min / F(63))
    put_f16(y, yo, dh)
    put_f16(y, yo + 2, mh)
    for j in range(8):
        sc, m = _get_scale_min_k4(j, y, yo + 4)
        d = f16_to_f32(dh) * F(sc)
        if d == 0:
            continue
        dm = f16_to_f32(mh) * F(m)
        for i in range(32):
            L[32 * j + i] = _clamp(nearest_int((x[xo + 32 * j + i] + dm) / d), 0, nmax)


@njit(cache=True)
def _block_q4_K(x, xo, y, yo, s):
    # d:f16 @0 | dmin:f16 @2 | scales[12] @4 | qs[128] @16 (per 64 weights: 32 bytes, low nibble = first 32)
    L, Laux, w, scales, mins = s
    _k_scale_min_levels(x, xo, y, yo, L, Laux, w, scales, mins, 15, F(-1.0), 20)
    for h in range(4):
        _pack_nibbles(L, 64 * h, y, yo + 16 + 32 * h, 32)


@njit(cache=True)
def _block_q5_K(x, xo, y, yo, s):
    # d:f16 @0 | dmin:f16 @2 | scales[12] @4 | qh[32] @16 | qs[128] @48
    # qh[j] bit 2h / 2h+1 = 5th bit of weight 64h+j / 64h+32+j; qs as Q4_K with the low 4 bits.
    L, Laux, w, scales, mins = s
    _k_scale_min_levels(x, xo, y, yo, L, Laux, w, scales, mins, 31, F(-0.5), 15)
    for j in range(32):
        qh = 0
        for h in range(4):
            qh |= ((L[64 * h + j] >> 4) & 1) << (2 * h)
            qh |= ((L[64 * h + 32 + j] >> 4) & 1) << (2 * h + 1)
        y[yo + 16 + j] = qh
    for h in range(4):
        _pack_nibbles(L, 64 * h, y, yo + 48 + 32 * h, 32)


@njit(cache=True)
def _block_q6_K(x, xo, y, yo, s):
    # ql[128] @0 | qh[64] @128 | scales: int8[16] @192 | d:f16 @208
    # Per 128 weights (h): ql[64h + l] = low4(w l) | low4(w l+64) << 4, ql[64h + 32 + l] = low4(l+32) |
    # low4(l+96) << 4, qh[32h + l] = high2 of weights l, l+32, l+64, l+96 at bits 0, 2, 4, 6.
    L, _, _, scales, _ = s
    max_scale = F(0)
    max_abs_scale = F(0)
    for ib in range(16):
        scale = _make_qx_quants(16, 32, x, xo + 16 * ib, L, 16 * ib)
        scales[ib] = scale
        if abs(scale) > max_abs_scale:
            max_abs_scale = abs(scale)
            max_scale = scale
    if max_abs_scale < GROUP_MAX_EPS:
        for b in range(210):
            y[yo + b] = 0
        return
    iscale = F(-128) / max_scale
    dh = f32_to_f16(F(1) / iscale)
    put_f16(y, yo + 208, dh)
    for ib in range(16):
        y[yo + 192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(16):
        sc = np.int64(y[yo + 192 + j])
        d = f16_to_f32(dh) * F(sc - 256 if sc > 127 else sc)
        if d == 0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(nearest_int(x[xo + 16 * j + i] / d), -32, 31) + 32
    for h in range(2):
        j = 128 * h
        for l in range(32):
            y[yo + 64 * h + l] = (L[j + l] & 0xF) | ((L[j + l + 64] & 0xF) << 4)
            y[yo + 64 * h + 32 + l] = (L[j + l + 32] & 0xF) | ((L[j + l + 96] & 0xF) << 4)
            y[yo + 128 + 32 * h + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                                        | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6))


@njit(cache=True)
def _block_q3_K(x, xo, y, yo, s):
    # hmask[32] @0 | qs[64] @32 | scales[12] @96 | d:f16 @108
    # 16 signed 6-bit scales (+32): low 4 bits of scale j in byte j%8 (low nibble for j < 8, high for
    # j >= 8), top 2 bits in byte 8 + j%4 at bit 2*(j//4). Levels 0..7: bit 2 in hmask (weight j ->
    # byte j%32, bit j//32), bits 0-1 packed as Q2_K's qs.
    L, _, _, scales, _ = s
    max_scale = F(0)
    amax = F(0)
    for j in range(16):
        scales[j] = _make_q3_quants(16, 4, x, xo + 16 * j, L, 16 * j)
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    so = yo + 96
    for b in range(12):
        y[so + b] = 0
    if max_scale != 0:
        iscale = F(-32) / max_scale
        for j in range(16):
            l = nearest_int(iscale * scales[j])
            l = ((l + 128) & 0xFF) - 128  # C stores it in an int8_t first
            l = _clamp(l, -32, 31) + 32
            if j < 8:
                y[so + j] = l & 0xF
            else:
                y[so + j - 8] |= (l & 0xF) << 4
            y[so + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
        dh = f32_to_f16(F(1) / iscale)
    else:
        dh = f32_to_f16(F(0))
    put_f16(y, yo + 108, dh)
    for j in range(16):
        lo4 = (np.int64(y[so + j]) & 0xF) if j < 8 else (np.int64(y[so + j - 8]) >> 4)
        sc = (lo4 | (((np.int64(y[so + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = f16_to_f32(dh) * F(sc)
        if d == 0:
            continue
        for i in range(16):
            L[16 * j + i] = _clamp(nearest_int(x[xo + 16 * j + i] / d), -4, 3) + 4
    for b in range(32):
        y[yo + b] = 0
    for j in range(256):
        if L[j] > 3:
            y[yo + j % 32] |= 1 << (j // 32)
            L[j] -= 4
    _pack_crumbs(L, y, yo + 32)


@njit(cache=True)
def _block_q2_K(x, xo, y, yo, s):
    # scales[16] @0 (low nibble: scale, high nibble: min) | qs[64] @16 | d:f16 @80 | dmin:f16 @82
    L, Laux, w, scales, mins = s
    max_scale = F(0)
    max_min = F(0)
    for j in range(16):
        o = xo + 16 * j
        for l in range(16):
            w[l] = abs(x[o + l])
        scales[j], mins[j] = _make_qkx2_quants(16, 3, x, o, w, L, 16 * j, Laux, F(-0.5), F(0.1), 15, True)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    if max_scale > 0:
        iscale = F(15) / max_scale
        for j in range(16):
            y[yo + j] = nearest_int(iscale * scales[j]) & 0xFF
        dh = f32_to_f16(max_scale / F(15))
    else:
        for j in range(16):
            y[yo + j] = 0
        dh = f32_to_f16(F(0))
    if max_min > 0:
        iscale = F(15) / max_min
        for j in range(16):
            y[yo + j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
        mh = f32_to_f16(max_min / F(15))
    else:
        mh = f32_to_f16(F(0))
    put_f16(y, yo + 80, dh)
    put_f16(y, yo + 82, mh)
    for j in range(16):
        sm = np.int64(y[yo + j])
        d = f16_to_f32(dh) * F(sm & 0xF)
        if d == 0:
            continue
        dm = f16_to_f32(mh) * F(sm >> 4)
        for i in range(16):
            L[16 * j + i] = _clamp(nearest_int((x[xo + 16 * j + i] + dm) / d), 0, 3)
    _pack_crumbs(L, y, yo + 16)


# ----------------------------------------------------------------------------------------------------
# The one driver, specialised per type


_BLOCKS = {T.Q4_0: _block_q4_0, T.Q4_1: _block_q4_1, T.Q5_0: _block_q5_0, T.Q5_1: _block_q5_1,
           T.Q8_0: _block_q8_0, T.Q2_K: _block_q2_K, T.Q3_K: _block_q3_K, T.Q4_K: _block_q4_K,
           T.Q5_K: _block_q5_K, T.Q6_K: _block_q6_K}


def _block(kind, x, xo, y, yo, s):
    """Quantize one block x[xo:] into y[yo:] as GGML type `kind`, with scratch s. Only callable from
    Numba code with a constant kind: the overload resolves it to _BLOCKS[kind] at compile time."""
    raise NotImplementedError


@overload(_block, prefer_literal=True)
def _block_of_kind(kind, x, xo, y, yo, s):
    if isinstance(kind, types.IntegerLiteral):
        fn = _BLOCKS[kind.literal_value]
        return lambda kind, x, xo, y, yo, s: fn(x, xo, y, yo, s)
    return None


def _rows_kernel(ggml_type: T):
    """The jitted quantize_rows(x, out, n_tasks), parallel and serial: x float32[rows, cols] -> out
    uint8[rows, cols/block*type_size] as ggml_type. Rows are split into n_tasks contiguous runs (done in
    parallel by the first); each run allocates its scratch (levels and per-sub-block values) once."""
    kind = int(ggml_type)
    block, type_size = GGML_QUANT_SIZES[ggml_type]

    def quantize_rows(x, out, n_tasks):
        rows, cols = x.shape
        nb = cols // block
        per = (rows + n_tasks - 1) // n_tasks
        for task in prange(n_tasks):
            s = (np.zeros(256, np.int64), np.zeros(32, np.int64), np.zeros(32, np.float32),
                 np.zeros(16, np.float32), np.zeros(16, np.float32))
            for r in range(task * per, min(rows, (task + 1) * per)):
                xr, yr = x[r], out[r]
                for b in range(nb):
                    _block(kind, xr, b * block, yr, b * type_size, s)

    name = f"quantize_rows_{ggml_type.name.lower()}"
    return specialise(quantize_rows, name, parallel=True), specialise(quantize_rows, name + "_serial")


# ----------------------------------------------------------------------------------------------------
# Float "quantizers" (the float output types of convert / quantize)


def _to_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def _to_f16(x: np.ndarray) -> np.ndarray:
    # numpy's float32 -> float16 rounds to nearest even, as ggml_fp32_to_fp16 does.
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint8)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return bf16_bits(x.reshape(-1)).view(np.uint8).reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Quantizer:
    ggml_type: T
    quantize_rows: Callable[[np.ndarray], np.ndarray]  # float32[rows, cols] -> uint8[rows, row_bytes]

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size


QUANTIZERS: dict[T, Quantizer] = {}


def _register(ggml_type: T, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    QUANTIZERS[ggml_type] = Quantizer(ggml_type, fn)


# Fewer values than this are quantized on the calling thread: a decode step's KV cache rows (a few
# hundred values per layer) took ~0.1-0.3 ms per layer through a parallel region, mostly waking threads.
SERIAL_VALUES = 1 << 14


def _block_quantizer(ggml_type: T) -> Callable[[np.ndarray], np.ndarray]:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    parallel, serial = _rows_kernel(ggml_type)

    def quantize_rows(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], x.shape[1] // block * type_size), dtype=np.uint8)
        if x.size < SERIAL_VALUES:
            serial(x, out, 1)
        else:
            parallel(x, out, max(1, min(x.shape[0], 4 * numba.get_num_threads())))
        return out

    return quantize_rows


for _t in _BLOCKS:
    _register(_t, _block_quantizer(_t))
_register(T.F32, _to_f32)
_register(T.F16, _to_f16)
_register(T.BF16, _to_bf16)


def quantizer_for(ggml_type: int) -> Quantizer:
    try:
        return QUANTIZERS[T(ggml_type)]
    except (KeyError, ValueError):
        supported = ", ".join(t.name for t in QUANTIZERS)
        raise QcpuError(f"cannot quantize to type id {ggml_type} (supported: {supported})") from None


def quantize(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32[rows, cols] (or [cols]) -> uint8[rows, row_bytes] in the given GGML type."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    q = quantizer_for(ggml_type)
    if x.shape[-1] % q.block_size:
        raise QcpuError(f"rows of {x.shape[-1]} values are not a whole number of {T(ggml_type).name} blocks "
                        f"({q.block_size})")
    return q.quantize_rows(x.reshape(-1, x.shape[-1]))
