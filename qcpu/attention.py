"""Attention over the KV cache: softmax(q.k / sqrt(head_dim)) . v, causal by stream index.

The cache is `k, v` uint8[n_kv_heads, capacity, row_bytes] (cache.py's layout: rows of head_dim values in
the cache type) with `slot_seq[n_slots]`: the stream index of the token in each of the first n_slots
slots (-1: empty). Query i (stream index `query_seq[i]`) sees slot s iff
0 <= slot_seq[s] <= query_seq[i], so the kernels need no particular slot order and accept holes. Only the
slots passed in are visited: the cache passes its used prefix, so the cost follows the tokens held, not
the capacity.

- One query (decode): flash-decoding (Dao et al., 2023), one parallel region. Keys are split into
  blocks of `BLOCK` slots; each (kv head, block) task scores its keys against all the queries of the
  GQA group, takes their exps against the block's own reference point and sums weights times values;
  the per-block partial sums are then rescaled to a common reference and added in block order. Both
  loops are LLVM IR micro-kernels (_score_keys, _weigh_values) over `STEP` = 8 keys at a time: a key
  is widened (F16C) or unpacked once for the whole group, the 8 keys' dots share one horizontal
  reduction and land as one vector per head, and the masks are vector selects; the sums keep
  floats.dot_f32's / legacy._row_dot's order, so every score is bit for bit theirs.
- Many queries (prefill): tiled online softmax (FlashAttention, Dao et al., 2022): per kv head the
  queries of its group are one [n * group, head_dim] matrix; each tile of `TILE` keys is widened,
  scored by one BLAS matmul, masked only where it can hide something (holes, or keys newer than the
  oldest query), and folded into running reference point / sum / output. Scratch is one tile of
  scores: a few MB whatever the context length.

Roundings: q is rounded to fp16 (llama.cpp converts it to K's type), and so are the weights exp(s - m)
before they multiply V (llama.cpp rounds the normalized probabilities: the same relative error). m (a
decode block's or a prefill row's maximum so far) is rounded up to a multiple of ln 2, so moving it
rescales by exact powers of two; the output is divided by the float64
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
    _emit_weights,
    offset_sums,
    quantize_q8_0,
)
from qcpu.kernels.llvm_ir import (
    _F32,
    _F64,
    _call,
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
# Several queries (a prompt chunk, drafted tokens, a server's prompt beside its decode rows) run the
# flash-decoding kernel too, one task per (query, kv head, block), while its scores array float32[queries,
# heads, slots] stays within this many bytes; beyond, the tiled prefill, whose scratch does not grow with
# the queries. Measured on the default model, 2 threads: a 3-row decode step with an 18-token prompt 288
# -> 158 ms (the tiled prefill's BLAS calls left OpenBLAS's threads spinning against the next products);
# pp512 at depth 0 131-136 -> 157-166 tok/s; at depth 1024 a tie (126-132 / 127-136); at depth 4096 the
# tiled prefill wins (74 / 68: its K tiles serve every query of the chunk).
DECODE_SCORES_BYTES = 16 << 20
BLOCK = 256  # keys per decode task: enough tasks for 2..16 threads at 4K+ tokens, little merging
TILE = 512  # keys per prefill tile: a [256 * group, 512] float32 score tile is a few MB
assert TILE % CENTER_BLOCK == 0  # a tile adds back whole blocks of key centers


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, slot_seq: np.ndarray, query_seq: np.ndarray,
              type_k: T = T.F16, type_v: T = T.F16, centers: KeyCenters | None = None,
              exact: bool = False) -> np.ndarray:
    """Scaled dot-product attention of q float32[n, n_heads, head_dim] over the cache k, v
    uint8[n_kv_heads, capacity, row_bytes] of types type_k, type_v (slot_seq int64[n_slots], query_seq
    int64[n]: see the module docstring). Returns float32[n, n_heads, head_dim]. n_heads must be a multiple
    of n_kv_heads (GQA). A query that sees no slot gets zeros. Quantized rows are read as cache.py stores
    them: Hadamard-rotated (llama.cpp's attention rotation, `cache.rotation`), and, given `centers`
    (quantized keys only), minus those centers, which are added back. `exact`: each query as a decode
    step of its own (the flash-decoding kernel, keys newer than it hidden), so each row is bit for bit
    what that query alone would get (speculative verification; the tiled prefill rounds differently)."""
    hd = q.shape[-1]
    scale = _scale(hd)
    type_k = type_k if type(type_k) is T else T(type_k)  # T(member) alone costs ~2 us a call
    type_v = type_v if type(type_v) is T else T(type_v)
    n_cb = -(-len(slot_seq) // CENTER_BLOCK)
    # quantized rows are stored Hadamard-rotated (cache.py): q.(Hk) needs Hq, and sum p (Hv) = H (sum p v)
    rot_k, rot_v = rotation(type_k, hd, keys=True), rotation(type_v, hd, keys=False)
    # q.c_b * scale from the unrounded q: the keys' large shared part loses nothing to q's rounding
    off = None if centers is None else centers.offsets(q, n_cb) * scale  # [n, n_heads, n_cb]
    q = rotate(q, rot_k)
    if exact or q.shape[0] == 1 or q.size // hd * len(slot_seq) * 4 <= DECODE_SCORES_BYTES:
        nq = q.shape[0]
        out = _decode(q, k[None], v[None], np.asarray(slot_seq)[None], np.zeros(nq, np.int64),
                      np.full(nq, len(slot_seq), np.int64), query_seq, scale, type_k, type_v, off)
    else:
        # llama.cpp converts q to K's vec_dot_type first: F16, or Q8_0 for the quantized caches
        q = ACTIVATION_ROUNDING[type_k](q.reshape(-1, hd)).reshape(q.shape)
        out = _prefill(q, k, v, slot_seq, query_seq, scale, type_k, type_v, off)
    return rotate(out, rot_v)


def attention_pooled(q: np.ndarray, k: np.ndarray, v: np.ndarray, slot_seq: np.ndarray, parts: list,
                     type_k: T = T.F16, type_v: T = T.F16, exact: bool = False) -> np.ndarray:
    """`attention` for the rows of several caches of one KVPool layer at once (a server's slots in one
    step): q float32[n, n_heads, head_dim]; k, v uint8[n_caches, n_kv_heads, capacity, row_bytes] and
    slot_seq int64[n_caches, capacity], the pool's layer; parts: one (cache index, rows, n_held,
    query_seq int64[rows], centers or None) per cache read, `rows` slices of q in order and covering it.
    Returns float32[n, n_heads, head_dim], each row bit for bit what `attention` gives it over its own
    cache (the decode kernel is per query). Where the decode kernel serves every part (exact, or the scores
    array small), one call and one parallel region for all of them; else one `attention` call per part."""
    hd = q.shape[-1]
    n = q.shape[0]
    type_k = type_k if type(type_k) is T else T(type_k)
    type_v = type_v if type(type_v) is T else T(type_v)
    longest = max(held for _, _, held, _, _ in parts)
    if not exact and n > 1 and n * q.shape[1] * longest * 4 > DECODE_SCORES_BYTES:
        return np.concatenate([attention(q[rows], k[c], v[c], slot_seq[c, :held], seqs, type_k, type_v, centers)
                               for c, rows, held, seqs, centers in parts])
    scale = _scale(hd)
    rot_k, rot_v = rotation(type_k, hd, keys=True), rotation(type_v, hd, keys=False)
    which, lens = np.empty(n, np.int64), np.empty(n, np.int64)
    query_seq = np.empty(n, np.int64)
    off = None
    if type_k != T.F16:  # each part's key centers, its rows' q.c * scale from the unrounded q
        off = np.zeros((n, q.shape[1], max(1, -(-longest // CENTER_BLOCK))), np.float32)
    for c, rows, held, seqs, centers in parts:
        which[rows], lens[rows], query_seq[rows] = c, held, seqs
        if off is not None and centers is not None:
            n_cb = -(-held // CENTER_BLOCK)
            off[rows, :, :n_cb] = centers.offsets(q[rows], n_cb) * scale
    # rotated per part, as `attention` rotates them: BLAS may sum a taller matrix in another order
    qr = np.concatenate([rotate(q[rows], rot_k) for _, rows, _, _, _ in parts]) if rot_k else q
    out = _decode(qr, k, v, slot_seq, which, lens, query_seq, scale, type_k, type_v, off)
    return np.concatenate([rotate(out[rows], rot_v) for _, rows, _, _, _ in parts]) if rot_v else out


@functools.cache
def _scale(head_dim: int) -> np.float32:
    return np.float32(1.0 / math.sqrt(head_dim))


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


def _ir_exp(b, x):
    """IR: _exp on <8 x float>, the same operations in the same order (the FMAs LLVM contracts in _exp,
    here marked for contraction the same way), so each lane is bit for bit _exp's."""
    def c(v):
        return _splat(_F32, 8, float(np.float32(v)))

    def fma(x_, y, z):  # x * y + z, contractible as in Numba's fastmath={"contract"}
        return _contract(b.fadd(_contract(b.fmul(x_, y)), z))

    xc = b.select(b.fcmp_ordered(">", x, c(-87.0)), x, c(-87.0))
    n = _call(b, "llvm.rint.v8f32", _V8F, _contract(b.fmul(xc, c(_LOG2E))))
    r = _contract(b.fsub(_contract(b.fsub(xc, _contract(b.fmul(n, c(_LN2_HI))))), _contract(b.fmul(n, c(_LN2_LO)))))
    p = c(1.0 / 720.0)
    for k in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = fma(p, r, c(k))
    two_n = b.bitcast(b.shl(b.add(b.fptosi(n, _vec(8, _I32)), _splat(_I32, 8, 127)), _splat(_I32, 8, 23)), _V8F)
    return b.select(b.fcmp_ordered(">=", x, c(-87.0)), _contract(b.fmul(p, two_n)), c(0.0))


