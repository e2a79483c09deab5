"""K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K -- 256-weight super-blocks with 8 or 16 sub-block scales.

Arithmetic follows llama.cpp's CPU backend, so our logits track it closely:

  dequantize  dequantize_row_q*_K (ggml-quants.c) in gguf-py's float32 operation order, so the result is
              bit-identical to `gguf.quants.dequantize` (no fastmath: no FMA contraction).
  matvec      x is quantized once per call to Q8_K (quantize_row_q8_K_ref: 256-value blocks, float32 d,
              int8 qs, int16 bsums = sums of 16 qs), then every weight block contributes
                  d_w*d_x * sum_s scale_s * sum_{i in s} q_i*qx_i   -  dmin_w*d_x * sum_s min_s * bsums_s
              with an exact int32 inner sum, as ggml_vec_dot_q*_K_q8_K.

The block dot is written in LLVM IR through Numba intrinsics (see PERF_NOTES: Numba's auto-vectorizer
handles neither the nibble unpacking nor the int8 products well). One builder serves all five types: a
type only says how to unpack its 256 quants as eight <32 x i8> vectors of *unsigned* values u (Q3_K and
Q6_K store q = u - 4 and u - 32) and where its scales, mins and fp16 fields are. Then per 32 values
    pmaddubsw(u, qx)            -> 16 int16 pair sums (pairs never straddle a 16-value sub-block)
    pmaddwd(., scale per lane)  -> 8 int32, accumulated
and the offset and min terms come from the activation's bsums, as llama.cpp's AVX2 kernels do. With
AVX2 the two steps are the x86 instructions themselves; elsewhere the same lane arithmetic is emitted
as target-independent vector IR (about half as fast on x86; LLVM lowers it for NEON etc.).
Saturation never happens: |u*qx| pair sums <= 2*63*127 = 16002 < 32767.
"""

from __future__ import annotations

import functools

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels import check_rows, gemm, literal_values, locate_row, register, specialise, total_rows
from qcpu.kernels.cpu import F16C, X86_AVX2
from qcpu.kernels.halves import f16_at, ir_half_at
from qcpu.kernels.llvm_ir import (
    _F32,
    _I8,
    _I16,
    _I32,
    _I64,
    _contract,
    _load,
    _loop_kept,
    _madd,
    _maddubs,
    _prefetch,
    _shuffle,
    _splat,
    _splat_value,
    _vec,
)

QK_K = 256

# Bytes per super-block and the fields inside (ggml-common.h block_q*_K):
Q2_K_BYTES = 84  # scales[16] @0 (lo nibble scale, hi nibble min), qs[64] @16, d @80, dmin @82
Q3_K_BYTES = 110  # hmask[32] @0, qs[64] @32, scales[12] @96 (6-bit), d @108
Q4_K_BYTES = 144  # d @0, dmin @2, scales[12] @4 (6-bit scales + mins), qs[128] @16
Q5_K_BYTES = 176  # d @0, dmin @2, scales[12] @4 (as Q4_K), qh[32] @16, qs[128] @48
Q6_K_BYTES = 210  # ql[128] @0, qh[64] @128, scales[16] (int8) @192, d @208

# ----------------------------------------------------------------------------------------------------
# Small loads shared by the dequantizers and the matvecs


@intrinsic
def _u32(typingctx, row, o):
    """The little-endian uint32 at row[o:o+4] (unaligned), as int64."""
    sig = types.int64(row, o)

    def codegen(context, b, signature, args):
        base = context.make_array(signature.args[0])(context, b, args[0]).data
        return b.zext(_load(b, base, args[1], _I32), _I64)

    return sig, codegen


@njit(cache=True, inline="always")
def _scale_min_k4(row, o):
    """Q4_K / Q5_K: the 8 six-bit scales and 8 six-bit mins packed in the 12 bytes row[o:o+12].

    Bit layout (capitals = scales, small = mins, A..H = sub-blocks 0..7; as gguf-py's get_scale_min):
        byte  0 EEAAAAAA    4 eeaaaaaa    8 eeeeEEEE
              1 FFBBBBBB    5 ffbbbbbb    9 ffffFFFF
              2 GGCCCCCC    6 ggcccccc   10 ggggGGGG
              3 HHDDDDDD    7 hhdddddd   11 hhhhHHHH
    Sub-blocks 0-3 keep 6 bits in bytes 0-7; 4-7 keep their low 4 bits in bytes 8-11 and their top
    2 bits in the spare top bits of bytes 0-7. Worked on as three 32-bit words (llama.cpp's kmask trick).

    Returns (scales, mins): int64 words whose byte j is sub-block j's value.
    """
    a = _u32(row, o)
    b = _u32(row, o + 4)
    c = _u32(row, o + 8)
    sc = (a & 0x3F3F3F3F) | (((c & 0x0F0F0F0F) | (((a >> 6) & 0x03030303) << 4)) << 32)
    mn = (b & 0x3F3F3F3F) | ((((c >> 4) & 0x0F0F0F0F) | (((b >> 6) & 0x03030303) << 4)) << 32)
    return sc, mn


