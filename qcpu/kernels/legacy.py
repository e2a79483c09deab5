"""The "legacy" block quants: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 weights per block, one fp16 scale).

All five share one block shape (ggml-common.h), which is why one generic routine serves them all:

    byte:  0    2         4              4|6|8
          +----+---------+--------------+-----------------------------------------+
          | d  | m (*_1) | qh (Q5_*)    | qs                                      |
          +----+---------+--------------+-----------------------------------------+
           f16   f16       u32 LE         16 bytes of nibbles (Q4/Q5) or 32 int8 (Q8_0)

    nibble types, qs byte j (j = 0..15):   bit 7..4 = low 4 bits of weight j+16
                                           bit 3..0 = low 4 bits of weight j
    Q5 types, qh bit k (k = 0..31):        5th bit (value 16) of weight k
    weight k = d * (q_k - offset)           offset 8 (Q4_0), 16 (Q5_0), 0 (Q8_0, q signed int8)
             = d * q_k + m                  Q4_1, Q5_1

Dequantize reproduces ggml's dequantize_row_* (and gguf-py's numpy port) bit for bit.

Matvec follows llama.cpp's CPU backend: x is quantized once per call to its vec_dot_type -- Q8_0 for
Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1 (type_traits_cpu in ggml-cpu.c) -- then every block contributes
    (d_w * d_x) * sum_k(q_k * xq_k)   (exact int32 dot)   [+ m_w * s_x for the *_1 types]
The activation quantizer is the one llama.cpp runs on x86 (AVX/AVX2 quantize_row_q8_0/q8_1):
d = amax/127, q = round-half-even(x * (127/amax)), d stored as fp16; Q8_1's s = fp16(d * sum(q)).
(The scalar reference multiplies by 1/d and rounds half away from zero; the two can differ by one
step on rare near-ties.)

Both per-row loops are written in LLVM IR through Numba intrinsics, because Numba's auto-vectorizer
would not keep a 32-weight block in vector registers (short per-block loops stay scalar; long loops
over a row need the scales spread out per weight, which cost more than they saved). One builder,
parameterised by the layout, unpacks a block into a <32 x i8> (`_emit_weights`); dequantize converts
and scales it, matvec dots it with the int8 activations into <8 x i32> partial sums, converts, and
fused-multiply-adds with the broadcast block scale into <8 x float> accumulators -- the structure of
llama.cpp's AVX2 kernel. On x86 with AVX2 the dot uses pmaddubsw/pmaddwd as ggml does; elsewhere it is
target-independent vector IR that LLVM lowers for whatever CPU Numba compiles for.
"""

from __future__ import annotations

import functools

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels import check_rows, gemm, literal_values, locate_row, register, specialise, total_rows
from qcpu.kernels.cpu import F16C, X86_AVX2
from qcpu.kernels.halves import f16_to_f32, f32_to_f16, ir_half_at
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
    _prefetch,
    _splat,
    _splat_value,
    _vec,
)

QK = 32  # weights per block, all five types

# ---- activation quantizers (x float32[cols] -> int8 quants + per-block scales) -------------------


@njit(cache=True, inline="always")
def _q8_block(x, o, qs):
    """Quantize x[o:o+32] into qs[o:o+32]; return (d as float32, d as fp16 bits, sum of quants).

    No fastmath here: 127/amax must stay a true division (not a reciprocal estimate) to match llama.cpp.
    """
    amax = np.float32(0.0)
    for j in range(QK):
        amax = max(amax, abs(x[o + j]))
    d = amax / np.float32(127.0)
    inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
    total = 0
    for j in range(QK):
        q = np.int8(np.rint(x[o + j] * inv))  # rint = round half to even, as _mm256_round_ps NEAREST
        qs[o + j] = q
        total += q
    return d, f32_to_f16(d), total


@njit(cache=True)
def quantize_q8_0(x):
    """llama.cpp quantize_row_q8_0 (x86 path). Returns (qs int8[cols], d float32[cols/32]); d holds the
    fp16-rounded scale widened back to float32, which is what the dot product multiplies by."""
    nb = x.shape[0] // QK
    qs = np.empty(nb * QK, np.int8)
    d = np.empty(nb, np.float32)
    for b in range(nb):
        _, dh, _ = _q8_block(x, b * QK, qs)
        d[b] = f16_to_f32(dh)
    return qs, d


