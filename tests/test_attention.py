"""Attention kernels (flash-decoding, for one query or several; tiled online-softmax prefill) against
float64 NumPy, over a cache with holes, slots in any order and queries that see nothing."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qcpu import attention as att
from qcpu.cache import rotate, rotation, to_rows


@pytest.fixture(autouse=True, params=["decode kernel", "tiled prefill"])
def several_queries_by(request, monkeypatch):
    """Every test twice: several queries through the flash-decoding kernel (scores within
    DECODE_SCORES_BYTES), and through the tiled prefill (the bound at 0). One query always decodes."""
    monkeypatch.setattr(att, "DECODE_SCORES_BYTES", 1 << 40 if request.param == "decode kernel" else 0)
    return request.param


def as_cache(x, ggml_type=T.F16, keys=True):
    """[n_slots, n_kv, hd] float -> the cache's layout uint8[n_kv, n_slots, row_bytes] in ggml_type, rows
    Hadamard-rotated first where KVCache.write rotates them."""
    x = rotate(np.asarray(x, dtype=np.float32), rotation(ggml_type, x.shape[-1], keys))
    return np.ascontiguousarray(to_rows(x.transpose(1, 0, 2), ggml_type))


def attend(q, k, v, seq, query_seq, type_k=T.F16, type_v=T.F16):
    return att.attention(q, as_cache(k, type_k), as_cache(v, type_v, keys=False), seq, query_seq, type_k, type_v)


def reference(q, k, v, slot_seq, query_seq):
    """softmax(q.k / sqrt(hd)) v in float64 over the slots each query may see (0 <= seq <= its own)."""
    nq, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    out = np.zeros((nq, n_heads, hd))
    for i in range(nq):
        seen = (slot_seq >= 0) & (slot_seq <= query_seq[i])
        if not seen.any():
            continue
        for h in range(n_heads):
            keys, values = k[seen, h // group].astype(np.float64), v[seen, h // group].astype(np.float64)
            s = keys @ q[i, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ values
    return out


def cache_with_holes(rng, n_slots, n_kv, hd, hole_fraction=0.1):
    k = (rng.standard_normal((n_slots, n_kv, hd)) * 2).astype(np.float16)
    v = rng.standard_normal((n_slots, n_kv, hd)).astype(np.float16)
    seq = rng.permutation(n_slots + 40)[:n_slots].astype(np.int64)  # any slot order, gaps in the stream
    seq[rng.random(n_slots) < hole_fraction] = -1
    return k, v, seq


# (slots, queries, heads, kv heads, head dim): several decode blocks / prefill tiles, GQA and MHA
SHAPES = [(5, 1, 4, 4, 16), (att.BLOCK * 3 + 17, 1, 14, 2, 64), (900, 37, 14, 2, 64),
          (att.TILE * 2 + 100, 300, 8, 2, 32), (64, 64, 2, 1, 128)]


@pytest.mark.parametrize("n_slots,nq,n_heads,n_kv,hd", SHAPES)
def test_attention_matches_float64(n_slots, nq, n_heads, n_kv, hd):
    rng = np.random.default_rng(n_slots + nq)
    k, v, seq = cache_with_holes(rng, n_slots, n_kv, hd)
    query_seq = np.sort(rng.choice(np.arange(n_slots // 2, n_slots + 40), nq, replace=False)).astype(np.int64)
    q = (rng.standard_normal((nq, n_heads, hd)) * 2).astype(np.float32)
    ours = attend(q, k, v, seq, query_seq)
    # q rounded to fp16 as the kernels (and llama.cpp) do; probabilities to fp16: ~1e-3 relative at most
    ref = reference(q.astype(np.float16).astype(np.float32), k, v, seq, query_seq)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 2e-3 * np.abs(ref).max()


def test_a_query_that_sees_nothing_gets_zeros_and_the_others_are_unaffected():
    rng = np.random.default_rng(1)
    k, v, _ = cache_with_holes(rng, 50, 2, 16, 0)
    seq = np.arange(10, 60, dtype=np.int64)
    q = rng.standard_normal((3, 4, 16)).astype(np.float32)
    query_seq = np.array([5, 30, 59])  # the first is older than every cached token
    out = attend(q, k, v, seq, query_seq)
    assert not out[0].any()
    ref = reference(q.astype(np.float16).astype(np.float32), k, v, seq, query_seq)
    assert np.abs(out - ref).max() < 2e-3 * np.abs(ref).max()
    one = attend(q[:1], k, v, seq, query_seq[:1])  # decode path too
    assert not one.any()


def test_decode_and_prefill_agree_on_the_same_query():
    """The newest query through both kernels: same roundings (fp16 q and probabilities), other orders."""
    rng = np.random.default_rng(2)
    k, v, seq = cache_with_holes(rng, 1500, 2, 64)
    q = rng.standard_normal((2, 14, 64)).astype(np.float32)
    query_seq = np.array([seq.max() - 1, seq.max()])
    both = attend(q, k, v, seq, query_seq)
    alone = attend(q[1:], k, v, seq, query_seq[1:])
    assert np.abs(both[1] - alone[0]).max() < 1e-3 * np.abs(alone).max()


def test_exp_and_fp16_rounding_helpers():
    x = -np.concatenate([np.linspace(0, 90, 100001), [np.inf]]).astype(np.float32)
    ours = np.array([att._exp(t) for t in x[::97]] + [att._exp(x[-1])], dtype=np.float32)
    exact = np.exp(x[::97].astype(np.float64))
    rel = np.abs(ours[:-1] - exact) / np.maximum(exact, 1e-300)
    assert rel[exact > 1e-37].max() < 3e-7 and ours[-1] == 0.0
    p = np.concatenate([np.random.default_rng(3).random(20000), np.geomspace(1e-9, 1, 20000)]).astype(np.float32)
    rounded = np.array([att._round_f16(t) for t in p], dtype=np.float32)
    assert (rounded == p.astype(np.float16).astype(np.float32)).mean() > 0.9999  # ties may differ


def rounded_like_the_kernels(q, type_k):
    """q as the kernels see it: fp16 for F16 keys, Q8_0 (llama.cpp's vec_dot_type) for quantized ones."""
    from qcpu.kernels.activations import ACTIVATION_ROUNDING

    return ACTIVATION_ROUNDING[type_k](q.reshape(-1, q.shape[-1])).reshape(q.shape)


@pytest.mark.parametrize("type_k,type_v", [(T.Q8_0, T.Q8_0), (T.Q4_0, T.Q4_0), (T.Q8_0, T.F16), (T.F16, T.Q4_0)])
@pytest.mark.parametrize("nq", [1, 40])
def test_quantized_caches_match_float64_over_their_dequantized_values(type_k, type_v, nq):
    """Quantized keys are dotted as integers with q quantized to Q8_0, values dequantized: against float64
    over the very values the blocks hold, only the sums' rounding differs."""
    from qcpu.cache import from_rows

    rng = np.random.default_rng(7)
    n_slots, n_kv, hd = att.BLOCK + att.TILE + 33, 2, 64
    k, v, seq = cache_with_holes(rng, n_slots, n_kv, hd)
    query_seq = np.sort(rng.choice(np.arange(n_slots // 2, n_slots + 40), nq, replace=False)).astype(np.int64)
    q = (rng.standard_normal((nq, 14, hd)) * 2).astype(np.float32)
    kc, vc = as_cache(k, type_k), as_cache(v, type_v, keys=False)
    ours = att.attention(q, kc, vc, seq, query_seq, type_k, type_v)
    # what the blocks hold, rotated back (the Hadamard matrix is its own inverse); the kernels round the
    # rotated q, so the reference sees that rounding rotated back too
    rot_k, rot_v = rotation(type_k, hd, True), rotation(type_v, hd, False)
    held_k = rotate(from_rows(kc, type_k, hd), rot_k).transpose(1, 0, 2)
    held_v = rotate(from_rows(vc, type_v, hd), rot_v).transpose(1, 0, 2)
    q_seen = rotate(rounded_like_the_kernels(rotate(q, rot_k), type_k), rot_k)
    ref = reference(q_seen, held_k, held_v, seq, query_seq)
    assert np.abs(ours - ref).max() < 2e-3 * np.abs(ref).max()


@pytest.mark.parametrize("nq", [1, 40])
def test_hadamard_rotation_spares_quantized_keys_their_outlier_channels(nq, monkeypatch):
    """Keys with a few huge channels (Qwen2's key biases make them): stored rotated, a Q8_0 cache's
    attention is closer to the exact float64 one than stored as they are (what llama.cpp did before its
    attention rotation)."""
    rng = np.random.default_rng(11)
    n_slots, n_kv, hd = 300, 2, 64
    k = rng.standard_normal((n_slots, n_kv, hd)).astype(np.float32)
    k[:, :, [5, 37]] += np.float32(60.0)  # two outlier channels, one in each half of the RoPE pairs
    v = rng.standard_normal((n_slots, n_kv, hd)).astype(np.float32)
    seq = np.arange(n_slots, dtype=np.int64)
    query_seq = np.arange(n_slots - nq, n_slots, dtype=np.int64)
    q = rng.standard_normal((nq, 14, hd)).astype(np.float32)
    exact = reference(q, k, v, seq, query_seq)

    rotated = attend(q, k, v, seq, query_seq, T.Q8_0, T.F16)
    monkeypatch.setattr(att, "rotation", lambda *a, **kw: 0)
    plain = att.attention(q, np.ascontiguousarray(to_rows(k.transpose(1, 0, 2), T.Q8_0)), as_cache(v),
                          seq, query_seq, T.Q8_0, T.F16)
    err_rotated, err_plain = np.abs(rotated - exact).max(), np.abs(plain - exact).max()
    assert err_rotated < 0.5 * err_plain, (err_rotated, err_plain)