@njit(cache=True, inline="always")
def _scales_q3_K(row, o):
    """Q3_K: the 16 six-bit scales (stored + 32) packed in the 12 bytes row[o:o+12].

    Bit layout (A..P = sub-blocks 0..15; as gguf-py's Q3_K):
        byte  0 IIIIAAAA    4 MMMMEEEE    8 MMIIEEAA
              1 JJJJBBBB    5 NNNNFFFF    9 NNJJFFBB
              2 KKKKCCCC    6 OOOOGGGG   10 OOKKGGCC
              3 LLLLDDDD    7 PPPPHHHH   11 PPLLHHDD
    Low 4 bits of scale s: byte s % 8, nibble s // 8; top 2 bits: byte 8 + s % 4, bit pair s // 4.

    Returns (lo, hi): int64 words whose byte j is the stored (unsigned) scale j, resp. j + 8.
    """
    a = _u32(row, o)
    b = _u32(row, o + 4)
    c = _u32(row, o + 8)
    s0 = (a & 0x0F0F0F0F) | ((c & 0x03030303) << 4)
    s4 = (b & 0x0F0F0F0F) | (((c >> 2) & 0x03030303) << 4)
    s8 = ((a >> 4) & 0x0F0F0F0F) | (((c >> 4) & 0x03030303) << 4)
    s12 = ((b >> 4) & 0x0F0F0F0F) | (((c >> 6) & 0x03030303) << 4)
    return s0 | (s4 << 32), s8 | (s12 << 32)


@njit(cache=True, inline="always")
def _byte(word, j):
    return np.int32((word >> (8 * j)) & 0xFF)


# ----------------------------------------------------------------------------------------------------
# Dequantization: out[r, 256b + v] = weight v of block b of row r, in gguf-py's float32 operation order
# ((d * scale) * q - dmin * min). The bit layouts are drawn where they are unpacked.


_DEQ_SHAPE = "dequantize: weight row bytes do not match the output shape (or rows not contiguous)"


