"""Integer GEMM for batched products (prefill): weight tiles interleaved 8 rows at a time, int8 dots.

A batched product y[n, rows] = x[n, cols] @ W.T runs as llama.cpp's quantized products do, not through
float BLAS: x is quantized once to the weight type's vec_dot_type (Q8_0 / Q8_1 blocks of 32), and every
(row, token, block) contributes (d_w * d_x) * sum_k(q_k * xq_k) with the block sum an exact int32, as the
decode matvec does. What changes is the order of the work, so each weight byte loaded serves many tokens:

  Tile: a family's `pack` unpacks a tile of weight rows (L2-sized, per thread) into groups of 8 rows,
  interleaved 4 weights at a time (the layout of llama.cpp's repack.cpp, block_q4_0x8, with an interleave
  of 4: one 32-byte vector holds weights 4g..4g+3 of each of the 8 rows):

      group, block b:  q   uint8[256]   byte 32g + 4r + i = weight (32b + 4g + i) of row r
                                         (g = 0..7, r = 0..7, i = 0..3; nibble types unsigned, Q8_0 signed)
                       d   float32[8]    row r's block scale;  m  float32[8]  row r's block min (*_1 types)

  Micro-kernel (`_gemm_tile`): RG groups x RN tokens at a time. For each 4-weight step g, the 4 activation
  bytes of a token are broadcast to all 8 lanes, so one multiply-add of the group's vector with it yields
  8 rows' partial dots (x86 AVX2: pmaddubsw, summed in int16 while that cannot overflow, then pmaddwd by
  ones into int32). After 8 steps lane r holds row r's exact block dot; it is converted, multiplied by
  d_w * d_x and accumulated in float32, one block after the other. No horizontal sums.

Every output element is computed the same way whatever the tile, the batch or the thread count, so
prefill logits no longer depend on a BLAS tile size.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels import literal_values
from qcpu.kernels.halves import f16_to_f32, f32_to_f16
from qcpu.kernels.llvm_ir import (
    _F32,
    _I8,
    _I16,
    _I32,
    _I64,
    _call,
    _contract,
    _lanes,
    _load,
    _splat,
    _vec,
)

QK = 32  # weights per block (the legacy types; the interleaved layout's unit)
ROWS = 8  # rows per interleaved group
GROUP_BLOCK_BYTES = ROWS * QK  # one group's quants for one block
RG, RN = 1, 4  # micro-kernel: groups (of 8 rows) x tokens per call (measured best of 1..4 x 1..8 on AVX2)
TILE_BYTES = 256 * 1024  # a thread's packed tile: fits a 512 KiB L2 with the activations beside it


CHUNK_BYTES = 48 * 1024  # activations of the tokens a group sweeps before the next group: L1/L2-resident


@njit(cache=True)
def token_chunk(cols):
    """Tokens per sweep: a multiple of RN with at most CHUNK_BYTES of int8 activations (at least 4*RN)."""
    return max(4 * RN, CHUNK_BYTES // max(cols, 1) // RN * RN)


@njit(cache=True)
def tile_rows(cols):
    """Rows per packed tile for rows of `cols` weights: a multiple of RG*8, at most TILE_BYTES of int8
    quants, between 16 and 64 (enough tiles for every thread on the 128-row K/V projections)."""
    unit = RG * ROWS
    return max(unit, min(64, TILE_BYTES // max(cols, 1) // unit * unit))


# ---- activations: quantized once per product -------------------------------------------------------


@njit(cache=True, inline="always")
def quantize_rows(x, t, xq, xd, xc, xs, offset):
    """Quantize x[t] into llama.cpp's Q8_0 / Q8_1 (x86 quantize_row_q8_0/q8_1: d = amax/127, quants
    rounded half to even, d stored as fp16): xq int8[n, cols], xd float32[n, nb] (d widened), xc
    int32[n, nb] = offset * sum of the block's quants (the weight offset's correction, see _gemm_tile),
    xs float32[n, nb] = fp16(d * sum of quants) (Q8_1's s, read by the types with a min)."""
    for b in range(xd.shape[1]):
        o = b * QK
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[t, o + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
        total = 0
        for j in range(QK):
            q = np.int8(np.rint(x[t, o + j] * inv))
            xq[t, o + j] = q
            total += q
        xd[t, b] = f16_to_f32(f32_to_f16(d))
        xc[t, b] = offset * total
        xs[t, b] = f16_to_f32(f32_to_f16(d * np.float32(total)))


# ---- the micro-kernel ----------------------------------------------------------------------------------


def _dot_step_generic(b, wv, xb, signed):
    """<8 x i32>: lane r = sum of the 4 products of row r's weights 4g..4g+3 with the broadcast bytes.
    Target-independent IR (LLVM picks pmaddwd-like instructions where it can)."""
    prod = b.mul((b.sext if signed else b.zext)(wv, _vec(32, _I32)), b.sext(xb, _vec(32, _I32)))
    s16 = b.add(b.shuffle_vector(prod, prod, _lanes(range(0, 32, 2))),
                b.shuffle_vector(prod, prod, _lanes(range(1, 32, 2))))
    return b.add(b.shuffle_vector(s16, s16, _lanes(range(0, 16, 2))),
                 b.shuffle_vector(s16, s16, _lanes(range(1, 16, 2))))


def _pairs_avx2(b, wv, xb, signed):
    """<16 x i16> pmaddubsw pairs; signed weights go in as |w| with x given w's sign (ggml's trick)."""
    if signed:
        zero = _splat(_I8, 32, 0)
        neg = b.icmp_signed("<", wv, zero)
        xb = b.select(neg, b.sub(zero, xb), xb)
        wv = b.select(neg, b.sub(zero, wv), wv)
    return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(16, _I16), wv, xb)


def _widen_avx2(b, pairs):
    return _call(b, "llvm.x86.avx2.pmadd.wd", _vec(8, _I32), pairs, _splat(_I16, 16, 1))


@intrinsic
def _gemm_tile(typingctx, q, d, m, g0, xq, xd, xc, xs, t0, out, spec):
    """Groups g0..g0+RG-1 of a packed tile times tokens t0..t0+rn-1 -> out[t, 8*g .. 8*g+8] (float32).

    q uint8[groups, nb*256], d / m float32[groups, nb*8] (the packed tile, layout in the module doc);
    xq int8[n, cols], xd / xs float32[n, nb], xc int32[n, nb] (quantize_rows); out float32[n, >= 8*groups].
    spec (literal): (has_m, signed, sub_offset, max_q, avx2, rg, rn). Unsigned quants (nibble types) have
    their offset taken off as offset * sum(x) per block (xc) when sub_offset; max_q bounds |weight quant|:
    it decides how many pmaddubsw results may be summed in int16 (|pair| <= 2 * max_q * 127) before
    widening.
    """
    spec_v = literal_values(spec)
    if spec_v is None:
        return None
    has_m, signed, sub_offset, max_q, avx2, rg, rn = spec_v
    per_i16 = max(1, min(8, 32767 // (2 * max_q * 127))) if avx2 else 0

    def codegen(context, b, signature, args):
        arr = {}
        for name, ty, a in zip(("q", "d", "m", "xq", "xd", "xc", "xs", "out"),
                               [signature.args[i] for i in (0, 1, 2, 4, 5, 6, 7, 9)],
                               [args[i] for i in (0, 1, 2, 4, 5, 6, 7, 9)]):
            arr[name] = context.make_array(ty)(context, b, a)
        g0_, t0_ = args[3], args[8]
        qp = b.bitcast(arr["q"].data, _I8.as_pointer())
        dp = b.bitcast(arr["d"].data, _F32.as_pointer())
        mp = b.bitcast(arr["m"].data, _F32.as_pointer())
        xqp = b.bitcast(arr["xq"].data, _I8.as_pointer())
        xdp = b.bitcast(arr["xd"].data, _F32.as_pointer())
        xcp = b.bitcast(arr["xc"].data, _I32.as_pointer())
        xsp = b.bitcast(arr["xs"].data, _F32.as_pointer())
        op = b.bitcast(arr["out"].data, _F32.as_pointer())
        nb = b.extract_value(arr["xd"].shape, 1)
        cols = b.extract_value(arr["xq"].shape, 1)
        ostride = b.extract_value(arr["out"].shape, 1)
        gstride = b.extract_value(arr["q"].shape, 1)  # bytes per group = nb * 256
        c64 = lambda v: ir.Constant(_I64, v)

        zero8 = ir.Constant(_vec(8, _F32), [0.0] * 8)
        accs = [[cgutils.alloca_once_value(b, zero8) for _ in range(rn)] for _ in range(rg)]
        groups = [b.add(g0_, c64(i)) for i in range(rg)]
        tokens = [b.add(t0_, c64(j)) for j in range(rn)]
        xrows = [b.gep(xqp, [b.mul(t, cols)]) for t in tokens]

        with cgutils.for_range(b, nb) as loop:
            blk = loop.index
            wbase = [b.gep(qp, [b.add(b.mul(g, gstride), b.mul(blk, c64(GROUP_BLOCK_BYTES)))]) for g in groups]
            xoff = b.mul(blk, c64(QK))
            isum = [[None] * rn for _ in range(rg)]
            part = [[None] * rn for _ in range(rg)]
            for step in range(8):
                wv = [_load(b, wbase[i], step * 32, _vec(32, _I8)) for i in range(rg)]
                for j in range(rn):
                    x4 = _load(b, xrows[j], b.add(xoff, c64(4 * step)), _I32)
                    undef = ir.Constant(_vec(8, _I32), None)
                    xb = b.bitcast(b.shuffle_vector(b.insert_element(undef, x4, ir.Constant(_I32, 0)), undef,
                                                    _lanes([0] * 8)), _vec(32, _I8))
                    for i in range(rg):
                        if avx2:
                            pairs = _pairs_avx2(b, wv[i], xb, signed)
                            part[i][j] = pairs if part[i][j] is None else b.add(part[i][j], pairs)
                            if (step + 1) % per_i16 == 0 or step == 7:
                                wide = _widen_avx2(b, part[i][j])
                                isum[i][j] = wide if isum[i][j] is None else b.add(isum[i][j], wide)
                                part[i][j] = None
                        else:
                            s = _dot_step_generic(b, wv[i], xb, signed)
                            isum[i][j] = s if isum[i][j] is None else b.add(isum[i][j], s)
            for i in range(rg):
                gb = b.add(b.mul(groups[i], nb), blk)  # (group, block) index into d / m
                dv = _load(b, b.bitcast(dp, _I8.as_pointer()), b.mul(gb, c64(32)), _vec(8, _F32))
                mv = _load(b, b.bitcast(mp, _I8.as_pointer()), b.mul(gb, c64(32)), _vec(8, _F32)) if has_m else None
                for j in range(rn):
                    tb = b.add(b.mul(tokens[j], nb), blk)
                    s32 = isum[i][j]
                    if sub_offset:  # sum (q - offset) x = sum q x - offset * sum x: exact in int32
                        xc_ = b.load(b.gep(xcp, [tb]))
                        s32 = b.sub(s32, _splat_value(b, xc_, _I32))
                    scale = b.fmul(dv, _splat_value(b, b.load(b.gep(xdp, [tb])), _F32))  # d_w * d_x first
                    term = _contract(b.fmul(b.sitofp(s32, _vec(8, _F32)), scale))
                    acc = _contract(b.fadd(b.load(accs[i][j]), term))
                    if has_m:
                        mterm = _contract(b.fmul(mv, _splat_value(b, b.load(b.gep(xsp, [tb])), _F32)))
                        acc = _contract(b.fadd(acc, mterm))
                    b.store(acc, accs[i][j])
        for i in range(rg):
            for j in range(rn):
                at = b.add(b.mul(tokens[j], ostride), b.mul(groups[i], c64(ROWS)))
                b.store(b.load(accs[i][j]), b.bitcast(b.gep(op, [at]), _vec(8, _F32).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(q, d, m, g0, xq, xd, xc, xs, t0, out, spec), codegen


def _splat_value(b, v, ty):
    undef = ir.Constant(_vec(8, ty), None)
    return b.shuffle_vector(b.insert_element(undef, v, ir.Constant(_I32, 0)), undef, _lanes([0] * 8))
