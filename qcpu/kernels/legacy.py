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
    d_w * d_x * sum_k(q_k * xq_k)   (exact int32 dot)   [+ m_w * s_x for the *_1 types]
The activation quantizer is the one llama.cpp runs on x86 (AVX/AVX2 quantize_row_q8_0/q8_1):
d = amax/127, q = round-half-even(x * (127/amax)), d stored as fp16; Q8_1's s = fp16(d * sum(q)).
(The scalar reference differs only in using 1/d and round-half-away; the two disagree on a handful
of ties.)

The per-row dot is written in LLVM IR through a Numba intrinsic, because Numba's auto-vectorizer
could not be coaxed into keeping 32-weight blocks in vector registers (see PERF_NOTES): per block it
unpacks the weights into a <32 x i8>, multiplies with the int8 activations, pairs the products down to
<8 x i32>, converts and fused-multiply-adds with the broadcast block scale into an <8 x float>
accumulator -- the structure of llama.cpp's AVX2 kernel, expressed in target-independent vector IR so
LLVM lowers it for whatever CPU Numba compiles for.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels import register
from qcpu.kernels.floats import f16_to_f32, f32_to_f16

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


# ---- dequantize: one generic row routine, specialised by the layout constants ----------------------


@njit(cache=True, inline="always")
def _half_at(wr, o):
    return f16_to_f32(np.uint16(wr[o]) | np.uint16(np.uint16(wr[o + 1]) << np.uint16(8)))