@njit(parallel=True, cache=True)
def dequantize_q2_K(w, out):
    # qs[64] @16 in two halves of 32 bytes; byte l of half n holds the 2-bit quants of values
    #   v = 128n + 32j + l   in bits 2j+1..2j   (j = 0..3):  [ j=3 | j=2 | j=1 | j=0 ]
    # Sub-block s = v // 16 has scale = scales[s] & 15 and min = scales[s] >> 4.
    check_rows(w, out.shape[0], out.shape[1], QK_K, Q2_K_BYTES, _DEQ_SHAPE)
    for r in prange(w.shape[0]):
        row, y = w[r], out[r]
        for blk in range(out.shape[1] // QK_K):
            o = blk * Q2_K_BYTES
            d = f16_at(row, o + 80)
            dmin = f16_at(row, o + 82)
            for n in range(2):
                for half in range(2):  # l in [16 half, 16 half + 16) lies in sub-block 8n + 2j + half
                    s0, s1, s2, s3 = row[o + 8 * n + half], row[o + 8 * n + half + 2], row[o + 8 * n + half + 4], row[o + 8 * n + half + 6]
                    d0, m0 = d * np.float32(s0 & 0xF), dmin * np.float32(s0 >> 4)
                    d1, m1 = d * np.float32(s1 & 0xF), dmin * np.float32(s1 >> 4)
                    d2, m2 = d * np.float32(s2 & 0xF), dmin * np.float32(s2 >> 4)
                    d3, m3 = d * np.float32(s3 & 0xF), dmin * np.float32(s3 >> 4)
                    v = blk * QK_K + 128 * n
                    for l in range(16 * half, 16 * half + 16):
                        q = row[o + 16 + 32 * n + l]
                        y[v + l] = d0 * np.float32(q & 3) - m0
                        y[v + 32 + l] = d1 * np.float32((q >> 2) & 3) - m1
                        y[v + 64 + l] = d2 * np.float32((q >> 4) & 3) - m2
                        y[v + 96 + l] = d3 * np.float32(q >> 6) - m3


@njit(parallel=True, cache=True)
def dequantize_q3_K(w, out):
    # Low 2 bits: qs[64] @32, laid out as Q2_K's. Third bit: hmask[32] @0, byte l, bit 4n + j, for
    # value v = 128n + 32j + l. The quant is low2 - 4 when that bit is CLEAR, else low2 (-4..3).
    check_rows(w, out.shape[0], out.shape[1], QK_K, Q3_K_BYTES, _DEQ_SHAPE)
    for r in prange(w.shape[0]):
        row, y = w[r], out[r]
        for blk in range(out.shape[1] // QK_K):
            o = blk * Q3_K_BYTES
            d = f16_at(row, o + 108)
            lo, hi = _scales_q3_K(row, o + 96)
            for n in range(2):
                sw = hi if n else lo  # scales 8n .. 8n + 7
                for half in range(2):  # l in [16 half, 16 half + 16) lies in sub-block 8n + 2j + half
                    d0 = d * np.float32(_byte(sw, half) - 32)
                    d1 = d * np.float32(_byte(sw, half + 2) - 32)
                    d2 = d * np.float32(_byte(sw, half + 4) - 32)
                    d3 = d * np.float32(_byte(sw, half + 6) - 32)
                    v = blk * QK_K + 128 * n
                    for l in range(16 * half, 16 * half + 16):
                        q = np.int32(row[o + 32 + 32 * n + l])
                        h = np.int32(row[o + l]) >> (4 * n)
                        y[v + l] = d0 * np.float32((q & 3) - 4 + 4 * (h & 1))
                        y[v + 32 + l] = d1 * np.float32(((q >> 2) & 3) - 4 + 2 * (h & 2))
                        y[v + 64 + l] = d2 * np.float32(((q >> 4) & 3) - 4 + (h & 4))
                        y[v + 96 + l] = d3 * np.float32((q >> 6) - 4 + ((h & 8) >> 1))


@njit(parallel=True, cache=True)
def dequantize_q4_K(w, out):
    # qs[128] @16 in four groups of 32 bytes; byte l of group j holds
    #   [ value 64j + 32 + l (sub-block 2j+1) | value 64j + l (sub-block 2j) ]   4 bits each, 0..15
    check_rows(w, out.shape[0], out.shape[1], QK_K, Q4_K_BYTES, _DEQ_SHAPE)
    for r in prange(w.shape[0]):
        row = w[r]
        for blk in range(out.shape[1] // QK_K):
            o = blk * Q4_K_BYTES
            d = f16_at(row, o)
            dmin = f16_at(row, o + 2)
            sc, mn = _scale_min_k4(row, o + 4)
            for j in range(4):
                d1 = d * np.float32(_byte(sc, 2 * j))
                m1 = dmin * np.float32(_byte(mn, 2 * j))
                d2 = d * np.float32(_byte(sc, 2 * j + 1))
                m2 = dmin * np.float32(_byte(mn, 2 * j + 1))
                y = blk * QK_K + 64 * j
                for l in range(32):
                    q = row[o + 16 + 32 * j + l]
                    out[r, y + l] = d1 * np.float32(q & 0xF) - m1
                    out[r, y + 32 + l] = d2 * np.float32(q >> 4) - m2


@njit(parallel=True, cache=True)
def dequantize_q5_K(w, out):
    # Low 4 bits: qs[128] @48, laid out as Q4_K's. Fifth bit (+16): qh[32] @16, byte l, bit s, for
    # value v = 32s + l (s = sub-block 0..7). Quants 0..31.
    check_rows(w, out.shape[0], out.shape[1], QK_K, Q5_K_BYTES, _DEQ_SHAPE)
    for r in prange(w.shape[0]):
        row = w[r]
        for blk in range(out.shape[1] // QK_K):
            o = blk * Q5_K_BYTES
            d = f16_at(row, o)
            dmin = f16_at(row, o + 2)
            sc, mn = _scale_min_k4(row, o + 4)
            for j in range(4):
                d1 = d * np.float32(_byte(sc, 2 * j))
                m1 = dmin * np.float32(_byte(mn, 2 * j))
                d2 = d * np.float32(_byte(sc, 2 * j + 1))
                m2 = dmin * np.float32(_byte(mn, 2 * j + 1))
                y = blk * QK_K + 64 * j
                for l in range(32):
                    q = row[o + 48 + 32 * j + l]
                    h = row[o + 16 + l]
                    out[r, y + l] = d1 * np.float32((q & 0xF) | (((h >> (2 * j)) & 1) << 4)) - m1
                    out[r, y + 32 + l] = d2 * np.float32((q >> 4) | (((h >> (2 * j + 1)) & 1) << 4)) - m2


@njit(parallel=True, cache=True)
def dequantize_q6_K(w, out):
    # Two halves of 128 values; half n has ql = 64 bytes @64n and qh = 32 bytes @128 + 32n. Value
    # v = 128n + 32k + l (k = 0..3, l = 0..31) is stored unsigned (0..63) as
    #   low 4 bits:  ql[32 * (k & 1) + l], nibble k >> 1    ql byte: [ k=2|3 | k=0|1 ]
    #   high 2 bits: qh[l], bits 2k+1..2k                    qh byte: [ k=3 | k=2 | k=1 | k=0 ]
    # and the quant is stored - 32. Sub-block v // 16 has the int8 scale scales[v // 16] (@192).
    check_rows(w, out.shape[0], out.shape[1], QK_K, Q6_K_BYTES, _DEQ_SHAPE)
    for r in prange(w.shape[0]):
        row, y = w[r], out[r]
        for blk in range(out.shape[1] // QK_K):
            o = blk * Q6_K_BYTES
            d = f16_at(row, o + 208)
            for n in range(2):
                for half in range(2):  # l in [16 half, 16 half + 16) lies in sub-block 8n + 2k + half
                    d0 = d * np.float32(np.int8(row[o + 192 + 8 * n + half]))
                    d1 = d * np.float32(np.int8(row[o + 194 + 8 * n + half]))
                    d2 = d * np.float32(np.int8(row[o + 196 + 8 * n + half]))
                    d3 = d * np.float32(np.int8(row[o + 198 + 8 * n + half]))
                    v = blk * QK_K + 128 * n
                    for l in range(16 * half, 16 * half + 16):
                        a = np.int32(row[o + 64 * n + l])
                        c = np.int32(row[o + 64 * n + 32 + l])
                        h = np.int32(row[o + 128 + 32 * n + l])
                        y[v + l] = d0 * np.float32(((a & 0xF) | ((h & 3) << 4)) - 32)
                        y[v + 32 + l] = d1 * np.float32(((c & 0xF) | (((h >> 2) & 3) << 4)) - 32)
                        y[v + 64 + l] = d2 * np.float32(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                        y[v + 96 + l] = d3 * np.float32(((c >> 4) | ((h >> 6) << 4)) - 32)


# ----------------------------------------------------------------------------------------------------
# Q8_K: the activation format of every K-quant dot product (quantize_row_q8_K_ref).


@njit(cache=True)
def quantize_q8_K(x, qs, d, bsums):
    """x float32[n*256] -> qs int8[n*256], d float32[n], bsums int16[n*16] (sums of 16 qs).

    Per block the value of largest magnitude (the first, on ties) maps to -127: iscale = -127/max,
    q = round-half-even(iscale * x) in float32 (llama.cpp's nearest_int), d = 1/iscale. No fastmath, so
    the division and the rounding are llama.cpp's exactly.
    """
    for i in range(x.shape[0] // QK_K):
        base = i * QK_K
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        for j in range(QK_K):
            ax = abs(x[base + j])
            if ax > amax:
                amax = ax
                mx = x[base + j]
        if amax == 0:
            d[i] = 0
            qs[base : base + QK_K] = 0
            bsums[16 * i : 16 * i + 16] = 0
            continue
        iscale = np.float32(-127.0) / mx
        for j in range(QK_K):
            qs[base + j] = np.int8(min(np.rint(iscale * x[base + j]), np.float32(127.0)))
        for j in range(16):
            s = 0
            for l in range(16):
                s += qs[base + 16 * j + l]
            bsums[16 * i + j] = s
        d[i] = np.float32(1.0) / iscale


@njit(cache=True)
def _prepare(ws, x, outs, size):
    """Shape checks of each weight in the tuple ws against its output in outs (float32[n, rows]), then x
    float32[n, cols] -> Q8_K rows (qs int8[n, cols], d float32[n, nb], bsums int16[n, nb*16])."""
    n, cols = x.shape
    for m in range(len(ws)):
        if outs[m].shape[0] != n:
            raise ValueError("matvec: outputs are not [tokens, rows]")
        check_rows(ws[m], outs[m].shape[1], cols, QK_K, size,
                   "matvec: weight row bytes do not match the activation length (or rows not contiguous)")
    nb = cols // QK_K
    qs = np.empty((n, nb * QK_K), np.int8)
    d = np.empty((n, nb), np.float32)
    bsums = np.empty((n, nb * 16), np.int16)
    for t in range(n):
        quantize_q8_K(x[t], qs[t], d[t], bsums[t])
    return qs, d, bsums


# ----------------------------------------------------------------------------------------------------
# The row dot in LLVM IR


def _ir_scale_words(b, blk, kind):
    """IR: the two int64 scale words of the super-block at byte pointer blk, as _scale_min_k4 (Q4_K/Q5_K:
    scales, mins) and _scales_q3_K (Q3_K: scales 0-7, 8-15) compute them; zeros for the other types."""
    if kind not in ("q3_K", "q4_K", "q5_K"):
        zero = ir.Constant(_I64, 0)
        return zero, zero
    at = 96 if kind == "q3_K" else 4
    a, bw, c = (b.zext(_load(b, blk, at + 4 * i, _I32), _I64) for i in range(3))  # _u32's a, b, c

    def k(v):
        return ir.Constant(_I64, v)

    def bits(v, shift, mask):  # (v >> shift) & mask
        return b.and_(b.lshr(v, k(shift)) if shift else v, k(mask))

    if kind == "q3_K":
        s0 = b.or_(bits(a, 0, 0x0F0F0F0F), b.shl(bits(c, 0, 0x03030303), k(4)))
        s4 = b.or_(bits(bw, 0, 0x0F0F0F0F), b.shl(bits(c, 2, 0x03030303), k(4)))
        s8 = b.or_(bits(a, 4, 0x0F0F0F0F), b.shl(bits(c, 4, 0x03030303), k(4)))
        s12 = b.or_(bits(bw, 4, 0x0F0F0F0F), b.shl(bits(c, 6, 0x03030303), k(4)))
        return b.or_(s0, b.shl(s4, k(32))), b.or_(s8, b.shl(s12, k(32)))
    sc = b.or_(bits(a, 0, 0x3F3F3F3F), b.shl(b.or_(bits(c, 0, 0x0F0F0F0F), b.shl(bits(a, 6, 0x03030303), k(4))), k(32)))
    mn = b.or_(bits(bw, 0, 0x3F3F3F3F), b.shl(b.or_(bits(c, 4, 0x0F0F0F0F), b.shl(bits(bw, 6, 0x03030303), k(4))), k(32)))
    return sc, mn


def _word_bytes(b, w0, w1):
    """Two int64 words of packed byte values (see _scale_min_k4) -> <16 x i16>, zero-extended."""
    v = b.insert_element(ir.Constant(_vec(2, _I64), None), w0, ir.Constant(_I32, 0))
    v = b.insert_element(v, w1, ir.Constant(_I32, 1))
    return b.zext(b.bitcast(v, _vec(16, _I8)), _vec(16, _I16))


# Per type: how to get its quants (eight <32 x i8> of unsigned u, values 32g..32g+31 in order), its
# per-16-values scales and mins as <16 x i16>, its offset (q = u - offset) and fp16 fields. A type's quants
# come in parts (the runs of bytes its layout repeats), so that a kernel may loop over the parts in IR: p is
# an IR i64 (a constant when the caller unrolls), and a part gives its 8 / parts groups in order.


def _at(b, base, stride, p):
    """IR i64: base + stride * p."""
    return b.add(ir.Constant(_I64, base), b.mul(p, ir.Constant(_I64, stride)))


def _bit_run(b, v, shift, mask):
    """(v >> shift) & mask per byte of <32 x i8> v, shift an IR i64 (mask < 2**(8 - shift)). Shifted in
    16-bit lanes, one instruction for a shift known only at run time; the mask drops the neighbour's bits."""
    w = b.lshr(b.bitcast(v, _vec(16, _I16)), _splat_value(b, b.trunc(shift, _I16), 16))
    return b.and_(b.bitcast(w, _vec(32, _I8)), _splat(_I8, 32, mask))


def _quants_q2_K(b, blk, p):
    # as dequantize_q2_K: value 128n + 32j + l in bits 2j+1..2j of qs byte 32n + l (part n)
    qs = _load(b, blk, _at(b, 16, 32, p), _vec(32, _I8))
    return [b.and_(b.lshr(qs, _splat(_I8, 32, 2 * j)), _splat(_I8, 32, 3)) for j in range(4)]


def _quants_q3_K(b, blk, p):
    # as dequantize_q3_K (part n), with u = low2 + 4 * hbit (0..7) and q = u - 4
    hm = _load(b, blk, 0, _vec(32, _I8))
    qs = _load(b, blk, _at(b, 32, 32, p), _vec(32, _I8))
    out = []
    for j in range(4):
        low = b.and_(b.lshr(qs, _splat(_I8, 32, 2 * j)), _splat(_I8, 32, 3))
        hb = _bit_run(b, hm, _at(b, j, 4, p), 1)
        out.append(b.or_(low, b.shl(hb, _splat(_I8, 32, 2))))
    return out


def _quants_q4_K(b, blk, p):
    # as dequantize_q4_K: group j's 32 bytes hold values 64j.. (low nibbles) and 64j+32.. (high) (part j)
    qs = _load(b, blk, _at(b, 16, 32, p), _vec(32, _I8))
    return [b.and_(qs, _splat(_I8, 32, 0xF)), b.lshr(qs, _splat(_I8, 32, 4))]


def _quants_q5_K(b, blk, p):
    # as dequantize_q5_K: Q4_K's nibbles (@48) plus bit g of qh byte l (@16) as +16, g = v // 32 (part j:
    # g = 2j, 2j + 1)
    qh = _load(b, blk, 16, _vec(32, _I8))
    qs = _load(b, blk, _at(b, 48, 32, p), _vec(32, _I8))
    out = []
    for e, nib in enumerate((b.and_(qs, _splat(_I8, 32, 0xF)), b.lshr(qs, _splat(_I8, 32, 4)))):
        hb = _bit_run(b, qh, _at(b, e, 2, p), 1)
        out.append(b.or_(nib, b.shl(hb, _splat(_I8, 32, 4))))
    return out


def _quants_q6_K(b, blk, p):
    # as dequantize_q6_K (part n): u = nibble (k >> 1) of ql[32(k & 1) + l] | bits 2k+1..2k of qh[l] << 4
    ql = [_load(b, blk, _at(b, 32 * i, 64, p), _vec(32, _I8)) for i in range(2)]
    qh = _load(b, blk, _at(b, 128, 32, p), _vec(32, _I8))
    out = []
    for k in range(4):
        lo = ql[k & 1]
        lo = b.lshr(lo, _splat(_I8, 32, 4)) if k >> 1 else b.and_(lo, _splat(_I8, 32, 0xF))
        hi = b.and_(b.lshr(qh, _splat(_I8, 32, 2 * k)), _splat(_I8, 32, 3))
        out.append(b.or_(lo, b.shl(hi, _splat(_I8, 32, 4))))
    return out


def _all_quants(b, blk, kind):
    """The eight <32 x i8> of a super-block, every part unrolled."""
    quants, parts = _TYPES[kind][0], _PARTS[kind]
    return [u for p in range(parts) for u in quants(b, blk, ir.Constant(_I64, p))]


def _scales_16(b, blk, kind):
    """-> (scale, min or None) per 16-value sub-block, <16 x i16> each."""
    w0, w1 = _ir_scale_words(b, blk, kind)
    if kind == "q2_K":
        s = _load(b, blk, 0, _vec(16, _I8))
        return (b.zext(b.and_(s, _splat(_I8, 16, 0xF)), _vec(16, _I16)),
                b.zext(b.lshr(s, _splat(_I8, 16, 4)), _vec(16, _I16)))
    if kind == "q3_K":
        return b.sub(_word_bytes(b, w0, w1), _splat(_I16, 16, 32)), None
    if kind == "q6_K":
        return b.sext(_load(b, blk, 192, _vec(16, _I8)), _vec(16, _I16)), None
    # q4_K, q5_K: 8 sub-blocks of 32; w0 = scales, w1 = mins; each covers two sixteens
    both = _word_bytes(b, w0, w1)
    return _shuffle(b, both, [i // 2 for i in range(16)]), _shuffle(b, both, [8 + i // 2 for i in range(16)])


_TYPES = {  # kind: (quant emitter, offset, d field, dmin field or None)
    "q2_K": (_quants_q2_K, 0, 80, 82),
    "q3_K": (_quants_q3_K, 4, 108, None),
    "q4_K": (_quants_q4_K, 0, 0, 2),
    "q5_K": (_quants_q5_K, 0, 0, 2),
    "q6_K": (_quants_q6_K, 32, 208, None),
}
_PARTS = {"q2_K": 2, "q3_K": 2, "q4_K": 4, "q5_K": 4, "q6_K": 2}  # parts per super-block (8 groups in all)


@intrinsic
def _row_dot(typingctx, row, qx, dx, bsums, t0, out, i, spec):
    """out[t0 + j, i] for j < nt = one weight row (u8[row_bytes]) times Q8_K activation rows t0 + j (qx
    i8[n, cols], dx f32[n, nb], bsums i16[n, nb*16]; out f32[n, rows]), as ggml_vec_dot_q*_K_q8_K's AVX2
    code. Per super-block the int32 lanes sumi (quants times scales, less the offset term) and, for the
    types with mins, msum (mins times bsums) are exact; then acc += (d*d_x) * sumi and acc_m += (dmin*d_x)
    * msum, two <8 x float> accumulators per token as ggml's acc and acc_m (one rounding each, FMA); a
    token's result is the lane sum of acc - acc_m, taken once at the row's end. The quants and scales of
    a super-block are unpacked once for the nt tokens; each token's bits are those of nt = 1. spec: a
    specialisation's literal (kind, avx2, f16c, nt) -- the type (a _TYPES key), the instructions the
    code may use, the tokens per call."""
    layout = literal_values(spec)
    if layout is None:
        return None
    kind, avx2, f16c, nt = layout
    quants, offset, d_at, dmin_at = _TYPES[kind]
    size = GGML_QUANT_SIZES[GGMLQuantizationType[kind.upper()]][1]

    def codegen(context, b, signature, args):
        arow, aqx, adx, abs_, aout = [context.make_array(signature.args[k])(context, b, args[k]) for k in (0, 1, 2, 3, 5)]
        t0, i = args[4], args[6]
        rowp = b.bitcast(arow.data, _I8.as_pointer())

        def row_ptr(arr, t):  # byte pointer to row t0 + t of a 2-D array
            at = b.mul(b.add(t0, ir.Constant(_I64, t)), b.extract_value(arr.strides, 0))
            return b.gep(b.bitcast(arr.data, _I8.as_pointer()), [at])

        xqps = [row_ptr(aqx, t) for t in range(nt)]
        dxps = [b.bitcast(row_ptr(adx, t), _F32.as_pointer()) for t in range(nt)]
        bsps = [row_ptr(abs_, t) for t in range(nt)]
        nb = b.extract_value(adx.shape, 1)
        zero8 = ir.Constant(_vec(8, _F32), [0.0] * 8)
        accs = [cgutils.alloca_once_value(b, zero8) for _ in range(nt)]
        accs_m = [cgutils.alloca_once_value(b, zero8) for _ in range(nt)]
        parts = _PARTS[kind]
        scg_tab = cgutils.alloca_once(b, ir.ArrayType(_vec(16, _I16), 8))  # the groups' scale vectors
        sumi_at = [cgutils.alloca_once(b, _vec(8, _I32)) for _ in range(nt)]
        with cgutils.for_range(b, nb) as loop:
            blk = loop.index
            at = b.mul(blk, ir.Constant(_I64, size))
            wb = b.gep(rowp, [at])
            _prefetch(b, rowp, at, size)
            xbs = [b.gep(xqp, [b.mul(blk, ir.Constant(_I64, QK_K))]) for xqp in xqps]
            bss = [_load(b, bsp, b.mul(blk, ir.Constant(_I64, 32)), _vec(16, _I16)) for bsp in bsps]
            sc, mn = _scales_16(b, wb, kind)
            # pair sums k < 8 of group g lie in sixteen 2g, k >= 8 in sixteen 2g + 1
            scgs = [_shuffle(b, sc, [2 * g] * 8 + [2 * g + 1] * 8) for g in range(8)]
            zero = ir.Constant(_vec(8, _I32), [0] * 8)

            def group_dot(u, t, at, scg):  # int32 lanes: group u of the weights times token t's values at `at`
                return _madd(b, _maddubs(b, u, _load(b, xbs[t], at, _vec(32, _I8)), avx2), scg, avx2)

            if nt == 1:  # unrolled whole: one token keeps few vectors live
                sumi = [zero]
                for g, u in enumerate(_all_quants(b, wb, kind)):
                    sumi[0] = b.add(sumi[0], group_dot(u, 0, 32 * g, scgs[g]))
            else:  # the parts as an IR loop: unrolled whole, LLVM spilled the weight vectors between tokens
                for g in range(8):
                    b.store(scgs[g], b.gep(scg_tab, [ir.Constant(_I32, 0), ir.Constant(_I32, g)]))
                for t in range(nt):
                    b.store(zero, sumi_at[t])
                with _loop_kept(b, parts) as p:
                    sumi = [b.load(sumi_at[t]) for t in range(nt)]
                    for e, u in enumerate(quants(b, wb, p)):
                        g = _at(b, e, 8 // parts, p)
                        scg = b.load(b.gep(scg_tab, [ir.Constant(_I32, 0), g]))
                        for t in range(nt):
                            sumi[t] = b.add(sumi[t], group_dot(u, t, b.mul(g, ir.Constant(_I64, 32)), scg))
                    for t in range(nt):
                        b.store(sumi[t], sumi_at[t])
                sumi = [b.load(sumi_at[t]) for t in range(nt)]
            d = ir_half_at(b, wb, d_at, f16c)
            dmin = ir_half_at(b, wb, dmin_at, f16c) if dmin_at is not None else None
            for t in range(nt):
                s = sumi[t]
                if offset:  # q = u - offset: subtract offset * sum_s scale_s * bsums_s
                    s = b.sub(s, b.mul(_madd(b, sc, bss[t], avx2), _splat(_I32, 8, offset)))
                dxv = b.load(b.gep(dxps[t], [blk]))
                a = _contract(b.fadd(b.load(accs[t]), _contract(b.fmul(b.sitofp(s, _vec(8, _F32)),
                                                                       _splat_value(b, b.fmul(d, dxv), 8)))))
                b.store(a, accs[t])
                if dmin is not None:
                    msum = b.sitofp(_madd(b, mn, bss[t], avx2), _vec(8, _F32))
                    m = _contract(b.fadd(b.load(accs_m[t]), _contract(b.fmul(msum, _splat_value(b, b.fmul(dmin, dxv), 8)))))
                    b.store(m, accs_m[t])
        for t in range(nt):
            v = b.fsub(b.load(accs[t]), b.load(accs_m[t]))
            for n in (4, 2, 1):  # horizontal sum of the 8 lanes
                v = b.fadd(_shuffle(b, v, range(n)), _shuffle(b, v, range(n, 2 * n)))
            op = b.bitcast(row_ptr(aout, t), _F32.as_pointer())
            b.store(b.extract_element(v, ir.Constant(_I32, 0)), b.gep(op, [i]))
        return context.get_dummy_value()

    return types.void(row, qx, dx, bsums, t0, out, i, spec), codegen


@intrinsic
def _pack_block(typingctx, row, o, q, sc, mc, d, dm, r, blk, spec):
    """Unpack the weight super-block at row[o:] into row r (0..7) of a packed 8-row group, super-block blk
    (gemm.py's K layout): q uint8[nbk*2048] gets the unsigned quants u, 4 at a time, at 2048 blk + 32 step
    + 4r (step = value // 4); sc int16[nbk*256] the 16 scales, each twice, at 256 blk + 16 s + 2r (+1);
    mc int16[nbk*128] the coefficients of the activation sums of 16 (the mins, or offset * scale for
    Q3_K/Q6_K, whose q = u - offset) at 128 blk + 16 (s // 2) + 2r + s % 2; d / dm float32[nbk*8] the
    row's d / dmin at 8 blk + r. spec: (kind, avx2, f16c), as _row_dot's."""
    layout = literal_values(spec)
    if layout is None:
        return None
    kind, _, f16c = layout
    quants, offset, d_at, dmin_at = _TYPES[kind]

    def codegen(context, b, signature, args):
        data = [b.bitcast(context.make_array(signature.args[i])(context, b, args[i]).data, _I8.as_pointer())
                for i in (0, 2, 3, 4, 5, 6)]
        rowp, qp, scp, mcp, dp, dmp = data
        o_, r_, blk_ = args[1], args[7], args[8]
        wb = b.gep(rowp, [o_])

        def store(ptr, at, value):
            b.store(value, b.bitcast(b.gep(ptr, [at]), value.type.as_pointer()), align=1)

        qbase = b.add(b.mul(blk_, ir.Constant(_I64, 2048)), b.mul(r_, ir.Constant(_I64, 4)))
        for j, u in enumerate(_all_quants(b, wb, kind)):
            u4 = b.bitcast(u, _vec(8, _I32))
            for g in range(8):
                store(qp, b.add(qbase, ir.Constant(_I64, 256 * j + 32 * g)), b.extract_element(u4, ir.Constant(_I32, g)))
        scv, mnv = _scales_16(b, wb, kind)
        coef = b.mul(scv, _splat(_I16, 16, offset)) if offset else mnv
        two_r = b.mul(r_, ir.Constant(_I64, 2))
        for s_ in range(16):
            sv = b.extract_element(scv, ir.Constant(_I32, s_))
            at = b.mul(b.add(b.add(b.mul(blk_, ir.Constant(_I64, 256)), ir.Constant(_I64, 16 * s_)), two_r), ir.Constant(_I64, 2))
            store(scp, at, sv)
            store(scp, b.add(at, ir.Constant(_I64, 2)), sv)
            at = b.add(b.add(b.mul(blk_, ir.Constant(_I64, 128)), ir.Constant(_I64, 16 * (s_ // 2) + s_ % 2)), two_r)
            store(mcp, b.mul(at, ir.Constant(_I64, 2)), b.extract_element(coef, ir.Constant(_I32, s_)))
        at = b.mul(b.add(b.mul(blk_, ir.Constant(_I64, 8)), r_), ir.Constant(_I64, 4))
        store(dp, at, ir_half_at(b, wb, d_at, f16c))
        if dmin_at is not None:
            store(dmp, at, ir_half_at(b, wb, dmin_at, f16c))
        return context.get_dummy_value()

    return types.void(row, o, q, sc, mc, d, dm, r, blk, spec), codegen


# ----------------------------------------------------------------------------------------------------
# Matvecs: one factory, one specialisation per type. Rows in parallel, each row one _row_dot (IR).


@functools.cache
def make_matvec(qtype, avx2=X86_AVX2, f16c=F16C):
    """(matvec_many, gemm) for one K-quant type, jitted. matvec_many(ws, x float32[cols], outs): ws a tuple of
    uint8[rows, row_bytes] holding ggml-common.h's block_q*_K, outs the tuple of their float32[rows]; x is
    quantized to Q8_K once, and each block is ggml_vec_dot_q*_K_q8_K. gemm(w, x float32[n, cols], out float32[n, rows]): the same arithmetic for a
    batch, on packed tiles (gemm.py). ValueError when the shapes do not match.

    avx2 / f16c: the instructions the emitted code may use (default: this CPU's); the tests also build the
    target-independent IR (both False) on every machine.
    """
    kind = qtype.name[:2].lower() + "_K"  # the _TYPES key
    spec = (kind, avx2, f16c)  # captured constants only (see qcpu.kernels.specialise)
    size = GGML_QUANT_SIZES[qtype][1]
    name = kind + ("" if (avx2, f16c) == (X86_AVX2, F16C) else f"_avx2{avx2:d}_f16c{f16c:d}")

    spec1, spec2, spec4 = [(*spec, nt) for nt in (1, 2, 4)]  # tokens per _row_dot call

    def matvec(ws, x, outs):
        qx, dx, bsums = _prepare(ws, x, outs, size)
        n = x.shape[0]
        for r in prange(total_rows(ws)):  # each row read from memory once for all n tokens
            m, i = locate_row(ws, r)
            t0 = 0
            while n - t0 >= 4:
                _row_dot(ws[m][i], qx, dx, bsums, t0, outs[m], i, spec4)
                t0 += 4
            if n - t0 >= 2:
                _row_dot(ws[m][i], qx, dx, bsums, t0, outs[m], i, spec2)
                t0 += 2
            if n - t0 == 1:
                _row_dot(ws[m][i], qx, dx, bsums, t0, outs[m], i, spec1)


    # The batched product (gemm.py): super-blocks unpacked per tile into 8-row groups, int8 dots.
    _, offset, _, dmin_at = _TYPES[kind]
    max_q = {"q2_K": 3, "q3_K": 7, "q4_K": 15, "q5_K": 31, "q6_K": 63}[kind]
    group_steps = 8 if kind in ("q4_K", "q5_K") else 4  # scales per 32 values, else per 16
    g1, g2, g_full = [("k", dmin_at is not None, offset != 0, max_q, group_steps, avx2, gemm.RG, rn) for rn in (1, 2, gemm.RN)]

    def batched(w, x, out):
        gemm.check_shapes(w, x, out, QK_K, size)
        n, cols = x.shape
        rows = w.shape[0]
        nbk = cols // QK_K
        xq = np.empty((n, cols), np.int8)
        xd = np.empty((n, nbk), np.float32)
        xb = np.empty((n, nbk * 16), np.int16)
        for t in prange(n):
            quantize_q8_K(x[t], xq[t], xd[t], xb[t])
        per_tile, n_tiles, workers, max_groups = gemm.plan(rows, cols)
        for worker in prange(workers):  # buffers once per worker, tiles dealt round-robin (see gemm.WORKERS)
            q = np.empty((max_groups, nbk * 2048), np.uint8)
            sc = np.zeros((max_groups, nbk * 256), np.int16)
            mc = np.zeros((max_groups, nbk * 128), np.int16)
            d = np.zeros((max_groups, nbk * 8), np.float32)  # padding rows: scale 0, output 0
            dm = np.zeros((max_groups, nbk * 8), np.float32)
            o = np.empty((n, max_groups * gemm.ROWS), np.float32)
            for tile in range(worker, n_tiles, workers):
                r0, nr, groups = gemm.tile_span(tile, rows, per_tile)
                if nr < groups * gemm.ROWS:
                    d[:] = 0
                    dm[:] = 0
                for r in range(nr):
                    row = w[r0 + r]
                    g = r // gemm.ROWS
                    for blk in range(nbk):
                        _pack_block(row, blk * size, q[g], sc[g], mc[g], d[g], dm[g], r % gemm.ROWS, blk, spec)
                gemm.sweep((q, sc, mc, d, dm), (xq, xd, xb), n, cols, groups, o, g_full, g2, g1)
                gemm.scatter(o, out, r0, nr)

    return (specialise(matvec, f"matvec_{name}", parallel=True),
            specialise(batched, f"gemm_{name}", parallel=True))


# Below this many tokens the multi-token matvec beats the packed GEMM, whose tile packing is paid per call
# (AVX2, 2 threads, p25 of 15, GEMM time / multi-token matvec time: 4B ffn_gate Q4_K 6912 x 2560 at 8 / 12 /
# 16 / 24 tokens 1.02 / 0.85 / 0.71 / 0.59, 4B ffn_down Q6_K 1.12 / 0.89 / 0.78 / 0.63; the default model's
# ffn_down Q6_K 896 x 4864, fewer rows to share the packing: 1.39-1.60 / 1.10-1.23 / 1.05-1.07 / 0.88).
GEMM_MIN_TOKENS = 16

_T = GGMLQuantizationType
for _t, _dequantize in ((_T.Q2_K, dequantize_q2_K), (_T.Q3_K, dequantize_q3_K), (_T.Q4_K, dequantize_q4_K),
                        (_T.Q5_K, dequantize_q5_K), (_T.Q6_K, dequantize_q6_K)):
    _matvec, _gemm = make_matvec(_t)
    register(_t, _dequantize, gemm=_gemm, gemm_min_tokens=GEMM_MIN_TOKENS, matvec_many=_matvec)