@njit(cache=True)
def quantize_q8_1(x):
    """llama.cpp quantize_row_q8_1 (x86 path). Returns (qs, d, s); s = fp16(d * sum(qs)) per block,
    the term the Q4_1/Q5_1 dot multiplies by the weight block's min m."""
    nb = x.shape[0] // QK
    qs = np.empty(nb * QK, np.int8)
    d = np.empty(nb, np.float32)
    s = np.empty(nb, np.float32)
    for b in range(nb):
        df, dh, total = _q8_block(x, b * QK, qs)
        d[b] = f16_to_f32(dh)
        s[b] = f16_to_f32(f32_to_f16(df * np.float32(total)))
    return qs, d, s


@njit(cache=True, inline="always")
def quantize_row_q8(x, t, xq, xd, xc, xs, offset):
    """x[t] (float32[n, cols]) as the GEMM reads it: xq int8[n, cols] and xd float32[n, nb] as
    quantize_q8_0; xc int32[n, nb] = offset * the block's sum of quants (the weight offset's correction);
    xs float32[n, nb] = Q8_1's s, fp16(d * sum of quants), read by the types with a min."""
    for b in range(xd.shape[1]):
        df, dh, total = _q8_block(x[t], b * QK, xq[t])
        xd[t, b] = f16_to_f32(dh)
        xc[t, b] = offset * total
        xs[t, b] = f16_to_f32(f32_to_f16(df * np.float32(total)))


@njit(cache=True, parallel=True)
def quantize_rows_q8(x, offset):
    """x float32[n, cols] -> (xq int8[n, cols], xd float32[n, nb], xc int32[n, nb], xs float32[n, nb]), each
    row as quantize_row_q8 gives it: the activations of a batched product (gemm), or of one row."""
    n, cols = x.shape
    nb = cols // QK
    xq = np.empty((n, cols), np.int8)
    xd = np.empty((n, nb), np.float32)
    xc = np.empty((n, nb), np.int32)
    xs = np.empty((n, nb), np.float32)
    for t in prange(n):
        quantize_row_q8(x, t, xq, xd, xc, xs, offset)
    return xq, xd, xc, xs