def _ir_round_f16(b, p):
    """IR: _round_f16 on <8 x float> (no contraction: Veltkamp's split needs its two roundings)."""
    def c(v):
        return _splat(_F32, 8, v)

    sub = b.fsub(b.fadd(p, c(0.5)), c(0.5))
    t = b.fmul(p, c(8193.0))
    hi = b.fsub(t, b.fsub(t, p))
    return b.select(b.fcmp_ordered("<", p, c(6.103515625e-05)), sub, hi)


@intrinsic
def _exp_round_steps(typingctx, scores, h, lo, hi, ref, lanes):
    """scores[h, lo:hi] = fp16-rounded exp(scores[h, lo:hi] - ref) in place, 8 at a time ((hi - lo) a
    multiple of 8), and lanes float64[4] += the unrounded exps summed by slot modulo 4, in slot order:
    _exp_round_sum's four lanes, so the block total is bit for bit its."""
    if not _check_arrays((scores, lanes), [(types.float32, 2), (types.float64, 1)]):
        return None
    sig = types.void(scores, h, lo, hi, ref, lanes)

    def codegen(context, b, signature, args):
        ta = signature.args
        sc_, ln_ = (context.make_array(ta[i])(context, b, args[i]) for i in (0, 5))
        h_, lo_, hi_ = (context.cast(b, args[i], ta[i], types.int64) for i in (1, 2, 3))
        refv = _splat_value(b, context.cast(b, args[4], ta[4], types.float32), 8)
        n_slots = b.extract_value(sc_.shape, 1)
        row = b.gep(_ptr(b, sc_, _F32), [b.add(b.mul(h_, n_slots), lo_)])
        lanes_p = b.bitcast(_ptr(b, ln_, _F64), _vec(4, _F64).as_pointer())
        acc = cgutils.alloca_once_value(b, b.load(lanes_p, align=8))
        with cgutils.for_range(b, b.lshr(b.sub(hi_, lo_), _i64(3))) as step:
            at = b.bitcast(b.gep(row, [b.shl(step.index, _i64(3))]), _V8F.as_pointer())
            e = _ir_exp(b, b.fsub(b.load(at, align=4), refv))
            b.store(_ir_round_f16(b, e), at, align=4)
            a = b.load(acc)
            for half in (range(4), range(4, 8)):
                a = b.fadd(a, b.fpext(b.shuffle_vector(e, e, _lanes(half)), _vec(4, _F64)))
            b.store(a, acc)
        b.store(b.load(acc), lanes_p, align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _softmax_block(scores, h, lo, hi, ref, lanes):
    """_exp_round_sum(scores[h, lo:hi], ref), its whole steps of 8 in vector IR (_exp_round_steps)."""
    n8 = lo + (hi - lo) // 8 * 8
    lanes[:] = 0.0
    _exp_round_steps(scores, h, lo, n8, ref, lanes)
    row = scores[h]
    n4 = lo + (hi - lo) // 4 * 4
    for s in range(n8, hi):
        row[s] = _exp(row[s] - ref)
    for s in range(n8, n4, 4):
        for j in range(4):
            lanes[j] += row[s + j]
    total = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3])
    for s in range(n4, hi):
        total += row[s]
    for s in range(n8, hi):
        row[s] = _round_f16(row[s])
    return total


# ---- decode: one query ---------------------------------------------------------------------------

STEP = 8  # keys per pass: one <8 x float> of scores per head, the lane tree shared by 8 dots
assert BLOCK % CENTER_BLOCK == 0 and CENTER_BLOCK % STEP == 0  # a step's keys share one key center
_V8F = _vec(8, _F32)


