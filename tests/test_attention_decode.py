"""The fused decode kernel (attention._decode_kernel: the LLVM IR micro-kernels _score_keys,
_score_quantized_keys and _weigh_values, 8 keys at a time, and each block's softmax) against a key-at-a-time
reference built on floats.dot_f32, integer block dots read from the row bytes, and _row_dequantize: bit for
bit, with holes, keys newer than the query, partial blocks and partial steps; and the portable IR (no AVX2,
no F16C) against the native one."""

import functools

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from numba import prange

from qcpu import attention as att
from qcpu.cache import to_rows
from qcpu.kernels import specialise
from qcpu.kernels.cpu import F16C, X86_AVX2
from qcpu.kernels.floats import dot_f32
from qcpu.kernels.halves import halves_to_f32
from qcpu.kernels.legacy import LAYOUTS, _row_dequantize

BLOCK = att.BLOCK


@functools.cache
def reference_kernel(type_k, type_v, group):
    """One key at a time, one dot per (head, key), the block softmax and the values one slot at a time: the
    order the fused decode kernel must reproduce. Quantized keys: llama.cpp's scalar vec_dot_q8_0_q8_0,
    sum over blocks of float(integer dot) * (d_k * d_q), the quants read straight from the row bytes."""
    k_f16, v_f16 = type_k == T.F16, type_v == T.F16
    spec_v = (*LAYOUTS[T.Q8_0 if v_f16 else type_v], X86_AVX2, F16C)
    k_size = LAYOUTS[T.Q8_0 if k_f16 else type_k][0]
    q4 = type_k == T.Q4_0
    block = att.BLOCK

    def ref(q, qq, qd, qc, k, v, slot_seq, query_seq, scale, off, scores, refs, totals, partial):
        n_heads, hd = q.shape
        n_slots, n_kv = scores.shape[1], k.shape[0]
        n_blocks = refs.shape[1]
        for task in prange(n_kv * n_blocks):
            kvh, b = task // n_blocks, task % n_blocks
            lo, hi = b * block, min(n_slots, (b + 1) * block)
            k_row = np.empty(hd, dtype=np.float32)
            for s in range(lo, hi):
                seq = slot_seq[s]
                if seq < 0 or seq > query_seq:
                    for g in range(group):
                        scores[kvh * group + g, s] = -np.inf
                    continue
                if k_f16:
                    halves_to_f32(k[kvh, s].view(np.uint16), k_row)
                for g in range(group):
                    h = kvh * group + g
                    if k_f16:
                        x = dot_f32(q[h], k_row) * scale
                    else:
                        x = np.float32(0.0)
                        for i in range(hd // 32):
                            blk = k[kvh, s, i * k_size:(i + 1) * k_size]
                            d = halves_to_f32_one(blk[0], blk[1])
                            isum = 0
                            for j in range(32):
                                if q4:
                                    nib = blk[2 + j % 16] >> 4 if j >= 16 else blk[2 + j] & 15
                                    w = np.int32(nib) - 8
                                else:
                                    w = np.int32(np.int8(blk[2 + j]))
                                isum += w * np.int32(qq[h, i * 32 + j])
                            x += np.float32(isum) * (d * qd[h, i])
                        x = x * scale + off[h, s // att.CENTER_BLOCK]  # + the key centers' q.c * scale
                    scores[h, s] = x
            for g in range(group):
                h = kvh * group + g
                top = np.float32(-np.inf)
                for s in range(lo, hi):
                    top = max(top, scores[h, s])
                if top == -np.inf:
                    scores[h, lo:hi] = 0.0
                    refs[h, b] = att._NONE
                    totals[h, b] = 0.0
                else:
                    refs[h, b] = att._ln2_steps_above(top)
                    totals[h, b] = att._exp_round_sum(scores[h, lo:hi], np.float32(refs[h, b]) * att._LN2)
            v_row = np.empty(hd, dtype=np.float32)
            acc = np.zeros((group, hd), dtype=np.float32)
            for s in range(lo, hi):
                seq = slot_seq[s]
                if seq < 0 or seq > query_seq:
                    continue
                if v_f16:
                    halves_to_f32(v[kvh, s].view(np.uint16), v_row)
                else:
                    _row_dequantize(v[kvh, s], v_row, spec_v)
                for g in range(group):
                    p = scores[kvh * group + g, s]
                    for d in range(hd):
                        acc[g, d] += p * v_row[d]
            for g in range(group):
                partial[b, kvh * group + g, :] = acc[g]

    name = f"{type_k.name.lower()}_{type_v.name.lower()}_g{group}"
    return specialise(ref, f"test_ref_decode_{name}", parallel=True, fastmath={"contract"})


@numba.njit(cache=True)
def halves_to_f32_one(lo, hi):
    h = np.empty(1, np.uint16)
    h[0] = np.uint16(lo) | (np.uint16(hi) << np.uint16(8))
    out = np.empty(1, np.float32)
    halves_to_f32(h, out)
    return out[0]


def case(type_k, n_kv, group, hd, n_slots, seed, poison=False, hidden="everywhere"):
    """A cache with holes and keys newer than the query; `poison`: hidden slots hold NaN/inf rows.
    hidden: "everywhere" (random stream order, 10% holes), "last block" (slots in stream order, holes and
    newer keys only in the last BLOCK slots: the others take the kernel's every-slot-visible path), or
    "none" (every slot visible)."""
    rng = np.random.default_rng(seed)
    k = to_rows((rng.standard_normal((n_kv, n_slots, hd)) * 2).astype(np.float32), type_k)
    v = to_rows(rng.standard_normal((n_kv, n_slots, hd)).astype(np.float32), type_k)
    q = (rng.standard_normal((n_kv * group, hd)) * 2).astype(np.float32)
    if hidden == "everywhere":
        seq = rng.permutation(n_slots + 40)[:n_slots].astype(np.int64)
        seq[rng.random(n_slots) < 0.1] = -1
        query = int(np.median(seq)) if n_slots > 8 else n_slots + 40
    else:
        seq = np.arange(n_slots, dtype=np.int64)
        query = n_slots - 1
        if hidden == "last block" and n_slots > BLOCK:
            tail = np.arange((n_slots - 1) // BLOCK * BLOCK, n_slots)
            seq[tail[::3]] = -1
            query = n_slots - 3
    if poison:
        unseen = (seq < 0) | (seq > query)
        k[:, unseen] = 0xFF  # fp16 NaN bits / NaN scales
        v[:, unseen] = 0xFF
    if type_k == T.F16:
        qf, (qq, qd, qc) = q.astype(np.float16).astype(np.float32), (np.zeros((1, 32), np.int8),
                                                                      np.zeros((1, 1), np.float32),
                                                                      np.zeros((1, 8), np.int32))
    else:
        qf, (qq, qd, qc) = q, att._quantize_heads(q, LAYOUTS[type_k][4])
    off = rng.standard_normal((n_kv * group, max(1, -(-n_slots // att.CENTER_BLOCK)))).astype(np.float32)
    return q, qf, qq, qd, qc, np.ascontiguousarray(k), np.ascontiguousarray(v), seq, query, off


def run(kernel, type_k, n_kv, group, hd, n_slots, seed, poison=False, hidden="everywhere", reference=False):
    """The fused decode kernel (or, with `reference`, the reference) on a case: (probabilities, refs,
    totals, partial, output). The kernel converts q itself; the reference is given q as case() converts it,
    and its blocks are merged by _merge_blocks."""
    q, qf, qq, qd, qc, k, v, seq, query, off = case(type_k, n_kv, group, hd, n_slots, seed, poison, hidden)
    n_heads, n_blocks = n_kv * group, max(1, -(-n_slots // BLOCK))
    scale = np.float32(1 / np.sqrt(hd))
    scores = np.full((n_heads, n_slots), np.nan, np.float32)
    refs = np.full((n_heads, n_blocks), -7, np.int64)
    totals = np.full((n_heads, n_blocks), np.nan)
    partial = np.full((n_blocks, n_heads, hd), np.nan, np.float32)
    if reference:
        kernel(qf, qq, qd, qc, k, v, seq, query, scale, off, scores, refs, totals, partial)
        out = att._merge_blocks(partial, refs, totals)
    else:  # one query: the kernel's leading query axis of length 1
        out = kernel(q[None], k[None], v[None], seq[None], np.zeros(1, np.int64), np.array([n_slots], np.int64),
                     np.array([query], np.int64), scale, off[None], scores[None], refs[None], totals[None],
                     partial[None])[0]
    return scores, refs, totals, partial, out


SHAPES = [(2, 7, 64, 3 * BLOCK + 17), (3, 1, 128, BLOCK + 5), (1, 3, 32, 13), (2, 2, 64, 5), (1, 1, 64, 0)]


def bits(a):
    return a.view(np.uint64 if a.dtype.itemsize == 8 else np.uint32)


@pytest.mark.parametrize("type_k", [T.F16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_kv,group,hd,n_slots", SHAPES)
@pytest.mark.parametrize("hidden", ["everywhere", "last block"])
def test_decode_kernel_equals_the_key_at_a_time_reference_bit_for_bit(type_k, n_kv, group, hd, n_slots, hidden):
    ours = run(att._decode_kernel(type_k, type_k, hd, group), type_k, n_kv, group, hd, n_slots, n_slots, hidden=hidden)
    ref = run(reference_kernel(type_k, type_k, group), type_k, n_kv, group, hd, n_slots, n_slots, hidden=hidden,
              reference=True)
    for a, b in zip(ours, ref):
        assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("type_k", [T.F16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_portable_ir_gives_the_same_numbers(type_k):
    """The IR CPUs without AVX2/F16C run (built here on every machine) against the native build."""
    n_kv, group, hd, n_slots = SHAPES[0]
    for hidden in ("everywhere", "last block"):
        native = run(att._decode_kernel(type_k, type_k, hd, group), type_k, n_kv, group, hd, n_slots, 5,
                     hidden=hidden)
        portable = run(att._decode_kernel(type_k, type_k, hd, group, avx2=False, f16c=False), type_k, n_kv, group,
                       hd, n_slots, 5, hidden=hidden)
        for a, b in zip(native, portable):
            assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("type_k", [T.F16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_hidden_slots_are_never_read_into_the_results(type_k):
    """NaN/inf bytes in hidden slots (holes, keys newer than the query) change nothing."""
    n_kv, group, hd, n_slots = SHAPES[0]
    kernel = att._decode_kernel(type_k, type_k, hd, group)
    clean = run(kernel, type_k, n_kv, group, hd, n_slots, seed=9)
    poisoned = run(kernel, type_k, n_kv, group, hd, n_slots, seed=9, poison=True)
    for a, b in zip(clean, poisoned):
        assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("type_k", [T.F16, T.Q8_0], ids=lambda t: t.name)
def test_small_attention_on_one_thread_gives_the_same_bits(type_k, monkeypatch):
    """Below SERIAL_MACS decode attention runs on the calling thread; the result must not change."""
    n_kv, group, hd, n_slots = SHAPES[0]  # more than BLOCK slots: the serial path applies
    rng = np.random.default_rng(4)
    k = to_rows((rng.standard_normal((n_kv, n_slots, hd)) * 2).astype(np.float32), type_k)
    v = to_rows(rng.standard_normal((n_kv, n_slots, hd)).astype(np.float32), type_k)
    q = rng.standard_normal((1, n_kv * group, hd)).astype(np.float32)
    seq = np.arange(n_slots, dtype=np.int64)
    query = np.array([n_slots], np.int64)
    runs, before = [], numba.get_num_threads()
    for threshold in (0, 1 << 40):  # always parallel, always serial
        monkeypatch.setattr(att, "SERIAL_MACS", threshold)
        runs.append(att.attention(q, k, v, seq, query, type_k, type_k))
    assert np.array_equal(bits(runs[0]), bits(runs[1]))
    assert numba.get_num_threads() == before  # restored


@pytest.mark.parametrize("type_k", [T.F16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_several_queries_in_one_call_are_each_query_alone(type_k):
    """Several queries (a prompt chunk, drafted tokens) run as one call of the decode
    kernel: each row bit for bit what that query alone gets, holes and causal visibility included, with
    the key centers' offsets (quantized keys) per query."""
    n_kv, group, hd, n_slots = SHAPES[0]
    q1, _, _, _, _, k, v, seq, _, off1 = case(type_k, n_kv, group, hd, n_slots, seed=11)
    rng = np.random.default_rng(12)
    nq = 6
    q = (rng.standard_normal((nq, n_kv * group, hd)) * 2).astype(np.float32)
    off = rng.standard_normal((nq, *off1.shape)).astype(np.float32)
    queries = np.sort(rng.choice(np.arange(-1, n_slots + 40), nq, replace=False)).astype(np.int64)
    scale = np.float32(1 / np.sqrt(hd))
    def decode(q, queries, off):
        n = len(q)
        return att._decode(q, k[None], v[None], seq[None], np.zeros(n, np.int64), np.full(n, n_slots, np.int64),
                           queries, scale, type_k, type_k, None if type_k == T.F16 else off)

    together = decode(q, queries, off)
    for i in range(nq):
        alone = decode(q[i:i + 1], queries[i:i + 1], off[i:i + 1])
        assert np.array_equal(bits(together[i]), bits(alone[0]))
    assert np.array_equal(together[queries < 0], np.zeros_like(together[queries < 0]))  # sees nothing: zeros