@njit(cache=True)
def offset_sums(xq, offset):
    """offset * (sum of each 4 consecutive activation quants): the lane layout of pmaddwd's output, so
    the AVX2 dot can apply a weight offset (q - 8, q - 16) as one vector subtraction per block."""
    out = np.empty(xq.shape[0] // 4, np.int32)
    for k in range(out.shape[0]):
        out[k] = offset * (np.int32(xq[4 * k]) + np.int32(xq[4 * k + 1]) + np.int32(xq[4 * k + 2]) + np.int32(xq[4 * k + 3]))
    return out


# ---- LLVM IR building blocks (shared by dequantize and matvec) ------------------------------------


# Block unpack (layout as drawn at the top of the file):
#
#   qs byte j:   [ h3 h2 h1 h0 | l3 l2 l1 l0 ]      l -> weight j,  h -> weight j+16   (j = 0..15)
#   qh (u32 LE): bit k = bit 4 of weight k                                           (k = 0..31)
#
#   lanes 0..15  = qs & 0x0F      | (qh bit k) << 4
#   lanes 16..31 = qs >> 4        | (qh bit k) << 4
def _emit_weights(b, blk, has_m, has_qh, nibbles, offset):
    """One block's 32 weight quants as <32 x i8>, in the activation's order (q_k pairs with xq_k),
    minus `offset` (pass 0 to keep nibble quants unsigned)."""
    if not nibbles:  # Q8_0: 32 int8 right after d
        return _load(b, blk, 2, _vec(32, _I8))
    qh_at = 4 if has_m else 2
    qs_at = qh_at + 4 if has_qh else qh_at
    qs = _load(b, blk, qs_at, _vec(16, _I8))
    # qs byte j holds weight j (low nibble) and weight j+16 (high nibble): split, then concatenate.
    v = b.shuffle_vector(b.and_(qs, _splat(_I8, 16, 0x0F)), b.lshr(qs, _splat(_I8, 16, 4)), _lanes(range(32)))
    if has_qh:
        # Lane k takes qh byte k>>3, keeps bit k&7, and turns it into the value 16.
        qh = _load(b, blk, qh_at, _vec(4, _I8))
        spread = b.shuffle_vector(qh, ir.Constant(_vec(4, _I8), None), _lanes(k >> 3 for k in range(32)))
        bit = b.and_(spread, ir.Constant(_vec(32, _I8), [1 << (k & 7) for k in range(32)]))
        set_ = b.icmp_unsigned("!=", bit, _splat(_I8, 32, 0))
        v = b.or_(v, b.select(set_, _splat(_I8, 32, 16), _splat(_I8, 32, 0)))
    if offset:
        v = b.sub(v, _splat(_I8, 32, offset))  # -8..7 or -16..15: fits int8
    return v


def _dot8_generic(b, wq, xv, signed):
    """Exact int32 dot of two <32 x i8>, kept as 8 partial sums of 4 products each: products of even
    and odd lanes added pairwise, then the two halves. LLVM picks the
    instructions for the target (pmullw/phaddw on x86, smull/addp on ARM...)."""
    wx = (b.sext if signed else b.zext)(wq, _vec(32, _I32))
    prod = b.mul(wx, b.sext(xv, _vec(32, _I32)))
    s16 = b.add(b.shuffle_vector(prod, prod, _lanes(range(0, 32, 2))),
                b.shuffle_vector(prod, prod, _lanes(range(1, 32, 2))))
    return b.add(b.shuffle_vector(s16, s16, _lanes(range(8))), b.shuffle_vector(s16, s16, _lanes(range(8, 16))))


def _dot8_avx2(b, wq, xv, signed):
    """The same 8 partial sums with llama.cpp's AVX2 instructions: pmaddubsw (u8 x s8 -> pairs summed
    to i16) then pmaddwd by ones (pairs -> i32), so lane k is exactly terms 4k..4k+3. pmaddubsw wants
    an unsigned operand: signed weights go in as |w| with x given w's sign, as ggml's mul_sum_i8_pairs.
    No i16 saturation: |pair| <= 2*128*127 = 32512."""
    if signed:
        neg = b.icmp_signed("<", wq, _splat(_I8, 32, 0))
        xv = b.select(neg, b.sub(_splat(_I8, 32, 0), xv), xv)
        wq = b.select(neg, b.sub(_splat(_I8, 32, 0), wq), wq)  # -(-128) wraps to 0x80 = 128 unsigned
    pairs = _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(16, _I16), wq, xv)
    return _call(b, "llvm.x86.avx2.pmadd.wd", _vec(8, _I32), pairs, _splat(_I16, 16, 1))


# ---- the row kernels, generic over the layout --------------------------------------------------------
# `spec` is a specialisation's literal (type_size, has_m, has_qh, nibbles, offset, avx2, f16c): LAYOUTS
# below, plus the instructions the emitted code may use.


@intrinsic
def _row_dequantize(typingctx, wrow, orow, spec):
    """dequantize(wrow uint8[row_bytes], orow float32[cols], spec) -> None, ggml's arithmetic:
    float(q - offset) * d, or (float(q) * d) + m rounded twice -- the callers are not fastmath, so no
    flag allows fusing that into an FMA."""
    layout = literal_values(spec)
    if layout is None:
        return None
    type_size, has_m, has_qh, nibbles, offset, _, f16c = layout
    signed = offset != 0 or not nibbles

    def codegen(context, b, signature, args):
        aw, ao = [context.make_array(t)(context, b, a) for t, a in zip(signature.args[:2], args[:2])]
        wp = b.bitcast(aw.data, _I8.as_pointer())
        op = b.bitcast(ao.data, _vec(QK, _F32).as_pointer())
        nb = b.udiv(b.extract_value(ao.shape, 0), ir.Constant(_I64, QK))
        with cgutils.for_range(b, nb) as loop:
            blk = b.gep(wp, [b.mul(loop.index, ir.Constant(_I64, type_size))])
            q = _emit_weights(b, blk, has_m, has_qh, nibbles, offset)
            d = _splat_value(b, ir_half_at(b, blk, 0, f16c), QK)
            y = b.fmul((b.sitofp if signed else b.uitofp)(q, _vec(QK, _F32)), d)
            if has_m:
                y = b.fadd(y, _splat_value(b, ir_half_at(b, blk, 2, f16c), QK))
            b.store(y, b.gep(op, [loop.index]), align=4)
        return context.get_dummy_value()

    return types.void(wrow, orow, spec), codegen