@njit(cache=True, parallel=True)
def _dequantize_rows(w, out, type_size, has_m, has_qh, offset):
    """Shared by the four nibble types. No fastmath: (d*q)+m must round twice, like ggml, not fuse."""
    nb = w.shape[1] // type_size
    qh_at = 4 if has_m else 2
    qs_at = qh_at + 4 if has_qh else qh_at
    for r in prange(w.shape[0]):
        wr = w[r]
        orow = out[r]
        for b in range(nb):
            o = b * type_size
            d = _half_at(wr, o)
            m = _half_at(wr, o + 2) if has_m else np.float32(0.0)
            qh = np.uint32(0)
            if has_qh:
                qh = (np.uint32(wr[o + qh_at]) | (np.uint32(wr[o + qh_at + 1]) << np.uint32(8))
                      | (np.uint32(wr[o + qh_at + 2]) << np.uint32(16)) | (np.uint32(wr[o + qh_at + 3]) << np.uint32(24)))
            for j in range(QK // 2):
                q = wr[o + qs_at + j]
                v0 = np.int32(q & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                v1 = np.int32(q >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
                y0 = np.float32(v0 - offset) * d
                y1 = np.float32(v1 - offset) * d
                if has_m:
                    y0 = y0 + m
                    y1 = y1 + m
                orow[b * QK + j] = y0
                orow[b * QK + QK // 2 + j] = y1


@njit(cache=True)
def dequantize_q4_0(w, out):
    _dequantize_rows(w, out, 18, False, False, 8)


@njit(cache=True)
def dequantize_q4_1(w, out):
    _dequantize_rows(w, out, 20, True, False, 0)


@njit(cache=True)
def dequantize_q5_0(w, out):
    _dequantize_rows(w, out, 22, False, True, 16)


@njit(cache=True)
def dequantize_q5_1(w, out):
    _dequantize_rows(w, out, 24, True, True, 0)


@njit(cache=True, parallel=True)
def dequantize_q8_0(w, out):
    nb = w.shape[1] // 34
    for r in prange(w.shape[0]):
        wr = w[r]
        for b in range(nb):
            d = _half_at(wr, b * 34)
            for j in range(QK):
                out[r, b * QK + j] = np.float32(np.int8(wr[b * 34 + 2 + j])) * d


# ---- matvec: the per-row block dot in LLVM vector IR ----------------------------------------------

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vec(n, t):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vec(n, t), [v] * n)


def _lanes(idx):
    idx = list(idx)
    return ir.Constant(_vec(len(idx), _I32), idx)


def _contract(instr):
    # Allow mul+add -> FMA (as llama.cpp's _mm256_fmadd_ps) without Numba's blanket fastmath.
    instr.flags.append("contract")
    return instr


def _ir_half_to_float(b, h16):
    """f16_to_f32 (floats.py) in IR: exact, branch-free."""
    h = b.zext(h16, _I32)
    em = b.and_(h, ir.Constant(_I32, 0x7FFF))
    mag = b.fmul(b.bitcast(b.shl(em, ir.Constant(_I32, 13)), _F32), ir.Constant(_F32, 2.0**112))
    special = b.select(b.icmp_unsigned(">=", em, ir.Constant(_I32, 0x7C00)),
                       ir.Constant(_I32, 0x7F800000), ir.Constant(_I32, 0))
    sign = b.shl(b.and_(h, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    return b.bitcast(b.or_(b.or_(b.bitcast(mag, _I32), sign), special), _F32)


def _load(b, base, offset, ty):
    """Unaligned load of `ty` at byte pointer base + offset (blocks are 18/20/22/24/34 bytes)."""
    p = b.gep(base, [offset if isinstance(offset, ir.Value) else ir.Constant(_I64, offset)])
    return b.load(b.bitcast(p, ty.as_pointer()), align=1)


def _emit_weights(b, blk, has_m, has_qh, nibbles, offset):
    """One block's 32 weight quants as <32 x i8>, in the activation's order (q_k pairs with xq_k)."""
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


def _make_row_dot(type_size, has_m, has_qh, nibbles, offset):
    """Intrinsic dot(wrow uint8[row_bytes], xq int8[cols], xd f32[nb], xs f32[nb]) -> float32.

    xs (Q8_1's d*sum term) is read only by the types with a min (has_m)."""
    signed = offset != 0 or not nibbles  # Q4_1/Q5_1 quants are 0..31, unsigned

    @intrinsic
    def row_dot(typingctx, wrow, xq, xd, xs):
        sig = types.float32(wrow, xq, xd, xs)

        def codegen(context, b, signature, args):
            arrs = [context.make_array(t)(context, b, a) for t, a in zip(signature.args, args)]
            wp = b.bitcast(arrs[0].data, _I8.as_pointer())
            xp = b.bitcast(arrs[1].data, _I8.as_pointer())
            dp = b.bitcast(arrs[2].data, _F32.as_pointer())
            sp = b.bitcast(arrs[3].data, _F32.as_pointer())
            nb = b.extract_value(arrs[2].shape, 0)
            acc = cgutils.alloca_once_value(b, ir.Constant(_vec(8, _F32), [0.0] * 8))
            macc = cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0))
            with cgutils.for_range(b, nb) as loop:
                i = loop.index
                blk = b.gep(wp, [b.mul(i, ir.Constant(_I64, type_size))])
                wq = _emit_weights(b, blk, has_m, has_qh, nibbles, offset)
                xv = _load(b, xp, b.mul(i, ir.Constant(_I64, QK)), _vec(32, _I8))
                # Exact int32 dot, kept as 8 partial sums: products of even and odd lanes added
                # pairwise (16 lanes), then the two halves (8 lanes). LLVM picks pmaddwd/phaddw etc.
                wx = (b.sext if signed else b.zext)(wq, _vec(32, _I32))
                xx = b.sext(xv, _vec(32, _I32))
                prod = b.mul(wx, xx)
                s16 = b.add(b.shuffle_vector(prod, prod, _lanes(range(0, 32, 2))),
                            b.shuffle_vector(prod, prod, _lanes(range(1, 32, 2))))
                s8 = b.add(b.shuffle_vector(s16, s16, _lanes(range(8))),
                           b.shuffle_vector(s16, s16, _lanes(range(8, 16))))
                dw = _ir_half_to_float(b, _load(b, blk, 0, _I16))
                scale = b.fmul(dw, b.load(b.gep(dp, [i])))  # d_w * d_x, then times the ints: as ggml
                sv = b.shuffle_vector(b.insert_element(ir.Constant(_vec(8, _F32), None), scale, ir.Constant(_I32, 0)),
                                      ir.Constant(_vec(8, _F32), None), _lanes([0] * 8))
                term = _contract(b.fmul(b.sitofp(s8, _vec(8, _F32)), sv))
                b.store(_contract(b.fadd(b.load(acc), term)), acc)
                if has_m:
                    mw = _ir_half_to_float(b, _load(b, blk, 2, _I16))
                    mterm = _contract(b.fmul(mw, b.load(b.gep(sp, [i]))))
                    b.store(_contract(b.fadd(b.load(macc), mterm)), macc)
            a = b.load(acc)
            for n in (4, 2, 1):  # horizontal sum of the 8 lanes
                a = b.fadd(b.shuffle_vector(a, a, _lanes(range(n))), b.shuffle_vector(a, a, _lanes(range(n, 2 * n))))
            result = b.extract_element(a, ir.Constant(_I32, 0))
            if has_m:
                result = b.fadd(result, b.load(macc))
            return result

        return sig, codegen

    return row_dot


_dot_q4_0 = _make_row_dot(18, False, False, True, 8)
_dot_q4_1 = _make_row_dot(20, True, False, True, 0)
_dot_q5_0 = _make_row_dot(22, False, True, True, 16)
_dot_q5_1 = _make_row_dot(24, True, True, True, 0)
_dot_q8_0 = _make_row_dot(34, False, False, False, 0)


@njit(cache=True, inline="always")
def _check(w, x, type_size):
    if x.shape[0] % QK != 0 or w.shape[1] != (x.shape[0] // QK) * type_size:
        raise ValueError("matvec: weight row bytes do not match the activation length")


# Numba needs each intrinsic named at a call site, hence five three-line bodies.
@njit(cache=True, parallel=True, fastmath=True)
def matvec_q4_0(w, x, out):
    _check(w, x, 18)
    xq, xd = quantize_q8_0(x)
    for r in prange(w.shape[0]):
        out[r] = _dot_q4_0(w[r], xq, xd, xd)


@njit(cache=True, parallel=True, fastmath=True)
def matvec_q5_0(w, x, out):
    _check(w, x, 22)
    xq, xd = quantize_q8_0(x)
    for r in prange(w.shape[0]):
        out[r] = _dot_q5_0(w[r], xq, xd, xd)


@njit(cache=True, parallel=True, fastmath=True)
def matvec_q8_0(w, x, out):
    _check(w, x, 34)
    xq, xd = quantize_q8_0(x)
    for r in prange(w.shape[0]):
        out[r] = _dot_q8_0(w[r], xq, xd, xd)


@njit(cache=True, parallel=True, fastmath=True)
def matvec_q4_1(w, x, out):
    _check(w, x, 20)
    xq, xd, xs = quantize_q8_1(x)
    for r in prange(w.shape[0]):
        out[r] = _dot_q4_1(w[r], xq, xd, xs)


@njit(cache=True, parallel=True, fastmath=True)
def matvec_q5_1(w, x, out):
    _check(w, x, 24)
    xq, xd, xs = quantize_q8_1(x)
    for r in prange(w.shape[0]):
        out[r] = _dot_q5_1(w[r], xq, xd, xs)


register(GGMLQuantizationType.Q4_0, dequantize_q4_0, matvec_q4_0)
register(GGMLQuantizationType.Q4_1, dequantize_q4_1, matvec_q4_1)
register(GGMLQuantizationType.Q5_0, dequantize_q5_0, matvec_q5_0)
register(GGMLQuantizationType.Q5_1, dequantize_q5_1, matvec_q5_1)
register(GGMLQuantizationType.Q8_0, dequantize_q8_0, matvec_q8_0)
