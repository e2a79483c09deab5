"""Attention over the KV cache: softmax(q.k / sqrt(head_dim)) . v, causal by stream index.

Rounds q and the probabilities to fp16 as llama.cpp's (non-flash) attention does.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from qcpu.kernels.floats import _halves_to_f32, dot_f32, f32_to_f16

# The KV cache holds float16 (half the memory of float32, as llama.cpp's default). Numba has no float16,
# so kernels read the raw bits through this 256 KiB table, which stays in L2.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# Only FMA contraction, no re-association: fastmath=True would let LLVM split sums at the host's vector width.
@njit(parallel=True, fastmath={"contract"}, cache=True)
def _attention(q, k_bits, v_bits, slot_seq, query_seq, scale, lut, out):
    # q[nq, n_heads, hd]; k_bits, v_bits uint16[slots, n_kv, hd]; slot_seq[slots] (-1 = empty);
    # query i sees slot s iff 0 <= slot_seq[s] <= query_seq[i] (causal, order-free over the ring).
    nq, n_heads, hd = q.shape
    n_slots, n_kv = k_bits.shape[0], k_bits.shape[1]
    group = n_heads // n_kv
    for task in prange(nq * n_heads):
        i = task // n_heads
        h = task % n_heads
        kvh = h // group
        scores = np.empty(n_slots, dtype=np.float32)
        k_row = np.empty(hd, dtype=np.float32)
        best = -np.inf
        for s in range(n_slots):
            seq = slot_seq[s]
            if seq < 0 or seq > query_seq[i]:
                scores[s] = -np.inf
                continue
            _halves_to_f32(k_bits[s, kvh], k_row)  # F16C where the CPU has it
            acc = dot_f32(q[i, h], k_row) * scale  # summed in one fixed order on every CPU
            scores[s] = acc
            if acc > best:
                best = acc
        total = 0.0  # float64, as ggml's soft_max sums
        for s in range(n_slots):
            if scores[s] != -np.inf:
                e = np.float32(math.exp(scores[s] - best))
                scores[s] = e
                total += e
            else:
                scores[s] = 0.0
        inv_total = np.float32(1.0 / total)
        for d in range(hd):
            out[i, h, d] = 0.0
        for s in range(n_slots):
            p = scores[s]
            if p != 0.0:
                p = lut[f32_to_f16(p * inv_total)]  # llama.cpp rounds the probabilities to fp16 for V
                for d in range(hd):
                    out[i, h, d] += p * lut[v_bits[s, kvh, d]]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, slot_seq: np.ndarray, query_seq: np.ndarray) -> np.ndarray:
    """Scaled dot-product attention of q[n, n_heads, hd] over float16 k, v[slots, n_kv_heads, hd].

    Rounds q and the probabilities to fp16 as llama.cpp's (non-flash) attention does. One query (decode):
    a Numba kernel reading the fp16 cache in place. Many (prefill): BLAS over the live slots.
    """
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    q = q.astype(np.float16).astype(np.float32)
    if q.shape[0] == 1:
        out = np.empty(q.shape, dtype=np.float32)
        _attention(q, k.view(np.uint16), v.view(np.uint16), slot_seq, query_seq, scale, F16_TO_F32, out)
        return out
    return _attention_batched(q, k, v, slot_seq, query_seq, scale)


def _attention_batched(q, k, v, slot_seq, query_seq, scale):
    nq, n_heads, hd = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    live = np.flatnonzero((slot_seq >= 0) & (slot_seq <= query_seq.max()))
    keys = k[live].astype(np.float32).transpose(1, 2, 0)  # [n_kv, hd, L]
    values = v[live].astype(np.float32).transpose(1, 0, 2)  # [n_kv, L, hd]
    # queries of one kv head's group side by side: [n_kv, nq * group, hd]
    qg = q.reshape(nq, n_kv, group, hd).transpose(1, 0, 2, 3).reshape(n_kv, nq * group, hd)
    scores = np.matmul(qg, keys) * scale  # [n_kv, nq * group, L]
    hidden = slot_seq[live][None, :] > np.repeat(query_seq, group)[:, None]  # causal mask [nq * group, L]
    scores[:, hidden] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    inv_total = (1.0 / scores.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    probs = (scores * inv_total).astype(np.float16).astype(np.float32)
    out = np.matmul(probs, values)  # [n_kv, nq * group, hd]
    return out.reshape(n_kv, nq, group, hd).transpose(1, 0, 2, 3).reshape(nq, n_heads, hd)