def _lane_sums(b, vs):
    """IR: eight <8 x float> -> one whose lane j is the sum of vs[j]'s lanes, with t_i = l_i + l_(i+4):
    (t0+t1) + (t2+t3), floats.dot_f32's tree; the shuffles serve all 8 sums at once."""
    s = [b.fadd(b.shuffle_vector(vs[i], vs[i + 1], _lanes([0, 1, 2, 3, 8, 9, 10, 11])),
                b.shuffle_vector(vs[i], vs[i + 1], _lanes([4, 5, 6, 7, 12, 13, 14, 15]))) for i in (0, 2, 4, 6)]
    u = [b.fadd(b.shuffle_vector(s[i], s[i + 1], _lanes([0, 2, 8, 10, 4, 6, 12, 14])),
                b.shuffle_vector(s[i], s[i + 1], _lanes([1, 3, 9, 11, 5, 7, 13, 15]))) for i in (0, 2)]
    w = b.fadd(b.shuffle_vector(u[0], u[1], _lanes([0, 2, 8, 10, 4, 6, 12, 14])),
               b.shuffle_vector(u[0], u[1], _lanes([1, 3, 9, 11, 5, 7, 13, 15])))
    return b.shuffle_vector(w, w, _lanes([0, 4, 1, 5, 2, 6, 3, 7]))


def _dword_columns(b, rows):
    """IR: eight <32 x i8> rows (one block of 8 keys) -> eight <32 x i8> columns, dword j of column t
    = dword t of row j (quants 4t..4t+3 of key j): the 8 x 8 dword transpose, in the three stages of
    unpack 32, unpack 64, 128-bit halves (one shuffle instruction each on AVX2)."""
    def shuf(x, y, idx):
        return b.shuffle_vector(x, y, _lanes(idx))

    r = [b.bitcast(x, _vec(8, _I32)) for x in rows]
    lo32, hi32 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    lo64, hi64 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    s = [shuf(r[i], r[i + 1], m) for i in (0, 2, 4, 6) for m in (lo32, hi32)]  # s0 s1 | s2 s3 | ...
    u = []
    for base in (0, 4):  # keys 0-3, 4-7: dwords (0,4) (1,5) (2,6) (3,7) of 4 keys
        for a, m in ((0, lo64), (0, hi64), (1, lo64), (1, hi64)):
            u.append(shuf(s[base + a], s[base + a + 2], m))
    cols = [None] * 8
    for t in range(4):
        cols[t] = shuf(u[t], u[t + 4], [0, 1, 2, 3, 8, 9, 10, 11])
        cols[t + 4] = shuf(u[t], u[t + 4], [4, 5, 6, 7, 12, 13, 14, 15])
    return [b.bitcast(c, _vec(32, _I8)) for c in cols]


def _i64(v):
    return ir.Constant(_I64, v)


def _ptr(b, arr, ty):
    return b.bitcast(arr.data, ty.as_pointer())


def _min(b, x, y):
    return b.select(b.icmp_signed("<", x, y), x, y)


def _check_arrays(arrays, dtypes):
    return all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == d and a.ndim == n
               for a, (d, n) in zip(arrays, dtypes))


def _hidden_lanes(b, seqp, s0, last, n, query):
    """IR: <8 x i1>, lane j true where key s0 + j is hidden from the query (a hole, newer than query_seq)
    or past the range (j >= n, the step's keys left; its index is clamped to `last`)."""
    hidden = ir.Constant(_vec(8, ir.IntType(1)), None)
    for j in range(STEP):
        seq = b.load(b.gep(seqp, [_min(b, b.add(s0, _i64(j)), last)]))
        off = b.or_(b.or_(b.icmp_signed("<", seq, _i64(0)), b.icmp_signed(">", seq, query)),
                    b.icmp_signed("<=", n, _i64(j)))
        hidden = b.insert_element(hidden, off, ir.Constant(_I32, j))
    return hidden


def _all_visible(b, seqp, lo, hi, query):
    """IR: i1, true when every slot in [lo, hi) is visible to the query (0 <= slot_seq <= query) and hi - lo
    is a whole number of steps: then a scoring pass needs no masks and no clamped indices."""
    ok = cgutils.alloca_once_value(b, b.icmp_signed("==", b.and_(b.sub(hi, lo), _i64(STEP - 1)), _i64(0)))
    with cgutils.for_range(b, b.sub(hi, lo)) as loop:
        seq = b.load(b.gep(seqp, [b.add(lo, loop.index)]))
        fine = b.and_(b.icmp_signed(">=", seq, _i64(0)), b.icmp_signed("<=", seq, query))
        b.store(b.and_(b.load(ok), fine), ok)
    return b.load(ok)


def _store_step(b, x, best, out, n):
    """IR: a step's 8 scores x into the running maxima vector at `best` and to `out` (float*), only the
    first n of them when the step is the range's last, partial one."""
    old = b.load(best, align=4)
    b.store(b.select(b.fcmp_ordered(">", x, old), x, old), best, align=4)
    with b.if_else(b.icmp_signed(">=", n, _i64(STEP))) as (whole, part):
        with whole:
            b.store(x, b.bitcast(out, _V8F.as_pointer()), align=4)
        with part:
            for j in range(STEP):
                with b.if_then(b.icmp_signed(">", n, _i64(j))):
                    b.store(b.extract_element(x, ir.Constant(_I32, j)), b.gep(out, [_i64(j)]))


def _lane_max(b, m):
    """IR: the largest of <8 x float> m's lanes."""
    top = b.extract_element(m, ir.Constant(_I32, 0))
    for j in range(1, 8):
        e = b.extract_element(m, ir.Constant(_I32, j))
        top = b.select(b.fcmp_ordered(">", e, top), e, top)
    return top