@intrinsic
def _row_dot(typingctx, wrow, xq, xd, xs, xc, spec):
    """dot(wrow uint8[row_bytes], xq int8[cols], xd f32[nb], xs f32[nb], xc i32[cols/4], spec) -> float32.

    xs (Q8_1's d*sum term) is read only by the types with a min (has_m); xc (offset_sums(xq, offset))
    only by the AVX2 path of the types with an offset, which dots the unsigned quants and subtracts
    offset * sum(x) per lane instead of unpacking to signed values."""
    layout = literal_values(spec)
    if layout is None:
        return None
    type_size, has_m, has_qh, nibbles, offset, avx2, f16c = layout
    signed = not nibbles or (offset != 0 and not avx2)
    sub_offset = offset if avx2 else 0  # the generic path subtracts it from the weights instead
    dot8 = _dot8_avx2 if avx2 else _dot8_generic

    def codegen(context, b, signature, args):
        arrs = [context.make_array(t)(context, b, a) for t, a in zip(signature.args[:5], args[:5])]
        wp = b.bitcast(arrs[0].data, _I8.as_pointer())
        xp = b.bitcast(arrs[1].data, _I8.as_pointer())
        dp = b.bitcast(arrs[2].data, _F32.as_pointer())
        sp = b.bitcast(arrs[3].data, _F32.as_pointer())
        cp = b.bitcast(arrs[4].data, _I8.as_pointer())
        nb = b.extract_value(arrs[2].shape, 0)
        zero8 = ir.Constant(_vec(8, _F32), [0.0] * 8)
        accs = [cgutils.alloca_once_value(b, zero8), cgutils.alloca_once_value(b, zero8)]
        macc = cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0))

        def block(i, acc):
            at = b.mul(i, ir.Constant(_I64, type_size))
            blk = b.gep(wp, [at])
            _prefetch(b, wp, at, type_size)
            wq = _emit_weights(b, blk, has_m, has_qh, nibbles, offset - sub_offset)
            xv = _load(b, xp, b.mul(i, ir.Constant(_I64, QK)), _vec(32, _I8))
            s8 = dot8(b, wq, xv, signed)
            if sub_offset:  # sum (q - off) x = sum q x - off * sum x, per lane
                s8 = b.sub(s8, _load(b, cp, b.mul(i, ir.Constant(_I64, 32)), _vec(8, _I32)))
            scale = b.fmul(ir_half_at(b, blk, 0, f16c), b.load(b.gep(dp, [i])))  # d_w * d_x first, as ggml
            term = _contract(b.fmul(b.sitofp(s8, _vec(8, _F32)), _splat_value(b, scale, 8)))
            b.store(_contract(b.fadd(b.load(acc), term)), acc)
            if has_m:
                mterm = _contract(b.fmul(ir_half_at(b, blk, 2, f16c), b.load(b.gep(sp, [i]))))
                b.store(_contract(b.fadd(b.load(macc), mterm)), macc)

        # Two blocks per iteration into two accumulators: two independent FMA chains, so the
        # loop does not wait on the FMA latency.
        one = ir.Constant(_I64, 1)
        with cgutils.for_range(b, b.lshr(nb, one)) as loop:
            i = b.shl(loop.index, one)
            block(i, accs[0])
            block(b.add(i, one), accs[1])
        with b.if_then(b.trunc(nb, ir.IntType(1))):
            block(b.sub(nb, one), accs[0])
        a = b.fadd(b.load(accs[0]), b.load(accs[1]))
        for n in (4, 2, 1):  # horizontal sum of the 8 lanes
            a = b.fadd(b.shuffle_vector(a, a, _lanes(range(n))), b.shuffle_vector(a, a, _lanes(range(n, 2 * n))))
        result = b.extract_element(a, ir.Constant(_I32, 0))
        if has_m:
            result = b.fadd(result, b.load(macc))
        return result

    return types.float32(wrow, xq, xd, xs, xc, spec), codegen


