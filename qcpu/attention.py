"""Attention over the KV cache: softmax(q.k / sqrt(head_dim)) . v, causal by stream index.

The cache is `k, v` uint8[n_kv_heads, capacity, row_bytes] (cache.py's layout: rows of head_dim values in
the cache type) with `slot_seq[n_slots]`: the stream index of the token in each of the first n_slots
slots (-1: empty). Query i (stream index `query_seq[i]`) sees slot s iff
0 <= slot_seq[s] <= query_seq[i], so the kernels need no particular slot order and accept holes. Only the
slots passed in are visited: the cache passes its used prefix, so the cost follows the tokens held, not
the capacity.

- One query (decode): flash-decoding (Dao et al., 2023). Keys are split into blocks of `BLOCK` slots;
  each (kv head, block) task widens its keys with F16C once and scores them against all the queries of
  the GQA group; then exps per head; then each task sums weights times values and the per-block partial
  sums are added in block order.
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

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from qcpu.cache import from_rows, rotate, rotation
from qcpu.kernels import specialise
from qcpu.kernels.activations import ACTIVATION_ROUNDING
from qcpu.kernels.cpu import F16C, X86_AVX2
from qcpu.kernels.floats import dot_f32
from qcpu.kernels.halves import halves_to_f32
from qcpu.kernels.legacy import LAYOUTS, _row_dequantize, _row_dot, offset_sums, quantize_q8_0

BLOCK = 256  # keys per decode task: enough tasks for 2..16 threads at 4K+ tokens, little merging
TILE = 512  # keys per prefill tile: a [256 * group, 512] float32 score tile is a few MB


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, slot_seq: np.ndarray, query_seq: np.ndarray,
              type_k: T = T.F16, type_v: T = T.F16) -> np.ndarray:
    """Scaled dot-product attention of q float32[n, n_heads, head_dim] over the cache k, v
    uint8[n_kv_heads, capacity, row_bytes] of types type_k, type_v (slot_seq int64[n_slots], query_seq
    int64[n]: see the module docstring). Returns float32[n, n_heads, head_dim]. n_heads must be a multiple
    of n_kv_heads (GQA). A query that sees no slot gets zeros. Quantized rows are read as cache.py stores
    them: Hadamard-rotated (llama.cpp's attention rotation, `cache.rotation`)."""
    hd = q.shape[-1]
    scale = np.float32(1.0 / math.sqrt(hd))
    type_k, type_v = T(type_k), T(type_v)
    # quantized rows are stored Hadamard-rotated (cache.py): q.(Hk) needs Hq, and sum p (Hv) = H (sum p v)
    rot_k, rot_v = rotation(type_k, hd, keys=True), rotation(type_v, hd, keys=False)
    q = rotate(q, rot_k)
    if q.shape[0] == 1:
        out = _decode(q[0], k, v, slot_seq, int(query_seq[0]), scale, type_k, type_v)[None]
    else:
        # llama.cpp converts q to K's vec_dot_type first: F16, or Q8_0 for the quantized caches
        q = ACTIVATION_ROUNDING[type_k](q.reshape(-1, hd)).reshape(q.shape)
        out = _prefill(q, k, v, slot_seq, query_seq, scale, type_k, type_v)
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

@functools.cache
def _decode_kernels(type_k: T, type_v: T):
    """(scores, values) decode kernels for one pair of cache types, jitted once (kernels.specialise).

    scores(q, qq, qd, qc, k, slot_seq, query_seq, scale, scores, block_max): scores[n_heads, n_slots] =
      q.k * scale (-inf where hidden), block_max[n_heads, n_blocks] their maxima. F16 keys are widened
      (F16C) once per GQA group and dotted with the fp16-rounded q; quantized keys are dotted as integers
      with q quantized to Q8_0 (qq, qd; qc: Q4_0's offset sums), llama.cpp's vec_dot_q8_0_q8_0 /
      vec_dot_q4_0_q8_0.
    values(probs, v, partial): partial[n_blocks, n_heads, hd] = sum over each block's slots of p * v,
      with v widened or dequantized one row at a time into float32.
    """
    k_f16, v_f16 = type_k == T.F16, type_v == T.F16
    # the layouts the quantized paths read; unused (but typed) for F16
    spec_k = (*LAYOUTS[T.Q8_0 if k_f16 else type_k], X86_AVX2, F16C)
    spec_v = (*LAYOUTS[T.Q8_0 if v_f16 else type_v], X86_AVX2, F16C)

    def scores_kernel(q, qq, qd, qc, k, slot_seq, query_seq, scale, scores, block_max):
        n_heads, hd = q.shape
        n_slots, n_kv = scores.shape[1], k.shape[0]
        group = n_heads // n_kv
        n_blocks = block_max.shape[1]
        for task in prange(n_kv * n_blocks):
            kvh, b = task // n_blocks, task % n_blocks
            k_row = np.empty(hd, dtype=np.float32)
            best = np.full(group, -np.inf, dtype=np.float32)
            for s in range(b * BLOCK, min(n_slots, (b + 1) * BLOCK)):
                seq = slot_seq[s]
                if seq < 0 or seq > query_seq:
                    for g in range(group):
                        scores[kvh * group + g, s] = -np.inf
                    continue
                if k_f16:
                    halves_to_f32(k[kvh, s].view(np.uint16), k_row)  # once for the whole group
                for g in range(group):
                    h = kvh * group + g
                    if k_f16:
                        x = dot_f32(q[h], k_row) * scale  # summed in one fixed order on every CPU
                    else:
                        x = _row_dot(k[kvh, s], qq[h], qd[h], qd[h], qc[h], spec_k) * scale
                    scores[h, s] = x
                    best[g] = max(best[g], x)
            for g in range(group):
                block_max[kvh * group + g, b] = best[g]

    def values_kernel(probs, v, partial):
        n_heads, n_slots = probs.shape
        n_kv, hd = v.shape[0], partial.shape[2]
        group = n_heads // n_kv
        n_blocks = partial.shape[0]
        for task in prange(n_kv * n_blocks):
            kvh, b = task // n_blocks, task % n_blocks
            v_row = np.empty(hd, dtype=np.float32)
            acc = np.zeros((group, hd), dtype=np.float32)
            for s in range(b * BLOCK, min(n_slots, (b + 1) * BLOCK)):
                seen = False
                for g in range(group):
                    seen |= probs[kvh * group + g, s] != 0.0
                if not seen:
                    continue
                if v_f16:
                    halves_to_f32(v[kvh, s].view(np.uint16), v_row)
                else:
                    _row_dequantize(v[kvh, s], v_row, spec_v)
                for g in range(group):
                    p = probs[kvh * group + g, s]
                    for d in range(hd):
                        acc[g, d] += p * v_row[d]
            for g in range(group):
                partial[b, kvh * group + g, :] = acc[g]

    # Only FMA contraction, no re-association: sums keep one order on every CPU.
    name = f"{type_k.name.lower()}_{type_v.name.lower()}"
    return (specialise(scores_kernel, f"decode_scores_{name}", parallel=True, fastmath={"contract"}),
            specialise(values_kernel, f"decode_values_{name}", parallel=True, fastmath={"contract"}))


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
    n_heads, n_slots = scores.shape
    for h in prange(n_heads):
        top = np.float32(-np.inf)
        for b in range(block_max.shape[1]):
            top = max(top, block_max[h, b])
        if top == -np.inf:
            scores[h, :] = 0.0
            total[h] = 0.0
            continue
        total[h] = _exp_round_sum(scores[h], np.float32(_ln2_steps_above(top)) * _LN2)


_NO_QUANTS = (np.zeros((1, 32), np.int8), np.zeros((1, 1), np.float32), np.zeros((1, 8), np.int32))


def _decode(q, k, v, slot_seq, query_seq, scale, type_k, type_v):
    n_heads, hd = q.shape
    n_slots = len(slot_seq)
    n_blocks = max(1, -(-n_slots // BLOCK))
    scores_kernel, values_kernel = _decode_kernels(type_k, type_v)
    if type_k == T.F16:
        q = q.astype(np.float16).astype(np.float32)  # llama.cpp converts q to K's type for K.Q
        qq, qd, qc = _NO_QUANTS
    else:
        qq, qd, qc = _quantize_heads(q, LAYOUTS[type_k][4])
    scores = np.empty((n_heads, n_slots), dtype=np.float32)
    block_max = np.empty((n_heads, n_blocks), dtype=np.float32)
    total = np.empty(n_heads, dtype=np.float64)
    scores_kernel(q, qq, qd, qc, k, slot_seq, query_seq, scale, scores, block_max)
    _decode_softmax(scores, block_max, total)
    partial = np.empty((n_blocks, n_heads, hd), dtype=np.float32)
    values_kernel(scores, v, partial)
    out = partial.sum(axis=0) if n_blocks > 1 else partial[0]
    return _normalize(out, total)


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


def _prefill(q, k, v, slot_seq, query_seq, scale, type_k, type_v):
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
            _fold_tile(s, row_seq, tile_seq, masked, m, l, alpha)
            acc *= alpha[:, None]
            acc += s @ from_rows(v[kvh, lo:hi], type_v, hd)
        out[:, kvh * group:(kvh + 1) * group] = _normalize(acc, l).reshape(nq, group, hd)
    return out
