"""The decode micro-kernels (attention._score_keys / _weigh_values, 8 keys at a time in LLVM IR) against
a key-at-a-time reference built on floats.dot_f32 / legacy._row_dot / _row_dequantize: bit for bit, with
holes, keys newer than the query, partial blocks and partial steps; and the portable IR (no AVX2, no F16C)
against the native one."""

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
from qcpu.kernels.legacy import LAYOUTS, _row_dequantize, _row_dot

BLOCK = att.BLOCK


@functools.cache
def reference_kernels(type_k, type_v):
    """One key at a time, one dot per (head, key): the order the micro-kernels must reproduce."""
    k_f16, v_f16 = type_k == T.F16, type_v == T.F16
    spec_k = (*LAYOUTS[T.Q8_0 if k_f16 else type_k], X86_AVX2, F16C)
    spec_v = (*LAYOUTS[T.Q8_0 if v_f16 else type_v], X86_AVX2, F16C)

    def scores_ref(q, qq, qd, qc, k, slot_seq, query_seq, scale, off, scores, block_max):
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
                    halves_to_f32(k[kvh, s].view(np.uint16), k_row)
                for g in range(group):
                    h = kvh * group + g
                    if k_f16:
                        x = dot_f32(q[h], k_row) * scale
                    else:
                        x = _row_dot(k[kvh, s], qq[h], qd[h], qd[h], qc[h], spec_k) * scale
                    scores[h, s] = x
                    best[g] = max(best[g], x)
            if not k_f16:  # then the key centers' q.c * scale, block by block (cache.KeyCenters)
                for g in range(group):
                    h = kvh * group + g
                    best[g] = -np.inf
                    for s in range(b * BLOCK, min(n_slots, (b + 1) * BLOCK)):
                        scores[h, s] = scores[h, s] + off[h, s // att.CENTER_BLOCK]
                        best[g] = max(best[g], scores[h, s])
            for g in range(group):
                block_max[kvh * group + g, b] = best[g]

    def values_ref(probs, v, partial):
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

    name = f"{type_k.name.lower()}_{type_v.name.lower()}"
    return (specialise(scores_ref, f"test_ref_decode_scores_{name}", parallel=True, fastmath={"contract"}),
            specialise(values_ref, f"test_ref_decode_values_{name}", parallel=True, fastmath={"contract"}))


def case(type_k, n_kv, group, hd, n_slots, seed, poison=False):
    """A cache with holes and keys newer than the query; `poison`: hidden slots hold NaN/inf rows."""
    rng = np.random.default_rng(seed)
    k = to_rows((rng.standard_normal((n_kv, n_slots, hd)) * 2).astype(np.float32), type_k)
    v = to_rows(rng.standard_normal((n_kv, n_slots, hd)).astype(np.float32), type_k)
    q = (rng.standard_normal((n_kv * group, hd)) * 2).astype(np.float32)
    seq = rng.permutation(n_slots + 40)[:n_slots].astype(np.int64)
    seq[rng.random(n_slots) < 0.1] = -1
    query = int(np.median(seq)) if n_slots > 8 else n_slots + 40
    if poison:
        hidden = (seq < 0) | (seq > query)
        k[:, hidden] = 0xFF  # fp16 NaN bits / NaN scales
        v[:, hidden] = 0xFF
    if type_k == T.F16:
        qf, (qq, qd, qc) = q.astype(np.float16).astype(np.float32), att._NO_QUANTS
    else:
        qf, (qq, qd, qc) = q, att._quantize_heads(q, LAYOUTS[type_k][4])
    off = rng.standard_normal((n_kv * group, max(1, -(-n_slots // att.CENTER_BLOCK)))).astype(np.float32)
    return qf, qq, qd, qc, np.ascontiguousarray(k), np.ascontiguousarray(v), seq, query, off


def run(kernels, type_k, n_kv, group, hd, n_slots, seed, poison=False):
    scores_kernel, values_kernel = kernels[:2]
    qf, qq, qd, qc, k, v, seq, query, off = case(type_k, n_kv, group, hd, n_slots, seed, poison)
    n_heads, n_blocks = n_kv * group, max(1, -(-n_slots // BLOCK))
    scale = np.float32(1 / np.sqrt(hd))
    scores = np.full((n_heads, n_slots), np.nan, np.float32)
    block_max = np.full((n_heads, n_blocks), np.nan, np.float32)
    scores_kernel(qf, qq, qd, qc, k, seq, query, scale, off, scores, block_max)
    # the values kernel weighs a fixed, softmax-like probability matrix (exact zeros where hidden)
    probs = np.where(np.isfinite(scores), np.abs(np.sin(np.arange(scores.size)).reshape(scores.shape)), 0)
    probs = probs.astype(np.float16).astype(np.float32)
    probs[:, ::7] = 0.0  # some visible slots weigh nothing for some heads
    partial = np.full((n_blocks, n_heads, hd), np.nan, np.float32)
    values_kernel(probs, v, partial)
    return scores, block_max, partial


SHAPES = [(2, 7, 64, 3 * BLOCK + 17), (3, 1, 128, BLOCK + 5), (1, 3, 32, 13), (2, 2, 64, 5), (1, 1, 64, 0)]


def bits(a):
    return a.view(np.uint32)


@pytest.mark.parametrize("type_k", [T.F16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_kv,group,hd,n_slots", SHAPES)
def test_micro_kernels_equal_the_key_at_a_time_reference_bit_for_bit(type_k, n_kv, group, hd, n_slots):
    ours = run(att._decode_kernels(type_k, type_k, hd), type_k, n_kv, group, hd, n_slots, seed=n_slots)
    ref = run(reference_kernels(type_k, type_k), type_k, n_kv, group, hd, n_slots, seed=n_slots)
    if type_k != T.F16 and not X86_AVX2:
        # legacy's portable dot spreads the integer terms over other lanes than its AVX2 one (and than
        # attention's dot, the same everywhere): the scores' float sums may differ in the last bits
        for a, b in zip(ours[:2], ref[:2]):
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=False) or np.array_equal(a, b)
        ours, ref = ours[2:], ref[2:]
    for a, b in zip(ours, ref):
        assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("type_k", [T.F16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_portable_ir_gives_the_same_numbers(type_k):
    """The IR CPUs without AVX2/F16C run (built here on every machine) against the native build."""
    n_kv, group, hd, n_slots = SHAPES[0]
    native = run(att._decode_kernels(type_k, type_k, hd), type_k, n_kv, group, hd, n_slots, seed=5)
    portable = run(att._decode_kernels(type_k, type_k, hd, avx2=False, f16c=False), type_k, n_kv, group, hd,
                   n_slots, seed=5)
    for a, b in zip(native, portable):
        assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("type_k", [T.F16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_hidden_slots_are_never_read_into_the_results(type_k):
    """NaN/inf bytes in hidden slots (holes, keys newer than the query) change nothing."""
    n_kv, group, hd, n_slots = SHAPES[0]
    kernels = att._decode_kernels(type_k, type_k, hd)
    clean = run(kernels, type_k, n_kv, group, hd, n_slots, seed=9)
    poisoned = run(kernels, type_k, n_kv, group, hd, n_slots, seed=9, poison=True)
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
@pytest.mark.parametrize("n_kv,group,hd,n_slots", [s for s in SHAPES if s[3] <= BLOCK])
def test_one_block_kernel_equals_the_three_steps(type_k, n_kv, group, hd, n_slots):
    """Up to BLOCK slots decode runs scores, softmax and values as one region: the same bits as the three
    kernels one after the other (hidden slots poisoned, so reading one would show)."""
    scores_kernel, values_kernel, one_block = att._decode_kernels(type_k, type_k, hd)
    qf, qq, qd, qc, k, v, seq, query, off = case(type_k, n_kv, group, hd, n_slots, seed=11, poison=True)
    n_heads, scale = n_kv * group, np.float32(1 / np.sqrt(hd))
    s3, bm = np.full((n_heads, n_slots), np.nan, np.float32), np.full((n_heads, 1), np.nan, np.float32)
    t3, p3 = np.full(n_heads, np.nan), np.full((1, n_heads, hd), np.nan, np.float32)
    scores_kernel(qf, qq, qd, qc, k, seq, query, scale, off, s3, bm)
    att._decode_softmax(s3, bm, t3)
    values_kernel(s3, v, p3)
    s1, t1, p1 = np.full_like(s3, np.nan), np.full_like(t3, np.nan), np.full_like(p3, np.nan)
    one_block(qf, qq, qd, qc, k, v, seq, query, scale, off, s1, t1, p1)
    assert np.array_equal(bits(s1), bits(s3)) and np.array_equal(t1.view(np.uint64), t3.view(np.uint64))
    assert np.array_equal(bits(p1), bits(p3))