@intrinsic
def _score_keys(typingctx, krows, qf, slot_seq, query_seq, scale, scores, h0, group, lo, hi, work, spec):
    """Scores of F16 keys krows[lo:hi] (uint8[slots, row_bytes], one kv head) against the fp16-rounded
    query heads h0..h0+group (qf float32[n_heads, hd]): scores[h, s] = q_h.k_s * scale, -inf where
    slot_seq[s] is not in [0, query_seq]; work float32[group * 73] is scratch, and work[group * 72 + g]
    gets head h0+g's maximum.

    STEP keys at a time: each key is widened (F16C) once for the whole group, dotted with each head into
    one <8 x float> of partial sums in floats.dot_f32's order (four accumulators over chunks c % 4, then
    (a0+a2)+(a1+a3)); _lane_sums then finishes 8 keys' dots at once, so each score is bit for bit what
    dot_f32 returns, and the scores are stored as one vector per head."""
    layout = literal_values(spec)
    if layout is None:
        return None
    hd, k_f16, f16c = layout[0], layout[1], layout[8]
    if not k_f16 or not _check_arrays((krows, qf, slot_seq, scores, work), [
            (types.uint8, 2), (types.float32, 2), (types.int64, 1), (types.float32, 2), (types.float32, 1)]):
        return None
    row_bytes = hd * 2
    sig = types.void(krows, qf, slot_seq, query_seq, scale, scores, h0, group, lo, hi, work, spec)

    def codegen(context, b, signature, args):
        ta = signature.args
        kr, qf_, seq_, sc_, wk_ = (context.make_array(ta[i])(context, b, args[i]) for i in (0, 1, 2, 5, 10))
        query = context.cast(b, args[3], ta[3], types.int64)
        scl = context.cast(b, args[4], ta[4], types.float32)
        h0_, grp, lo_, hi_ = (context.cast(b, args[i], ta[i], types.int64) for i in (6, 7, 8, 9))
        kp, qfp = _ptr(b, kr, _I8), _ptr(b, qf_, _F32)
        seqp, scp = _ptr(b, seq_, _I64), _ptr(b, sc_, _F32)
        n_slots = b.extract_value(sc_.shape, 1)
        vbuf = _ptr(b, wk_, _V8F)  # [group * STEP] partial-sum vectors, then [group] running maxima
        best = b.gep(vbuf, [b.mul(grp, _i64(STEP))])
        maxima = b.bitcast(b.gep(best, [grp]), _F32.as_pointer())
        neg_inf = _splat(_F32, 8, float("-inf"))
        with cgutils.for_range(b, grp) as loop:
            b.store(neg_inf, b.gep(best, [loop.index]), align=4)
        zero8 = ir.Constant(_V8F, [0.0] * 8)
        last = b.sub(hi_, _i64(1))

        def steps(checked):  # as _score_quantized_keys' steps
            n_steps = b.lshr(b.add(b.sub(hi_, lo_), _i64(STEP - 1)), _i64(3))
            with cgutils.for_range(b, n_steps) as step:
                s0 = b.add(lo_, b.shl(step.index, _i64(3)))
                for j in range(STEP):
                    s = b.add(s0, _i64(j))
                    if checked:
                        s = _min(b, s, last)  # past hi: the last key again, masked below
                    row = b.gep(kp, [b.mul(s, _i64(row_bytes))])
                    kc = [ir_half_to_f32(b, _load(b, row, 16 * c, _vec(8, _I16)), f16c) for c in range(hd // 8)]
                    with cgutils.for_range(b, grp) as heads:
                        h = b.add(h0_, heads.index)
                        qrow = b.gep(qfp, [b.mul(h, _i64(hd))])
                        accs = [zero8] * 4
                        for c in range(hd // 8):
                            y = b.load(b.bitcast(b.gep(qrow, [_i64(8 * c)]), _V8F.as_pointer()), align=4)
                            accs[c % 4] = _contract(b.fadd(_contract(b.fmul(kc[c], y)), accs[c % 4]))
                        v = b.fadd(b.fadd(accs[0], accs[2]), b.fadd(accs[1], accs[3]))
                        b.store(v, b.gep(vbuf, [b.add(b.mul(heads.index, _i64(STEP)), _i64(j))]), align=4)
                n = b.sub(hi_, s0)
                hidden = _hidden_lanes(b, seqp, s0, last, n, query) if checked else None
                with cgutils.for_range(b, grp) as heads:
                    h = b.add(h0_, heads.index)
                    base = b.mul(heads.index, _i64(STEP))
                    vs = [b.load(b.gep(vbuf, [b.add(base, _i64(j))]), align=4) for j in range(STEP)]
                    x = b.fmul(_lane_sums(b, vs), _splat_value(b, scl, 8))
                    best_h, out = b.gep(best, [heads.index]), b.gep(scp, [b.add(b.mul(h, n_slots), s0)])
                    if checked:
                        _store_step(b, b.select(hidden, neg_inf, x), best_h, out, n)
                    else:
                        old = b.load(best_h, align=4)
                        b.store(b.select(b.fcmp_ordered(">", x, old), x, old), best_h, align=4)
                        b.store(x, b.bitcast(out, _V8F.as_pointer()), align=4)

        with b.if_else(_all_visible(b, seqp, lo_, hi_, query), likely=True) as (fast, slow):
            with fast:
                steps(False)
            with slow:
                steps(True)
        with cgutils.for_range(b, grp) as heads:
            m = b.load(b.gep(best, [heads.index]), align=4)
            b.store(_lane_max(b, m), b.gep(maxima, [heads.index]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _score_quantized_keys(typingctx, krows, qq, qd, qc, slot_seq, query_seq, scale, off, scores, h0, lo, hi, work,
                          spec):
    """Scores of Q8_0/Q4_0 keys krows[lo:hi] (uint8[slots, row_bytes], one kv head) against the query heads
    h0..h0+group (group: spec's last item): scores[h, s] = q_h.k_s * scale + off[h, s // CENTER_BLOCK] (the
    key centers' q.c * scale, cache.KeyCenters), -inf where slot_seq[s] is not in [0, query_seq]; work
    float32[group * 73]: work[group * 72 + g] gets head h0+g's maximum. q is given as Q8_0 (qq int8[n_heads,
    hd], qd float32[n_heads, hd / 32]; qc: Q4_0's offset sums, legacy.offset_sums).

    Each block's dot is an exact integer, and the score is llama.cpp's scalar vec_dot_q8_0_q8_0 order:
    sum over blocks i of float(dot_i) * (d_k,i * d_q,i), then times scale. STEP keys at a time: a key is
    unpacked once for the whole group, and each block of the 8 keys is transposed once (_dword_columns:
    column t holds every key's quants 4t..4t+3), so a head's 8 dots accumulate lane by lane against q's
    dword t broadcast, with no horizontal reduction (it was a shuffle tree per head, as costly as the
    dots; the transpose is shared by the group). The float work is then a few vector operations per 8 keys.
    On AVX2 the dots are pmaddubsw/pmaddwd, with q's magnitudes (loop-invariant) as the unsigned operand
    and the keys given q's signs (psignb, ggml's mul_sum_i8_pairs the other way round), and Q4_0's nibbles
    as they are, their 8 columns summed in int16 (15 x 127 x 16 < 2**15) and the offset subtracted from
    the block sums."""
    layout = literal_values(spec)
    if layout is None:
        return None
    hd, k_f16, type_size, has_m, has_qh, nibbles, offset, avx2, f16c, group = layout
    if k_f16 or has_m or not _check_arrays((krows, qq, qd, qc, slot_seq, off, scores, work), [
            (types.uint8, 2), (types.int8, 2), (types.float32, 2), (types.int32, 2), (types.int64, 1),
            (types.float32, 2), (types.float32, 2), (types.float32, 1)]):
        return None
    nb = hd // QK
    row_bytes = nb * type_size
    raw_nibbles = nibbles and avx2  # unsigned as stored; the offset comes off each block's sum
    sig = types.void(krows, qq, qd, qc, slot_seq, query_seq, scale, off, scores, h0, lo, hi, work, spec)

    def codegen(context, b, signature, args):
        ta = signature.args
        kr, qq_, qd_, qc_, seq_, of_, sc_, wk_ = (context.make_array(ta[i])(context, b, args[i])
                                                  for i in (0, 1, 2, 3, 4, 7, 8, 12))
        query = context.cast(b, args[5], ta[5], types.int64)
        scl = _splat_value(b, context.cast(b, args[6], ta[6], types.float32), 8)
        h0_, lo_, hi_ = (context.cast(b, args[i], ta[i], types.int64) for i in (9, 10, 11))
        kp, qqp, qdp, qcp = _ptr(b, kr, _I8), _ptr(b, qq_, _I8), _ptr(b, qd_, _F32), _ptr(b, qc_, _I8)
        seqp, ofp, scp = _ptr(b, seq_, _I64), _ptr(b, of_, _F32), _ptr(b, sc_, _F32)
        n_slots, n_cb = b.extract_value(sc_.shape, 1), b.extract_value(of_.shape, 1)
        maxima = b.gep(_ptr(b, wk_, _F32), [_i64(group * STEP * 9)])
        zero8 = ir.Constant(_V8F, [0.0] * 8)
        neg_inf = _splat(_F32, 8, float("-inf"))
        best = [cgutils.alloca_once_value(b, neg_inf) for _ in range(group)]
        # per head and block, loop-invariant: q's quants (their magnitudes for psignb), scale, offset sum
        xs, ds, corr = {}, {}, {}
        for g in range(group):
            h = b.add(h0_, _i64(g))
            for i in range(nb):
                x = _load(b, b.gep(qqp, [b.mul(h, _i64(hd))]), 32 * i, _vec(32, _I8))
                if avx2 and not raw_nibbles:
                    x = (x, b.select(b.icmp_signed("<", x, _splat(_I8, 32, 0)), b.sub(_splat(_I8, 32, 0), x), x))
                xs[g, i] = x
                ds[g, i] = _splat_value(b, b.load(b.gep(qdp, [b.add(b.mul(h, _i64(nb)), _i64(i))])), 8)
                if raw_nibbles and offset:
                    lanes = _load(b, b.gep(qcp, [b.mul(h, _i64(hd))]), 32 * i, _vec(8, _I32))
                    total = b.extract_element(lanes, ir.Constant(_I32, 0))
                    for j in range(1, 8):
                        total = b.add(total, b.extract_element(lanes, ir.Constant(_I32, j)))
                    corr[g, i] = _splat_value(b, total, 8)

        def broadcast(x, t):  # <32 x i8> x's dword t (4 quants) in every dword
            return b.bitcast(b.shuffle_vector(b.bitcast(x, _vec(8, _I32)), ir.Constant(_vec(8, _I32), None),
                                              _lanes([t] * 8)), _vec(32, _I8))

        qcols = {(g, i): [tuple(broadcast(y, t) for y in x) if isinstance(x, tuple) else broadcast(x, t)
                          for t in range(8)] for (g, i), x in xs.items()}

        def pairs(wq, x):  # pmaddubsw: <16 x i16>
            if raw_nibbles:
                return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(16, _I16), wq, x)
            x, ax = x
            return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(16, _I16), ax,
                         _call(b, "llvm.x86.avx2.psign.b", _vec(32, _I8), wq, x))

        def widen(p):  # pmaddwd by ones: <8 x i32>
            return _call(b, "llvm.x86.avx2.pmadd.wd", _vec(8, _I32), p, _splat(_I16, 16, 1))

        def block_dots(cols, qcols):
            """<8 x i32>: the 8 keys' exact integer dots with one q block (columns: _dword_columns)."""
            if not avx2:
                terms = [_dot8_portable(b, c, x, True) for c, x in zip(cols, qcols)]
            elif raw_nibbles:  # nibbles x |q| <= 15 * 127: 8 pair sums stay within int16, widen once
                p = pairs(cols[0], qcols[0])
                for c, x in zip(cols[1:], qcols[1:]):
                    p = b.add(p, pairs(c, x))
                return widen(p)
            else:  # 2 * 127 * 127 fills int16: widen each
                terms = [widen(pairs(c, x)) for c, x in zip(cols, qcols)]
            total = terms[0]
            for t in terms[1:]:
                total = b.add(total, t)
            return total

        last = b.sub(hi_, _i64(1))

        def steps(checked):
            """The keys 8 at a time. checked: some key is hidden or the range ends in a partial step, so
            indices are clamped and lanes masked; else (a decode block of held keys) neither is done."""
            n_steps = b.lshr(b.add(b.sub(hi_, lo_), _i64(STEP - 1)), _i64(3))
            with cgutils.for_range(b, n_steps) as step:
                s0 = b.add(lo_, b.shl(step.index, _i64(3)))
                n = b.sub(hi_, s0)
                wq, blks = {}, {}
                for j in range(STEP):
                    s = b.add(s0, _i64(j))
                    if checked:
                        s = _min(b, s, last)  # past hi: the last key again, masked below
                    row = b.gep(kp, [b.mul(s, _i64(row_bytes))])
                    for i in range(nb):
                        blks[j, i] = b.gep(row, [_i64(i * type_size)])
                        wq[j, i] = _emit_weights(b, blks[j, i], False, has_qh, nibbles, 0 if raw_nibbles else offset)
                # the 8 keys' scales of a block gathered as halves, then converted at once (exact either way)
                dk = []
                for i in range(nb):
                    h16 = ir.Constant(_vec(8, _I16), [0] * 8)
                    for j in range(STEP):
                        h16 = b.insert_element(h16, _load(b, blks[j, i], 0, _I16), ir.Constant(_I32, j))
                    dk.append(ir_half_to_f32(b, h16, f16c))
                hidden = _hidden_lanes(b, seqp, s0, last, n, query) if checked else None
                cols = [_dword_columns(b, [wq[j, i] for j in range(STEP)]) for i in range(nb)]
                for g in range(group):
                    acc = zero8
                    for i in range(nb):
                        sums = block_dots(cols[i], qcols[g, i])
                        if (g, i) in corr:
                            sums = b.sub(sums, corr[g, i])
                        term = _contract(b.fmul(b.sitofp(sums, _V8F), b.fmul(dk[i], ds[g, i])))
                        acc = _contract(b.fadd(acc, term))
                    h = b.add(h0_, _i64(g))
                    # a step's 8 keys share a center block: acc * scale + its offset, one FMA where the CPU has it
                    o = b.load(b.gep(ofp, [b.add(b.mul(h, n_cb), b.udiv(s0, _i64(CENTER_BLOCK)))]))
                    x = _contract(b.fadd(_contract(b.fmul(acc, scl)), _splat_value(b, o, 8)))
                    out = b.gep(scp, [b.add(b.mul(h, n_slots), s0)])
                    if checked:
                        _store_step(b, b.select(hidden, neg_inf, x), best[g], out, n)
                    else:
                        old = b.load(best[g])
                        b.store(b.select(b.fcmp_ordered(">", x, old), x, old), best[g])
                        b.store(x, b.bitcast(out, _V8F.as_pointer()), align=4)

        with b.if_else(_all_visible(b, seqp, lo_, hi_, query), likely=True) as (fast, slow):
            with fast:
                steps(False)
            with slow:
                steps(True)
        for g in range(group):
            b.store(_lane_max(b, b.load(best[g])), b.gep(maxima, [_i64(g)]))
        return context.get_dummy_value()

    return sig, codegen


VALUE_ROWS = 32  # quantized V rows converted to float32 at a time: 8-16 KB of buf, in L1
VEC_REGS = 16  # vector registers a values pass may fill (AVX2 has 16, NEON 32)


def _value_tiles(group, n_chunks):
    """The passes of _weigh_values: (heads, chunks) tiles. A pass holds heads x chunks accumulators, the
    chunks' values and one broadcast p in registers: (heads + 1) * chunks + 1 <= VEC_REGS, else LLVM
    spills. At most 4 heads a tile, so a pass converts 3 chunks of a row for 4 broadcasts of p rather than
    1 chunk for 7 (Qwen2.5 0.5B's group): 4 x 3 tiles ran the values loop at 16K keys ~25% faster than
    7 x 1, and ~7% faster than 3 x 4 + 4 x 3 (both orders in one process, 2 threads)."""
    def even(n, most):  # n split into as few ranges of at most `most` as possible, of even sizes
        k = -(-n // most)
        return [range(n * i // k, n * (i + 1) // k) for i in range(k)]

    return [(heads, chunks) for heads in even(group, 4)
            for chunks in even(n_chunks, max(1, (VEC_REGS - 1) // (len(heads) + 1)))]


@intrinsic
def _weigh_values(typingctx, vrows, probs, out, slot_seq, query_seq, h0, lo, hi, buf, spec):
    """out[h0 + g, :] = sum over the visible slots s in [lo, hi) (0 <= slot_seq[s] <= query_seq) of
    probs[h0 + g, s] * v_s, g < group (spec's last item; vrows uint8[slots, row_bytes]: one kv head), each
    element summed in slot order with FMA contraction (as `acc += p * v` would); hidden slots never enter
    the sums. buf: float32 scratch of VALUE_ROWS * head_dim values (quantized V only).

    Register-blocked (_value_tiles): a pass keeps the accumulators of several (head, 8-value chunk) pairs in
    registers over the slots, so each product is one FMA against one broadcast p. F16 rows: each pass
    widens its chunks (F16C). Quantized rows: VALUE_ROWS rows at a time are converted once, for every
    head, to float32 q * d in buf (exact: an 8-bit quant times an fp16 scale has at most 19 significant
    bits), and the passes read them from L1. p * (q * d) is then the exact product p * q * d before the
    FMA's one rounding: the bits of legacy._row_dequantize then p * v. Whether every slot is visible is
    decided once per block: then the passes test nothing per slot."""
    layout = literal_values(spec)
    if layout is None:
        return None
    hd, v_f16, type_size, has_m, has_qh, nibbles, offset, _, f16c, group = layout
    if has_m or not _check_arrays((vrows, probs, out, slot_seq, buf), [
            (types.uint8, 2), (types.float32, 2), (types.float32, 2), (types.int64, 1), (types.float32, 1)]):
        return None
    n_chunks, nb = hd // 8, hd // QK
    row_bytes = hd * 2 if v_f16 else nb * type_size
    signed = offset != 0 or not nibbles
    sig = types.void(vrows, probs, out, slot_seq, query_seq, h0, lo, hi, buf, spec)
    tiles = _value_tiles(group, n_chunks)

    def codegen(context, b, signature, args):
        ta = signature.args
        vr, pr, o_, sq, bf = (context.make_array(ta[i])(context, b, args[i]) for i in (0, 1, 2, 3, 8))
        query = context.cast(b, args[4], ta[4], types.int64)
        h0_, lo_, hi_ = (context.cast(b, args[i], ta[i], types.int64) for i in (5, 6, 7))
        vp, pp, op, seqp = _ptr(b, vr, _I8), _ptr(b, pr, _F32), _ptr(b, o_, _V8F), _ptr(b, sq, _I64)
        bufp = _ptr(b, bf, _V8F)
        n_slots = b.extract_value(pr.shape, 1)
        zero8 = ir.Constant(_V8F, [0.0] * 8)
        prows = {g: b.gep(pp, [b.mul(b.add(h0_, _i64(g)), n_slots)]) for g in range(group)}

        def visible(s):  # 0 <= slot_seq[s] <= query_seq
            seq = b.load(b.gep(seqp, [s]))
            return b.and_(b.icmp_signed(">=", seq, _i64(0)), b.icmp_signed("<=", seq, query))

        def convert(s_lo, n):  # buf[j * n_chunks + c] = float32 q * d of slot s_lo + j, j < n
            with cgutils.for_range(b, n) as loop:
                row = b.gep(vp, [b.mul(b.add(s_lo, loop.index), _i64(row_bytes))])
                for i in range(nb):
                    blk = b.gep(row, [_i64(i * type_size)])
                    d = _splat_value(b, ir_half_at(b, blk, 0, f16c), 8)
                    q = _emit_weights(b, blk, has_m, has_qh, nibbles, offset)
                    for part in range(4):
                        x = b.shuffle_vector(q, q, _lanes(range(8 * part, 8 * part + 8)))
                        x = b.fmul((b.sitofp if signed else b.uitofp)(x, _V8F), d)
                        at = b.add(b.mul(loop.index, _i64(n_chunks)), _i64(4 * i + part))
                        b.store(x, b.gep(bufp, [at]), align=4)

        def passes(checked):
            accs = [{(g, c): cgutils.alloca_once_value(b, zero8) for g in heads for c in chunks}
                    for heads, chunks in tiles]

            def run(s_lo, n, chunk):  # every tile over slots s_lo .. s_lo + n - 1
                for (heads, chunks), acc in zip(tiles, accs):
                    with cgutils.for_range(b, n) as loop:
                        s = b.add(s_lo, loop.index)
                        with b.if_then(visible(s) if checked else ir.Constant(ir.IntType(1), 1), likely=True):
                            ys = {c: chunk(s, loop.index, c) for c in chunks}
                            for g in heads:
                                p = _splat_value(b, b.load(b.gep(prows[g], [s])), 8)
                                for c in chunks:
                                    a = acc[g, c]
                                    b.store(_contract(b.fadd(b.load(a), _contract(b.fmul(p, ys[c])))), a)

            if v_f16:
                def chunk(s, j, c):
                    return ir_half_to_f32(b, _load(b, vp, b.add(b.mul(s, _i64(row_bytes)), _i64(16 * c)),
                                                   _vec(8, _I16)), f16c)
                run(lo_, b.sub(hi_, lo_), chunk)
            else:
                def chunk(s, j, c):
                    return b.load(b.gep(bufp, [b.add(b.mul(j, _i64(n_chunks)), _i64(c))]), align=4)
                n_sub = b.udiv(b.add(b.sub(hi_, lo_), _i64(VALUE_ROWS - 1)), _i64(VALUE_ROWS))
                with cgutils.for_range(b, n_sub) as sub:
                    s_lo = b.add(lo_, b.mul(sub.index, _i64(VALUE_ROWS)))
                    n = _min(b, _i64(VALUE_ROWS), b.sub(hi_, s_lo))
                    convert(s_lo, n)
                    run(s_lo, n, chunk)
            for acc in accs:
                for (g, c), a in acc.items():
                    dst = b.gep(op, [b.add(b.mul(b.add(h0_, _i64(g)), _i64(n_chunks)), _i64(c))])
                    b.store(b.load(a), dst, align=4)

        everyone = cgutils.alloca_once_value(b, ir.Constant(ir.IntType(1), 1))
        with cgutils.for_range(b, b.sub(hi_, lo_)) as loop:
            b.store(b.and_(b.load(everyone), visible(b.add(lo_, loop.index))), everyone)
        with b.if_else(b.load(everyone), likely=True) as (fast, slow):
            with fast:
                passes(False)
            with slow:
                passes(True)
        return context.get_dummy_value()

    return sig, codegen


@functools.cache
def _decode_kernel(type_k: T, type_v: T, head_dim: int, group: int, avx2: bool = X86_AVX2, f16c: bool = F16C):
    """The decode kernel for one pair of cache types and head_dim, jitted once (kernels.specialise); avx2 /
    f16c: the instructions the IR may use (default: this CPU's; the tests also build the portable IR, which
    gives the same numbers).

    kernel(q, k, v, slot_seq, which, lens, query_seq, scale, off, scores, refs, totals, partial) -> out
    float32[nq, n_heads, head_dim], for queries q float32[nq, n_heads, head_dim] at stream indices query_seq
    int64[nq] over the caches k, v uint8[n_caches, n_kv_heads, capacity, row_bytes], slot_seq
    int64[n_caches, capacity] (one cache, or a KVPool's layer): query i reads cache which[i]'s slots [0,
    lens[i]). One task per (query, kv head, block of BLOCK slots), all in one parallel region
    (flash-decoding), between q's conversion and the blocks' merge on the calling thread (one call from
    Python: a decode step makes one per layer, for all the slots of a KVPool, and each call's Python and
    dispatch cost ~1 us per array). Each query's arithmetic is that of nq = 1, so its bits too. Per query i:
    - q[i] goes to K's vec_dot type first, as llama.cpp converts it: fp16-rounded for F16 keys; Q8_0 for
      quantized keys (_quantize_heads: the quants, scales and Q4_0's offset sums);
    - scores[i, h, s] = q.k * scale, -inf where hidden (_score_keys). F16 keys are dotted in float32;
      quantized keys as integers, llama.cpp's vec_dot_q8_0_q8_0 / vec_dot_q4_0_q8_0, then off[i, h, s //
      CENTER_BLOCK] is added (the key centers' q.c * scale, cache.KeyCenters; unread for F16 keys);
      a block the query sees no slot of is not scored at all;
    - the block's softmax against its own reference point: refs int64[nq, n_heads, n_blocks] = the block
      maximum in steps of ln 2 rounded up (_NONE: nothing seen), scores -> fp16-rounded exp(s - ref),
      totals float64[nq, n_heads, n_blocks] their unrounded sum;
    - partial[i, b, h] float32[hd] = sum over the block's slots of p * v (_weigh_values);
    - _merge_blocks rescales each block by the exact power of two 2**(ref_b - max ref) and divides.
    """
    k_f16, v_f16 = type_k == T.F16, type_v == T.F16
    # captured constants (the layouts the quantized paths read; unused but typed for F16)
    spec_k = (head_dim, k_f16, *LAYOUTS[T.Q8_0 if k_f16 else type_k], avx2, f16c)
    spec_kq = (*spec_k, group)
    spec_v = (head_dim, v_f16, *LAYOUTS[T.Q8_0 if v_f16 else type_v], avx2, f16c, group)
    k_bytes = head_dim * 2 if k_f16 else head_dim // QK * spec_k[2]
    v_bytes = head_dim * 2 if v_f16 else head_dim // QK * spec_v[2]
    k_offset = spec_k[6]  # Q4_0's 8: q's offset sums

    def kernel(q, k, v, slot_seq, which, lens, query_seq, scale, off, scores, refs, totals, partial):
        nq, n_heads = q.shape[0], q.shape[1]
        n_slots, n_kv = scores.shape[2], k.shape[1]
        n_blocks = refs.shape[2]
        if (q.shape[2] != head_dim or k.shape[3] != k_bytes or v.shape[3] != v_bytes or v.shape[:3] != k.shape[:3]
                or slot_seq.shape[0] != k.shape[0] or which.shape[0] != nq or lens.shape[0] != nq
                or query_seq.shape[0] != nq
                or scores.shape[0] != nq or scores.shape[1] != n_heads or refs.shape[0] != nq
                or refs.shape[1] != n_heads or totals.shape != refs.shape or n_blocks * BLOCK < n_slots
                or partial.shape[0] != nq or partial.shape[1] != n_blocks or partial.shape[2] != n_heads
                or partial.shape[3] != head_dim or n_heads != n_kv * group
                or (not k_f16 and (off.shape[0] != nq or off.shape[1] != n_heads
                                   or off.shape[2] * CENTER_BLOCK < n_slots))):
            raise ValueError("decode attention: shapes do not match")
        for i in range(nq):
            if (not 0 <= which[i] < k.shape[0] or not 0 <= lens[i] <= n_slots or lens[i] > k.shape[2]
                    or lens[i] > slot_seq.shape[1]):
                raise ValueError("decode attention: a query's cache or slot count is out of range")
        if k_f16:
            qf = np.empty_like(q)
            for i in range(nq):
                for h in range(n_heads):
                    qf[i, h] = rounded(q[i, h], False)
            qq = np.zeros((nq, 1, 32), np.int8)
            qd = np.zeros((nq, 1, 1), np.float32)
            qc = np.zeros((nq, 1, 8), np.int32)
        else:
            qf = q
            qq = np.empty((nq, n_heads, head_dim), np.int8)
            qd = np.empty((nq, n_heads, head_dim // QK), np.float32)
            qc = np.empty((nq, n_heads, head_dim // 4), np.int32)
            for i in range(nq):
                qq[i], qd[i], qc[i] = _quantize_heads(q[i], k_offset)
        for task in prange(nq * n_kv * n_blocks):
            i, rest = task // (n_kv * n_blocks), task % (n_kv * n_blocks)
            kvh, b = rest // n_blocks, rest % n_blocks
            lo = b * BLOCK
            hi = max(lo, min(lens[i], lo + BLOCK))  # a query of a shorter cache than the longest: empty
            seen = query_seq[i]
            sc = scores[i]
            c = which[i]  # the query's cache: its rows and slots
            keys, values, seq = k[c, kvh], v[c, kvh], slot_seq[c]
            visible = _any_visible(seq, lo, hi, seen)  # not: e.g. a prompt's later blocks for its first queries
            work = np.empty(group * (STEP * 9 + 1), dtype=np.float32)
            lanes = np.empty(4, dtype=np.float64)
            buf = np.empty(0 if v_f16 else VALUE_ROWS * head_dim, dtype=np.float32)
            if visible:  # k_f16 alone decides which intrinsic is typed (a constant: Numba prunes the other)
                if k_f16:
                    _score_keys(keys, qf[i], seq, seen, scale, sc, kvh * group, group, lo, hi, work, spec_k)
                else:
                    _score_quantized_keys(keys, qq[i], qd[i], qc[i], seq, seen, scale, off[i], sc,
                                          kvh * group, lo, hi, work, spec_kq)
            for g in range(group):
                h = kvh * group + g
                top = work[group * STEP * 9 + g] if visible else np.float32(-np.inf)
                row = sc[h, lo:hi]
                if top == -np.inf:
                    row[:] = 0.0
                    refs[i, h, b] = _NONE
                    totals[i, h, b] = 0.0
                else:
                    ref = _ln2_steps_above(top)
                    refs[i, h, b] = ref
                    totals[i, h, b] = _softmax_block(sc, h, lo, hi, np.float32(ref) * _LN2, lanes)
            if visible:
                _weigh_values(values, sc, partial[i, b], seq, seen, kvh * group, lo, hi, buf, spec_v)
            else:
                partial[i, b, kvh * group:(kvh + 1) * group] = 0.0
        out = np.empty((nq, n_heads, head_dim), np.float32)
        for i in range(nq):
            out[i] = _merge_blocks(partial[i], refs[i], totals[i])
        return out

    name = f"{type_k.name.lower()}_{type_v.name.lower()}_{head_dim}_g{group}"
    if (avx2, f16c) != (X86_AVX2, F16C):
        name += f"_avx2{avx2:d}_f16c{f16c:d}"
    return specialise(kernel, f"decode_attention_{name}", parallel=True, fastmath={"contract"})


@njit(cache=True, inline="always")
def _any_visible(slot_seq, lo, hi, seen):
    """Whether some slot in [lo, hi) holds a token the query at stream index `seen` sees (0 <= seq <= seen)."""
    for s in range(lo, hi):
        if 0 <= slot_seq[s] <= seen:
            return True
    return False


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


_NO_OFFSETS = np.zeros((1, 1, 1), np.float32)  # F16 keys: no centers to add back (never read)


def _decode(q, k, v, slot_seq, which, lens, query_seq, scale, type_k, type_v, off=None):
    """The flash-decoding kernel for queries q float32[nq, n_heads, hd] at stream indices query_seq
    int64[nq], query i over cache which[i]'s first lens[i] slots of k, v uint8[n_caches, n_kv_heads,
    capacity, row_bytes], slot_seq int64[n_caches, capacity] (off: float32[nq, n_heads, n_center_blocks]
    or None) -> float32[nq, n_heads, hd]; each query's bits are those it gets alone."""
    longest = int(lens.max())
    if BLOCK < longest and int(lens.sum()) * q[0].size < SERIAL_MACS:
        threads = numba.get_num_threads()
        if threads > 1:
            numba.set_num_threads(1)  # the kernels give the same bits on any number of threads
            try:
                return _decode_run(q, k, v, slot_seq, which, lens, query_seq, scale, type_k, type_v, off, longest)
            finally:
                numba.set_num_threads(threads)
    return _decode_run(q, k, v, slot_seq, which, lens, query_seq, scale, type_k, type_v, off, longest)


def _decode_run(q, k, v, slot_seq, which, lens, query_seq, scale, type_k, type_v, off, n_slots):
    nq, n_heads, hd = q.shape
    n_blocks = max(1, -(-n_slots // BLOCK))
    kernel = _decode_kernel(type_k, type_v, hd, n_heads // k.shape[1])
    if off is None:
        off = _NO_OFFSETS if type_k == T.F16 else np.zeros((nq, n_heads, -(-n_slots // CENTER_BLOCK)), np.float32)
    # the kernels address rows by pointer arithmetic: C-contiguous arrays (no copy for the caches' own)
    return kernel(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(k), np.ascontiguousarray(v),
                  np.ascontiguousarray(slot_seq, dtype=np.int64), which, lens,
                  np.ascontiguousarray(query_seq, dtype=np.int64),
                  scale, np.ascontiguousarray(off, dtype=np.float32), np.empty((nq, n_heads, n_slots), np.float32),
                  np.empty((nq, n_heads, n_blocks), np.int64), np.empty((nq, n_heads, n_blocks), np.float64),
                  np.empty((nq, n_blocks, n_heads, hd), np.float32))


@njit(cache=True)
def _merge_blocks(partial, refs, totals):
    """Flash-decoding's reduction: partial float32[n_blocks, n_heads, hd] (block b's sum of p * v, p against
    its reference refs[h, b] in steps of ln 2) rescaled to the largest reference by exact powers of two and
    summed in block order, divided by the rescaled float64 totals. Heads that saw nothing are zeros."""
    n_blocks, n_heads, hd = partial.shape
    out = np.zeros((n_heads, hd), np.float32)
    for h in range(n_heads):
        top = _NONE
        for blk in range(n_blocks):
            top = max(top, refs[h, blk])
        if top == _NONE:
            continue
        total = 0.0
        acc = np.zeros(hd, np.float32)
        for blk in range(n_blocks):
            if refs[h, blk] == _NONE:
                continue
            f = _two_to(refs[h, blk] - top)
            total += totals[h, blk] * f
            for d in range(hd):
                acc[d] += partial[blk, h, d] * f
        if total > 0:
            inv = np.float32(1.0 / total)
            for d in range(hd):
                out[h, d] = acc[d] * inv
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
