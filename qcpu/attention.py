"""Attention over the KV cache: softmax(q.k / sqrt(head_dim)) . v, causal by stream index.

The cache is `k, v` uint8[n_kv_heads, capacity, row_bytes] (cache.py's layout: rows of head_dim values in
the cache type) with `slot_seq[n_slots]`: the stream index of the token in each of the first n_slots
slots (-1: empty). Query i (stream index `query_seq[i]`) sees slot s iff
0 <= slot_seq[s] <= query_seq[i], so the kernels need no particular slot order and accept holes. Only the
slots passed in are visited: the cache passes its used prefix, so the cost follows the tokens held, not
the capacity.

- One query (decode): flash-decoding (Dao et al., 2023). Keys are split into blocks of `BLOCK` slots;
  each (kv head, block) task scores its keys against all the queries of the GQA group; then exps per
  head; then each task sums weights times values and the per-block partial sums are added in block
  order. Both task loops are LLVM IR micro-kernels (_score_keys, _weigh_values) over `STEP` = 8 keys at
  a time: a key is widened (F16C) or unpacked once for the whole group, the 8 keys' dots share one
  horizontal reduction and land as one vector per head, and the masks are vector selects; the sums keep
  floats.dot_f32's / legacy._row_dot's order, so every score is bit for bit theirs.
- Many queries (prefill): tiled online softmax (FlashAttention, Dao et al., 2022): per kv head the
  queries of its group are one [n * group, head_dim] matrix; each tile of `TILE` keys is widened,
  scored by one BLAS matmul, masked only where it can hide something (holes, or keys newer than the
  oldest query), and folded into running reference point / sum / output. Scratch is one tile of
  scores: a few MB whatever the context length.

Roundings: q is rounded to fp16 (llama.cpp converts it to K's type), and so are the weights exp(s - m)
before they multiply V (llama.cpp rounds the normalized probabilities: the same relative error). m is
the row's maximum rounded up to a multiple of ln 2, so moving it as tiles arrive rescales by exact
powers of two and both kernels round every weight identically; the output is divided by the float64
sum of the exps at the end (ggml's soft_max sums in double).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.cache import CENTER_BLOCK, KeyCenters, from_rows, rotate, rotation
from qcpu.kernels import literal_values, specialise
from qcpu.kernels.activations import ACTIVATION_ROUNDING
from qcpu.kernels.cpu import F16C, X86_AVX2
from qcpu.kernels.halves import ir_half_at, ir_half_to_f32, rounded
from qcpu.kernels.legacy import (
    LAYOUTS,
    QK,
    _dot8_avx2,
    _emit_weights,
    offset_sums,
    quantize_q8_0,
)
from qcpu.kernels.llvm_ir import (
    _F32,
    _I8,
    _I16,
    _I32,
    _I64,
    _contract,
    _dot8_portable,
    _lanes,
    _load,
    _splat,
    _splat_value,
    _vec,
)

# Decode attention over more than BLOCK keys but fewer multiply-adds than this (keys x heads x head_dim)
# runs on the calling thread: its three parallel regions cost more in waking the other threads (~50-80
# us each on these VMs once they sleep, after ~60 us idle) than the work. Measured in decode, attention ms
# per token, one thread / three regions on two: default model at 600 tokens 4.6-5.1 / 8.1-12.8 (token
# 40-48 / 45-64 ms), at 2000 7.6-9.8 / 7.1-7.8; the break-even, ~1500 tokens x 896, is about 2**20. Up to
# BLOCK keys the one-region kernel runs on all threads: at 64 tokens, token 31.6-35.0 ms against 32.5-42.1
# serial (its attention is slower, 3.0-3.8 / 2.0-2.5 ms, but the next product finds the threads awake).
SERIAL_MACS = 1 << 20
BLOCK = 256  # keys per decode task: enough tasks for 2..16 threads at 4K+ tokens, little merging
TILE = 512  # keys per prefill tile: a [256 * group, 512] float32 score tile is a few MB
assert TILE % CENTER_BLOCK == 0  # a tile adds back whole blocks of key centers


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, slot_seq: np.ndarray, query_seq: np.ndarray,
              type_k: T = T.F16, type_v: T = T.F16, centers: KeyCenters | None = None) -> np.ndarray:
    """Scaled dot-product attention of q float32[n, n_heads, head_dim] over the cache k, v
    uint8[n_kv_heads, capacity, row_bytes] of types type_k, type_v (slot_seq int64[n_slots], query_seq
    int64[n]: see the module docstring). Returns float32[n, n_heads, head_dim]. n_heads must be a multiple
    of n_kv_heads (GQA). A query that sees no slot gets zeros. Quantized rows are read as cache.py stores
    them: Hadamard-rotated (llama.cpp's attention rotation, `cache.rotation`), and, given `centers`
    (quantized keys only), minus those centers, which are added back."""
    hd = q.shape[-1]
    scale = np.float32(1.0 / math.sqrt(hd))
    type_k, type_v = T(type_k), T(type_v)
    n_cb = -(-len(slot_seq) // CENTER_BLOCK)
    # quantized rows are stored Hadamard-rotated (cache.py): q.(Hk) needs Hq, and sum p (Hv) = H (sum p v)
    rot_k, rot_v = rotation(type_k, hd, keys=True), rotation(type_v, hd, keys=False)
    # q.c_b * scale from the unrounded q: the keys' large shared part loses nothing to q's rounding
    off = None if centers is None else centers.offsets(q, n_cb) * scale  # [n, n_heads, n_cb]
    q = rotate(q, rot_k)
    if q.shape[0] == 1:
        out = _decode(q[0], k, v, slot_seq, int(query_seq[0]), scale, type_k, type_v,
                      None if off is None else off[0])[None]
    else:
        # llama.cpp converts q to K's vec_dot_type first: F16, or Q8_0 for the quantized caches
        q = ACTIVATION_ROUNDING[type_k](q.reshape(-1, hd)).reshape(q.shape)
        out = _prefill(q, k, v, slot_seq, query_seq, scale, type_k, type_v, off)
    return rotate(out, rot_v)


# ---- shared scalar pieces (inlined, so the loops around them vectorize) --------------------------

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split so n * _LN2_HI is exact (Cody and Waite)
_LN2_LO = np.float32(-2.12194440e-4)
_LN2 = np.float32(0.6931471805599453)
_NONE = np.int64(-(1 << 40))  # no reference point yet: nothing seen


@njit(cache=True, inline="always")
def _exp(x):
    """exp(x) for float32 x <= 0 (softmax arguments), 0 below -87 (and for -inf): range reduction
    x = n ln2 + r, |r| <= ln2 / 2, then a degree-6 Taylor polynomial (error < 1.2e-7 relative) scaled by
    2**n through the exponent bits. Branch-free so loops over it vectorize: np.exp/math.exp are calls."""
    xc = max(x, np.float32(-87.0))
    n = np.rint(xc * _LOG2E)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    two_n = np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    return p * two_n if x >= np.float32(-87.0) else np.float32(0.0)


@njit(cache=True, inline="always")
def _round_f16(p):
    """A probability p in [0, 1] rounded to the nearest binary16 value, as a float32 (llama.cpp feeds V
    fp16 probabilities). Below 2**-14 halves are multiples of 2**-24: adding and removing 0.5 rounds
    there (half-even, in float32's own addition). Above, Veltkamp's split with 2**13 + 1 keeps the 11
    leading significand bits, rounded to nearest."""
    sub = (p + np.float32(0.5)) - np.float32(0.5)
    t = p * np.float32(8193.0)
    hi = t - (t - p)
    return sub if p < np.float32(6.103515625e-05) else hi


# ---- decode: one query ---------------------------------------------------------------------------

STEP = 8  # keys per pass: one <8 x float> of scores per head, the lane tree shared by 8 dots
_V8F = _vec(8, _F32)


def _lane_sums(b, vs, adjacent):
    """IR: eight <8 x float> -> one whose lane j is the sum of vs[j]'s lanes, with t_i = l_i + l_(i+4):
    (t0+t1) + (t2+t3) if `adjacent` (floats.dot_f32's tree), else (t0+t2) + (t1+t3) (legacy._row_dot's);
    the shuffles serve all 8 sums at once."""
    second = ([0, 2, 8, 10, 4, 6, 12, 14], [1, 3, 9, 11, 5, 7, 13, 15]) if adjacent else \
        ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
    s = [b.fadd(b.shuffle_vector(vs[i], vs[i + 1], _lanes([0, 1, 2, 3, 8, 9, 10, 11])),
                b.shuffle_vector(vs[i], vs[i + 1], _lanes([4, 5, 6, 7, 12, 13, 14, 15]))) for i in (0, 2, 4, 6)]
    u = [b.fadd(b.shuffle_vector(s[i], s[i + 1], _lanes(second[0])),
                b.shuffle_vector(s[i], s[i + 1], _lanes(second[1]))) for i in (0, 2)]
    w = b.fadd(b.shuffle_vector(u[0], u[1], _lanes([0, 2, 8, 10, 4, 6, 12, 14])),
               b.shuffle_vector(u[0], u[1], _lanes([1, 3, 9, 11, 5, 7, 13, 15])))
    return b.shuffle_vector(w, w, _lanes([0, 4, 1, 5, 2, 6, 3, 7]))


def _i64(v):
    return ir.Constant(_I64, v)


def _ptr(b, arr, ty):
    return b.bitcast(arr.data, ty.as_pointer())


def _min(b, x, y):
    return b.select(b.icmp_signed("<", x, y), x, y)


def _check_arrays(arrays, dtypes):
    return all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == d and a.ndim == n
               for a, (d, n) in zip(arrays, dtypes))


@intrinsic
def _score_keys(typingctx, krows, qf, qq, qd, qc, slot_seq, query_seq, scale, scores, h0, group, lo, hi, work, spec):
    """Scores of keys krows[lo:hi] (uint8[slots, row_bytes], one kv head) against the query heads
    h0..h0+group: scores[h, s] = q_h.k_s * scale, -inf where slot_seq[s] is not in [0, query_seq];
    work float32[group * 73] is scratch, and work[group * 72 + g] gets head h0+g's maximum.

    STEP keys at a time: each key is widened (F16) or unpacked (quantized) once for the whole group,
    dotted with each head into one <8 x float> of partial sums in the order floats.dot_f32 (F16:
    four accumulators over chunks c % 4, then (a0+a2)+(a1+a3)) or legacy._row_dot (even/odd blocks)
    uses; _lane_sums then finishes 8 keys' dots at once, so each score is bit for bit what dot_f32 /
    _row_dot return, and the scores are stored as one vector per head."""
    layout = literal_values(spec)
    if layout is None:
        return None
    hd, k_f16, type_size, has_m, has_qh, nibbles, offset, avx2, f16c = layout
    if has_m or not _check_arrays((krows, qf, qq, qd, qc, slot_seq, scores, work),
                                  [(types.uint8, 2), (types.float32, 2), (types.int8, 2), (types.float32, 2),
                                   (types.int32, 2), (types.int64, 1), (types.float32, 2), (types.float32, 1)]):
        return None
    nb = hd // QK
    row_bytes = hd * 2 if k_f16 else nb * type_size
    signed = not nibbles or (offset != 0 and not avx2)
    sub_offset = offset if avx2 else 0
    dot8 = _dot8_avx2 if avx2 else _dot8_portable
    sig = types.void(krows, qf, qq, qd, qc, slot_seq, query_seq, scale, scores, h0, group, lo, hi, work, spec)

    def codegen(context, b, signature, args):
        ta = signature.args
        kr, qf_, qq_, qd_, qc_, seq_, sc_, wk_ = (context.make_array(ta[i])(context, b, args[i])
                                                 for i in (0, 1, 2, 3, 4, 5, 8, 13))
        query = context.cast(b, args[6], ta[6], types.int64)
        scl = context.cast(b, args[7], ta[7], types.float32)
        h0_, grp, lo_, hi_ = (context.cast(b, args[i], ta[i], types.int64) for i in (9, 10, 11, 12))
        kp = _ptr(b, kr, _I8)
        qfp, qqp, qdp, qcp = _ptr(b, qf_, _F32), _ptr(b, qq_, _I8), _ptr(b, qd_, _F32), _ptr(b, qc_, _I8)
        seqp, scp = _ptr(b, seq_, _I64), _ptr(b, sc_, _F32)
        n_slots = b.extract_value(sc_.shape, 1)
        vbuf = _ptr(b, wk_, _V8F)  # [group * STEP] partial-sum vectors, then [group] running maxima
        best = b.gep(vbuf, [b.mul(grp, _i64(STEP))])
        maxima = b.bitcast(b.gep(best, [grp]), _F32.as_pointer())
        neg_inf = _splat(_F32, 8, float("-inf"))
        with cgutils.for_range(b, grp) as loop:
            b.store(neg_inf, b.gep(best, [loop.index]), align=4)
        zero8 = ir.Constant(_V8F, [0.0] * 8)
        one = _i64(1)
        last = b.sub(hi_, one)
        n_steps = b.lshr(b.add(b.sub(hi_, lo_), _i64(STEP - 1)), _i64(3))
        with cgutils.for_range(b, n_steps) as step:
            s0 = b.add(lo_, b.shl(step.index, _i64(3)))
            for j in range(STEP):
                s = _min(b, b.add(s0, _i64(j)), last)  # past hi: the last key again, masked below
                row = b.gep(kp, [b.mul(s, _i64(row_bytes))])
                if k_f16:
                    kc = [ir_half_to_f32(b, _load(b, row, 16 * c, _vec(8, _I16)), f16c) for c in range(hd // 8)]
                else:
                    blks = [b.gep(row, [_i64(i * type_size)]) for i in range(nb)]
                    wq = [_emit_weights(b, blk, has_m, has_qh, nibbles, offset - sub_offset) for blk in blks]
                    dk = [ir_half_at(b, blk, 0, f16c) for blk in blks]
                with cgutils.for_range(b, grp) as heads:
                    h = b.add(h0_, heads.index)
                    if k_f16:
                        qrow = b.gep(qfp, [b.mul(h, _i64(hd))])
                        accs = [zero8] * 4
                        for c in range(hd // 8):
                            y = b.load(b.bitcast(b.gep(qrow, [_i64(8 * c)]), _V8F.as_pointer()), align=4)
                            accs[c % 4] = _contract(b.fadd(_contract(b.fmul(kc[c], y)), accs[c % 4]))
                        v = b.fadd(b.fadd(accs[0], accs[2]), b.fadd(accs[1], accs[3]))
                    else:
                        xrow = b.gep(qqp, [b.mul(h, _i64(hd))])
                        crow = b.gep(qcp, [b.mul(h, _i64(hd))])  # hd / 4 int32 per head
                        drow = b.gep(qdp, [b.mul(h, _i64(nb))])
                        accs = [zero8] * 2
                        for i in range(nb):
                            xv = _load(b, xrow, 32 * i, _vec(32, _I8))
                            s8 = dot8(b, wq[i], xv, signed)
                            if sub_offset:
                                s8 = b.sub(s8, _load(b, crow, 32 * i, _vec(8, _I32)))
                            scale_i = b.fmul(dk[i], b.load(b.gep(drow, [_i64(i)])))
                            term = _contract(b.fmul(b.sitofp(s8, _V8F), _splat_value(b, scale_i, 8)))
                            accs[i % 2] = _contract(b.fadd(accs[i % 2], term))
                        v = b.fadd(accs[0], accs[1])
                    b.store(v, b.gep(vbuf, [b.add(b.mul(heads.index, _i64(STEP)), _i64(j))]), align=4)
            n = b.sub(hi_, s0)
            hidden = ir.Constant(_vec(8, ir.IntType(1)), None)
            for j in range(STEP):
                seq = b.load(b.gep(seqp, [_min(b, b.add(s0, _i64(j)), last)]))
                off = b.or_(b.or_(b.icmp_signed("<", seq, _i64(0)), b.icmp_signed(">", seq, query)),
                            b.icmp_signed("<=", n, _i64(j)))
                hidden = b.insert_element(hidden, off, ir.Constant(_I32, j))
            full = b.icmp_signed(">=", n, _i64(STEP))
            with cgutils.for_range(b, grp) as heads:
                h = b.add(h0_, heads.index)
                base = b.mul(heads.index, _i64(STEP))
                vs = [b.load(b.gep(vbuf, [b.add(base, _i64(j))]), align=4) for j in range(STEP)]
                x = b.fmul(_lane_sums(b, vs, k_f16), _splat_value(b, scl, 8))
                x = b.select(hidden, neg_inf, x)
                bp = b.gep(best, [heads.index])
                old = b.load(bp, align=4)
                b.store(b.select(b.fcmp_ordered(">", x, old), x, old), bp, align=4)
                out = b.gep(scp, [b.add(b.mul(h, n_slots), s0)])
                with b.if_else(full) as (whole, part):
                    with whole:
                        b.store(x, b.bitcast(out, _V8F.as_pointer()), align=4)
                    with part:
                        for j in range(STEP):
                            with b.if_then(b.icmp_signed(">", n, _i64(j))):
                                b.store(b.extract_element(x, ir.Constant(_I32, j)), b.gep(out, [_i64(j)]))
        with cgutils.for_range(b, grp) as heads:
            m = b.load(b.gep(best, [heads.index]), align=4)
            top = b.extract_element(m, ir.Constant(_I32, 0))
            for j in range(1, 8):
                e = b.extract_element(m, ir.Constant(_I32, j))
                top = b.select(b.fcmp_ordered(">", e, top), e, top)
            b.store(top, b.gep(maxima, [heads.index]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _weigh_values(typingctx, vrows, probs, out, h0, group, lo, hi, work, spec):
    """out[h0 + g, :] += sum over s in [lo, hi) of probs[h0 + g, s] * v_s (vrows uint8[slots, row_bytes],
    one kv head), each element summed in slot order with FMA contraction (as `acc += p * v` would);
    slots no head of the group weighs (all probs 0: hidden ones) are skipped. work: float32[STEP * hd].

    STEP values at a time are widened (F16C) or dequantized (legacy._row_dequantize's arithmetic) into
    work, then each head's output row stays in registers across them."""
    layout = literal_values(spec)
    if layout is None:
        return None
    hd, v_f16, type_size, has_m, has_qh, nibbles, offset, _, f16c = layout
    if has_m or not _check_arrays((vrows, probs, out, work), [(types.uint8, 2), (types.float32, 2),
                                                             (types.float32, 2), (types.float32, 1)]):
        return None
    nb = hd // QK
    row_bytes = hd * 2 if v_f16 else nb * type_size
    signed = offset != 0 or not nibbles
    sig = types.void(vrows, probs, out, h0, group, lo, hi, work, spec)

    def codegen(context, b, signature, args):
        ta = signature.args
        vr, pr, o_, wk_ = (context.make_array(ta[i])(context, b, args[i]) for i in (0, 1, 2, 7))
        h0_, grp, lo_, hi_ = (context.cast(b, args[i], ta[i], types.int64) for i in (3, 4, 5, 6))
        vp, pp, op, wp = _ptr(b, vr, _I8), _ptr(b, pr, _F32), _ptr(b, o_, _V8F), _ptr(b, wk_, _V8F)
        n_slots = b.extract_value(pr.shape, 1)
        zero8 = ir.Constant(_V8F, [0.0] * 8)
        zero = ir.Constant(_F32, 0.0)
        last = b.sub(hi_, _i64(1))
        n_steps = b.lshr(b.add(b.sub(hi_, lo_), _i64(STEP - 1)), _i64(3))
        with cgutils.for_range(b, n_steps) as step:
            s0 = b.add(lo_, b.shl(step.index, _i64(3)))
            n = b.sub(hi_, s0)
            slots = [_min(b, b.add(s0, _i64(j)), last) for j in range(STEP)]
            live = [b.icmp_signed(">", n, _i64(j)) for j in range(STEP)]
            seen = cgutils.alloca_once_value(b, ir.Constant(_vec(8, ir.IntType(1)), [0] * 8))
            with cgutils.for_range(b, grp) as heads:
                prow = b.gep(pp, [b.mul(b.add(h0_, heads.index), n_slots)])
                p = ir.Constant(_V8F, None)
                for j in range(STEP):
                    p = b.insert_element(p, b.load(b.gep(prow, [slots[j]])), ir.Constant(_I32, j))
                b.store(b.or_(b.load(seen), b.fcmp_unordered("!=", p, zero8)), seen)
            seen_v = b.load(seen)
            for j in range(STEP):
                dst = b.gep(wp, [_i64(j * hd // 8)])
                use = b.and_(b.extract_element(seen_v, ir.Constant(_I32, j)), live[j])
                with b.if_else(use) as (yes, no):
                    with yes:
                        row = b.gep(vp, [b.mul(slots[j], _i64(row_bytes))])
                        if v_f16:
                            for c in range(hd // 8):
                                b.store(ir_half_to_f32(b, _load(b, row, 16 * c, _vec(8, _I16)), f16c),
                                        b.gep(dst, [_i64(c)]), align=4)
                        else:
                            for i in range(nb):
                                blk = b.gep(row, [_i64(i * type_size)])
                                q = _emit_weights(b, blk, has_m, has_qh, nibbles, offset)
                                y = b.fmul((b.sitofp if signed else b.uitofp)(q, _vec(QK, _F32)),
                                           _splat_value(b, ir_half_at(b, blk, 0, f16c), QK))
                                for c in range(4):
                                    b.store(b.shuffle_vector(y, y, _lanes(range(8 * c, 8 * c + 8))),
                                            b.gep(dst, [_i64(4 * i + c)]), align=4)
                    with no:  # nothing weighs it (hidden, or past hi): zeros, whatever the row holds
                        for c in range(hd // 8):
                            b.store(zero8, b.gep(dst, [_i64(c)]), align=4)
            with cgutils.for_range(b, grp) as heads:
                h = b.add(h0_, heads.index)
                orow = b.gep(op, [b.mul(h, _i64(hd // 8))])
                prow = b.gep(pp, [b.mul(h, n_slots)])
                acc = [b.load(b.gep(orow, [_i64(c)]), align=4) for c in range(hd // 8)]
                for j in range(STEP):
                    p = b.select(live[j], b.load(b.gep(prow, [slots[j]])), zero)
                    pv = _splat_value(b, p, 8)
                    for c in range(hd // 8):
                        y = b.load(b.gep(wp, [_i64(j * hd // 8 + c)]), align=4)
                        acc[c] = _contract(b.fadd(acc[c], _contract(b.fmul(pv, y))))
                for c in range(hd // 8):
                    b.store(acc[c], b.gep(orow, [_i64(c)]), align=4)
        return context.get_dummy_value()

    return sig, codegen


@functools.cache
def _decode_kernels(type_k: T, type_v: T, head_dim: int, avx2: bool = X86_AVX2, f16c: bool = F16C):
    """(scores, values, one_block) decode kernels for one pair of cache types and head_dim, jitted once
    (kernels.specialise); avx2 / f16c: the instructions the IR may use (default: this CPU's; the tests
    also build the portable IR, which gives the same numbers).

    scores(q, qq, qd, qc, k, slot_seq, query_seq, scale, off, scores, block_max): scores[n_heads, n_slots] =
      q.k * scale (-inf where hidden), block_max[n_heads, n_blocks] their maxima (_score_keys). F16 keys
      are dotted with the fp16-rounded q; quantized keys as integers with q quantized to Q8_0 (qq, qd;
      qc: Q4_0's offset sums), llama.cpp's vec_dot_q8_0_q8_0 / vec_dot_q4_0_q8_0, then off[h, s //
      CENTER_BLOCK] is added (the key centers' q.c * scale, cache.KeyCenters; unread for F16 keys).
    values(probs, v, partial): partial[n_blocks, n_heads, hd] = sum over each block's slots of p * v
      (_weigh_values).
    one_block(q, qq, qd, qc, k, v, slot_seq, query_seq, scale, off, scores, total, partial): for n_slots <=
      BLOCK, the three steps (scores, _decode_softmax's per-head softmax into total, values into
      partial[0]) in one parallel region, one task per kv head; the same bits as the three.
    """
    k_f16, v_f16 = type_k == T.F16, type_v == T.F16
    # captured constants (the layouts the quantized paths read; unused but typed for F16)
    spec_k = (head_dim, k_f16, *LAYOUTS[T.Q8_0 if k_f16 else type_k], avx2, f16c)
    spec_v = (head_dim, v_f16, *LAYOUTS[T.Q8_0 if v_f16 else type_v], avx2, f16c)
    k_bytes = head_dim * 2 if k_f16 else head_dim // QK * spec_k[2]
    v_bytes = head_dim * 2 if v_f16 else head_dim // QK * spec_v[2]

    def scores_kernel(q, qq, qd, qc, k, slot_seq, query_seq, scale, off, scores, block_max):
        n_heads = q.shape[0]
        n_slots, n_kv = scores.shape[1], k.shape[0]
        group = n_heads // n_kv
        n_blocks = block_max.shape[1]
        if (q.shape[1] != head_dim or k.shape[2] != k_bytes or k.shape[1] < n_slots or slot_seq.shape[0] < n_slots
                or scores.shape[0] != n_heads or block_max.shape[0] != n_heads or n_heads % n_kv):
            raise ValueError("decode scores: shapes do not match")
        for task in prange(n_kv * n_blocks):
            kvh, b = task // n_blocks, task % n_blocks
            work = np.empty(group * (STEP * 9 + 1), dtype=np.float32)
            hi = min(n_slots, (b + 1) * BLOCK)
            _score_keys(k[kvh], q, qq, qd, qc, slot_seq, query_seq, scale, scores, kvh * group, group,
                        b * BLOCK, hi, work, spec_k)
            for g in range(group):
                h = kvh * group + g
                top = work[group * STEP * 9 + g] if k_f16 else _add_offsets(scores, off, h, b * BLOCK, hi)
                block_max[h, b] = top

    def values_kernel(probs, v, partial):
        n_heads, n_slots = probs.shape
        n_kv = v.shape[0]
        group = n_heads // n_kv
        n_blocks = partial.shape[0]
        if (v.shape[2] != v_bytes or v.shape[1] < n_slots or partial.shape[1] != n_heads
                or partial.shape[2] != head_dim or n_heads % n_kv):
            raise ValueError("decode values: shapes do not match")
        for task in prange(n_kv * n_blocks):
            kvh, b = task // n_blocks, task % n_blocks
            work = np.empty(STEP * head_dim, dtype=np.float32)
            out = partial[b]
            for g in range(group):
                out[kvh * group + g, :] = 0.0
            _weigh_values(v[kvh], probs, out, kvh * group, group, b * BLOCK, min(n_slots, (b + 1) * BLOCK),
                          work, spec_v)

    def one_block_kernel(q, qq, qd, qc, k, v, slot_seq, query_seq, scale, off, scores, total, partial):
        # n_slots <= BLOCK: scores, softmax and values of each kv head's group in one task, so the whole
        # attention is one parallel region (the three above cost three wake-ups of the other threads)
        n_heads = q.shape[0]
        n_slots, n_kv = scores.shape[1], k.shape[0]
        group = n_heads // n_kv
        if (q.shape[1] != head_dim or k.shape[2] != k_bytes or v.shape[2] != v_bytes or k.shape[1] < n_slots
                or v.shape[1] < n_slots or slot_seq.shape[0] < n_slots or n_slots > BLOCK or scores.shape[0] != n_heads
                or total.shape[0] != n_heads or partial.shape[0] != 1 or partial.shape[1] != n_heads
                or partial.shape[2] != head_dim or n_heads % n_kv):
            raise ValueError("decode attention: shapes do not match")
        for kvh in prange(n_kv):
            # one scratch for both micro-kernels: the maxima are read before _weigh_values reuses it
            work = np.empty(max(group * (STEP * 9 + 1), STEP * head_dim), dtype=np.float32)
            _score_keys(k[kvh], q, qq, qd, qc, slot_seq, query_seq, scale, scores, kvh * group, group,
                        0, n_slots, work, spec_k)
            out = partial[0]
            for g in range(group):
                h = kvh * group + g
                top = work[group * STEP * 9 + g] if k_f16 else _add_offsets(scores, off, h, 0, n_slots)
                _softmax_row(scores, total, h, top)
                out[h, :] = 0.0
            _weigh_values(v[kvh], scores, out, kvh * group, group, 0, n_slots, work, spec_v)

    name = f"{type_k.name.lower()}_{type_v.name.lower()}_{head_dim}"
    if (avx2, f16c) != (X86_AVX2, F16C):
        name += f"_avx2{avx2:d}_f16c{f16c:d}"
    return (specialise(scores_kernel, f"decode_scores_{name}", parallel=True),
            specialise(values_kernel, f"decode_values_{name}", parallel=True),
            specialise(one_block_kernel, f"decode_one_block_{name}", parallel=True, fastmath={"contract"}))


@njit(cache=True, inline="always")
def _add_offsets(scores, off, h, lo, hi):
    """scores[h, s] += off[h, s // CENTER_BLOCK] for s in [lo, hi) (-inf stays -inf); returns their maximum."""
    top = np.float32(-np.inf)
    for cb in range(lo // CENTER_BLOCK, (hi - 1) // CENTER_BLOCK + 1):
        o = off[h, cb]
        for s in range(max(lo, cb * CENTER_BLOCK), min(hi, (cb + 1) * CENTER_BLOCK)):
            x = scores[h, s] + o
            scores[h, s] = x
            top = max(top, x)
    return top


@njit(cache=True)
def _quantize_heads(q, offset):
    """q float32[n_heads, hd] -> Q8_0 (qq int8[n_heads, hd], qd float32[n_heads, hd/32]) and, for Q4_0 keys,
    qc = offset_sums(qq, offset) int32[n_heads, hd/4] (legacy.py's dot reads it on AVX2)."""
    n_heads, hd = q.shape
    qq = np.empty((n_heads, hd), np.int8)
    qd = np.empty((n_heads, hd // 32), np.float32)
    qc = np.zeros((n_heads, hd // 4), np.int32)
    for h in range(n_heads):
        a, d = quantize_q8_0(q[h])
        qq[h] = a
        qd[h] = d
        if offset:
            qc[h] = offset_sums(a, offset)
    return qq, qd, qc


@njit(cache=True, inline="always")
def _ln2_steps_above(x):
    """The smallest k with k * ln 2 >= x (x finite): softmax's reference point. Moving it costs an exact
    power of two, so probabilities rounded to fp16 do not depend on where the running maximum stood."""
    return np.int64(math.ceil(x * _LOG2E))


@njit(cache=True, inline="always")
def _two_to(k):
    """2.0 ** k as float32 for int k (0 below the normal range)."""
    return np.uint32((k + 127) << 23).view(np.float32) if k > -127 else np.float32(0.0)


@njit(cache=True, inline="always")
def _exp_round_sum(row, ref):
    """row[:] = fp16-rounded exp(row - ref) in place; returns the float64 sum of the unrounded exps. Three
    plain loops so each vectorizes: the exps, the sum in four fixed lanes (independent scalars: no
    re-association, the same order on every CPU), the rounding."""
    n = row.shape[0]
    for s in range(n):
        row[s] = _exp(row[s] - ref)
    a0 = a1 = a2 = a3 = 0.0
    n4 = n // 4 * 4
    for s in range(0, n4, 4):
        a0 += row[s]
        a1 += row[s + 1]
        a2 += row[s + 2]
        a3 += row[s + 3]
    total = (a0 + a2) + (a1 + a3)
    for s in range(n4, n):
        total += row[s]
    for s in range(n):
        row[s] = _round_f16(row[s])
    return total


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _decode_softmax(scores, block_max, total):
    # scores -> fp16-rounded exp(s - m), m = the max rounded up to a multiple of ln 2; total[h] the
    # float64 sum of the unrounded exps (ggml's soft_max sums in double), to divide the output by.
    n_heads = scores.shape[0]
    for h in prange(n_heads):
        top = np.float32(-np.inf)
        for b in range(block_max.shape[1]):
            top = max(top, block_max[h, b])
        _softmax_row(scores, total, h, top)


@njit(cache=True, inline="always")
def _softmax_row(scores, total, h, top):
    """Head h's scores (maximum `top`) -> fp16-rounded exps, total[h] their float64 sum (zeros if none seen)."""
    if top == -np.inf:
        scores[h, :] = 0.0
        total[h] = 0.0
    else:
        total[h] = _exp_round_sum(scores[h], np.float32(_ln2_steps_above(top)) * _LN2)


_NO_QUANTS = (np.zeros((1, 32), np.int8), np.zeros((1, 1), np.float32), np.zeros((1, 8), np.int32))


def _decode(q, k, v, slot_seq, query_seq, scale, type_k, type_v, off=None):
    n_heads, hd = q.shape
    n_slots = len(slot_seq)
    threads = numba.get_num_threads()
    if threads > 1 and BLOCK < n_slots and n_slots * n_heads * hd < SERIAL_MACS:
        numba.set_num_threads(1)  # the kernels give the same bits on any number of threads
        try:
            return _decode_run(q, k, v, slot_seq, query_seq, scale, type_k, type_v, off)
        finally:
            numba.set_num_threads(threads)
    return _decode_run(q, k, v, slot_seq, query_seq, scale, type_k, type_v, off)


def _decode_run(q, k, v, slot_seq, query_seq, scale, type_k, type_v, off):
    n_heads, hd = q.shape
    n_slots = len(slot_seq)
    n_blocks = max(1, -(-n_slots // BLOCK))
    scores_kernel, values_kernel, one_block_kernel = _decode_kernels(type_k, type_v, hd)
    # the kernels address rows by pointer arithmetic: C-contiguous arrays (no copy for the cache's own)
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    slot_seq = np.ascontiguousarray(slot_seq, dtype=np.int64)
    q = np.ascontiguousarray(q, dtype=np.float32)
    if type_k == T.F16:
        q = rounded(q.reshape(-1), False).reshape(q.shape)  # llama.cpp converts q to K's type for K.Q
        qq, qd, qc = _NO_QUANTS
    else:
        qq, qd, qc = _quantize_heads(q, LAYOUTS[type_k][4])
    if off is None:  # no centers: nothing to add back (F16 keys never read it)
        off = np.zeros((n_heads, -(-n_slots // CENTER_BLOCK)), dtype=np.float32)
    off = np.ascontiguousarray(off, dtype=np.float32)
    scores = np.empty((n_heads, n_slots), dtype=np.float32)
    total = np.empty(n_heads, dtype=np.float64)
    partial = np.empty((n_blocks, n_heads, hd), dtype=np.float32)
    if n_blocks == 1:
        one_block_kernel(q, qq, qd, qc, k, v, slot_seq, query_seq, scale, off, scores, total, partial)
    else:
        block_max = np.empty((n_heads, n_blocks), dtype=np.float32)
        scores_kernel(q, qq, qd, qc, k, slot_seq, query_seq, scale, off, scores, block_max)
        _decode_softmax(scores, block_max, total)
        values_kernel(scores, v, partial)
    return _merge_blocks(partial, total)


@njit(cache=True)
def _merge_blocks(partial, total):
    """partial float32[n_blocks, n_heads, hd] summed in block order, divided by total float64[n_heads] (as
    _normalize: zeros where total is 0)."""
    n_blocks, n_heads, hd = partial.shape
    out = np.zeros((n_heads, hd), np.float32)
    for h in range(n_heads):
        if total[h] > 0:
            inv = np.float32(1.0 / total[h])
            for d in range(hd):
                acc = partial[0, h, d]
                for blk in range(1, n_blocks):
                    acc += partial[blk, h, d]
                out[h, d] = acc * inv
    return out


def _normalize(acc, total):
    """acc float32[R, hd] / total float64[R]; rows that saw no slot (total 0) are zeros."""
    seen = total > 0
    out = np.zeros_like(acc)
    out[seen] = acc[seen] * (1.0 / total[seen]).astype(np.float32)[:, None]
    return out


# ---- prefill: many queries -----------------------------------------------------------------------

@njit(parallel=True, fastmath={"contract"}, cache=True)
def _fold_tile(s, row_seq, tile_seq, masked, m, l, alpha):
    """One tile of online softmax. s float32[R, T]: raw scaled scores in, fp16-rounded exp(s - m) out,
    with m[R] (int64: the reference point in steps of ln 2, as in decode) raised to cover this tile and
    l[R] (float64 sum of the unrounded exps) rescaled and extended; alpha[R] = 2 ** (m_old - m_new), the
    exact factor the caller rescales its output rows by."""
    R, T = s.shape
    for r in prange(R):
        row = s[r]
        if masked:
            q_seq = row_seq[r]
            for t in range(T):
                seq = tile_seq[t]
                if seq < 0 or seq > q_seq:
                    row[t] = -np.inf
        lanes = np.full(8, -np.inf, dtype=np.float32)  # eight fixed lanes: vectorizes without NaN flags
        T8 = T // 8 * 8
        for t in range(0, T8, 8):
            for j in range(8):
                lanes[j] = max(lanes[j], row[t + j])
        top = lanes.max()
        for t in range(T8, T):
            top = max(top, row[t])
        if top == -np.inf:  # nothing visible in this tile
            row[:] = 0.0
            alpha[r] = 1.0
            continue
        k = max(m[r], _ln2_steps_above(top))
        total = _exp_round_sum(row, np.float32(k) * _LN2)
        a = _two_to(m[r] - k) if m[r] > _NONE else np.float32(0.0)
        alpha[r] = a
        l[r] = l[r] * a + total
        m[r] = k


def _prefill(q, k, v, slot_seq, query_seq, scale, type_k, type_v, off=None):
    # off: float32[nq, n_heads, n_center_blocks], each key block's q.c * scale to add back (or None)
    nq, n_heads, hd = q.shape
    n_slots, n_kv = len(slot_seq), k.shape[0]
    group = n_heads // n_kv
    out = np.zeros((nq, n_heads, hd), dtype=np.float32)
    row_seq = np.repeat(np.asarray(query_seq, dtype=np.int64), group)  # row i * group + g: query i
    q_lo, q_hi = int(query_seq.min()), int(query_seq.max())
    R = nq * group
    m = np.empty(R, dtype=np.int64)
    l = np.empty(R, dtype=np.float64)
    alpha = np.empty(R, dtype=np.float32)
    for kvh in range(n_kv):
        qg = np.ascontiguousarray(q[:, kvh * group:(kvh + 1) * group].reshape(R, hd))
        if off is not None:
            off_g = off[:, kvh * group:(kvh + 1) * group].reshape(R, -1)
        acc = np.zeros((R, hd), dtype=np.float32)
        m[:] = _NONE
        l[:] = 0.0
        for lo in range(0, n_slots, TILE):
            tile_seq = slot_seq[lo:min(lo + TILE, n_slots)]
            live = tile_seq >= 0
            if not live.any() or tile_seq[live].min() > q_hi:
                continue
            masked = bool(not live.all() or tile_seq.max() > q_lo)
            hi = min(lo + TILE, n_slots)
            keys = from_rows(k[kvh, lo:hi], type_k, hd)  # [T, hd]
            s = qg @ keys.T
            s *= scale
            if off is not None:  # TILE is whole center blocks: lo is a block's first slot
                b0 = lo // CENTER_BLOCK
                s += np.repeat(off_g[:, b0:b0 + TILE // CENTER_BLOCK], CENTER_BLOCK, axis=1)[:, :hi - lo]
            _fold_tile(s, row_seq, tile_seq, masked, m, l, alpha)
            acc *= alpha[:, None]
            acc += s @ from_rows(v[kvh, lo:hi], type_v, hd)
        out[:, kvh * group:(kvh + 1) * group] = _normalize(acc, l).reshape(nq, group, hd)
    return out