@intrinsic
def _pack_row(typingctx, wrow, q, d, m, r, spec):
    """Unpack one weight row into row r (0..7) of a packed 8-row group (gemm.py's layout): q uint8[nb*256]
    gets the row's quants, 4 at a time, at bytes 256b + 32g + 4r (nibble types unsigned, before their
    offset; Q8_0 signed), d / m float32[nb*8] its block scales / mins at 8b + r."""
    layout = literal_values(spec)
    if layout is None:
        return None
    type_size, has_m, has_qh, nibbles, _, _, f16c = layout

    def codegen(context, b, signature, args):
        aw, aq, ad, am = [context.make_array(t)(context, b, a) for t, a in zip(signature.args[:4], args[:4])]
        wp = b.bitcast(aw.data, _I8.as_pointer())
        qp = b.bitcast(aq.data, _I8.as_pointer())
        dp = b.bitcast(ad.data, _F32.as_pointer())
        mp = b.bitcast(am.data, _F32.as_pointer())
        row = args[4]
        nb = b.udiv(b.extract_value(ad.shape, 0), ir.Constant(_I64, 8))
        with cgutils.for_range(b, nb) as loop:
            blk = b.gep(wp, [b.mul(loop.index, ir.Constant(_I64, type_size))])
            w4 = b.bitcast(_emit_weights(b, blk, has_m, has_qh, nibbles, 0), _vec(8, _I32))
            base = b.add(b.mul(loop.index, ir.Constant(_I64, 256)), b.mul(row, ir.Constant(_I64, 4)))
            for g in range(8):
                at = b.gep(qp, [b.add(base, ir.Constant(_I64, 32 * g))])
                b.store(b.extract_element(w4, ir.Constant(_I32, g)), b.bitcast(at, _I32.as_pointer()), align=1)
            at = b.add(b.mul(loop.index, ir.Constant(_I64, 8)), row)
            b.store(ir_half_at(b, blk, 0, f16c), b.gep(dp, [at]))
            if has_m:
                b.store(ir_half_at(b, blk, 2, f16c), b.gep(mp, [at]))
        return context.get_dummy_value()

    return types.void(wrow, q, d, m, r, spec), codegen


# (type_size, has_m, has_qh, nibbles, offset) -- the block layouts drawn at the top of this file.
LAYOUTS = {
    GGMLQuantizationType.Q4_0: (18, False, False, True, 8),
    GGMLQuantizationType.Q4_1: (20, True, False, True, 0),
    GGMLQuantizationType.Q5_0: (22, False, True, True, 16),
    GGMLQuantizationType.Q5_1: (24, True, True, True, 0),
    GGMLQuantizationType.Q8_0: (34, False, False, False, 0),
}


# ---- entry points: one factory, one specialisation per type ----------------------------------------
# The matvecs are not fastmath: Numba hands the flag down to what they call, where it turned quantize_q8_0's
# amax/127 into a multiply by a reciprocal, and let LLVM re-associate the block sums per target CPU. The dot
# asks for FMA contraction itself (_contract), which is all it needs.


@functools.cache
def make_kernels(qtype, avx2=X86_AVX2, f16c=F16C):
    """(dequantize(w, out), matvec_many(ws, x, outs), gemm(w, x, out)) for one legacy type, jitted: w
    uint8[rows, row_bytes] of ggml-common.h's block_q4_0..block_q8_0 (LAYOUTS); dequantize: out
    float32[rows, cols]; matvec_many: a tuple ws of such weights, x float32[n, cols] (a few tokens)
    quantized once -> the tuple outs of float32[n, rows of each]; gemm: x float32[n, cols] -> out float32[n, rows] (gemm.py). ggml's dequantize_row_* and ggml_vec_dot_*_q8_0/q8_1 arithmetic; ValueError
    when the shapes do not match.

    avx2 / f16c: the instructions the emitted code may use (default: this CPU's); the tests also build the
    portable IR (both False) on every machine.
    """
    spec = (*LAYOUTS[qtype], avx2, f16c)  # captured constants only (see qcpu.kernels.specialise)
    type_size, has_m, offset = spec[0], spec[1], spec[4]
    name = qtype.name.lower() + ("" if (avx2, f16c) == (X86_AVX2, F16C) else f"_avx2{avx2:d}_f16c{f16c:d}")

    def dequantize(w, out):
        check_rows(w, out.shape[0], out.shape[1], QK, type_size, "dequantize: weight row bytes do not match the output shape")
        for r in prange(w.shape[0]):
            _row_dequantize(w[r], out[r], spec)

    def matvec(ws, x, outs):
        n, cols = x.shape
        for m in range(len(ws)):
            if outs[m].shape[0] != n:
                raise ValueError("matvec: outputs are not [tokens, rows]")
            check_rows(ws[m], outs[m].shape[1], cols, QK, type_size,
                       "matvec: weight row bytes do not match the activation length")
        # vec_dot_type Q8_1 (xs: the block sums the min multiplies) for the types with a min, else Q8_0
        xq, xd, _, xs = quantize_rows_q8(x, offset)
        xc = np.zeros((n, cols // 4 if offset else 1), np.int32)  # read only by the offset types
        if offset:
            for t in range(n):
                xc[t] = offset_sums(xq[t], offset)
        for r in prange(total_rows(ws)):  # a row is read from memory once, then from L1 for the other tokens
            m, i = locate_row(ws, r)
            for t in range(n):
                outs[m][t, i] = _row_dot(ws[m][i], xq[t], xd[t], xs[t], xc[t], spec)

    # The batched product (gemm.py): quants unpacked per tile into 8-row groups, int8 dots.
    signed = not spec[3]  # Q8_0; the nibble types are packed unsigned
    max_q = 128 if signed else (31 if spec[2] else 15)
    g1, g2, g_full = [("legacy", has_m, signed, offset != 0, max_q, avx2, gemm.RG, rn) for rn in (1, 2, gemm.RN)]

    def batched(w, x, out):
        gemm.check_shapes(w, x, out, QK, type_size)
        n, cols = x.shape
        rows = w.shape[0]
        nb = cols // QK
        xq, xd, xc, xs = quantize_rows_q8(x, offset)
        per_tile, n_tiles, workers, max_groups = gemm.plan(rows, cols)
        for worker in prange(workers):  # buffers once per worker, tiles dealt round-robin (see gemm.WORKERS)
            q = np.empty((max_groups, nb * gemm.GROUP_BLOCK_BYTES), np.uint8)
            d = np.zeros((max_groups, nb * gemm.ROWS), np.float32)  # padding rows: scale 0, output 0
            m = np.zeros((max_groups, nb * gemm.ROWS), np.float32)
            o = np.empty((n, max_groups * gemm.ROWS), np.float32)
            for tile in range(worker, n_tiles, workers):
                r0, nr, groups = gemm.tile_span(tile, rows, per_tile)
                if nr < groups * gemm.ROWS:
                    d[:] = 0
                    m[:] = 0
                for r in range(nr):
                    _pack_row(w[r0 + r], q[r // gemm.ROWS], d[r // gemm.ROWS], m[r // gemm.ROWS], r % gemm.ROWS, spec)
                gemm.sweep((q, d, m), (xq, xd, xc, xs), n, cols, groups, o, g_full, g2, g1)
                gemm.scatter(o, out, r0, nr)

    return (specialise(dequantize, f"dequantize_{name}", parallel=True),
            specialise(matvec, f"matvec_{name}", parallel=True),
            specialise(batched, f"gemm_{name}", parallel=True))


for _t in LAYOUTS:
    _dequantize, _matvec, _gemm = make_kernels(_t)
    register(_t, _dequantize, gemm=_gemm, gemm_min_tokens=3, matvec_many=_matvec)  # measured: 2 matvecs ~ a packed tile
