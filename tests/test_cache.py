"""The KV cache's context shift: bounded memory, kept prefix, contiguous positions, and logits equal to a
fresh pass over what it holds after any sequence of discards."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qcpu.cache import CENTER_BLOCK, STORE_F16_ROWS, KVCache, hadamard, rotate, rotation
from qcpu.config import ModelConfig
from qcpu.model import Qwen2Model
from qcpu.rope import Rope, apply_rope
from tests.reference import reference_logits
from tests.tiny_model import write_tiny_qwen2


# A head_dim-64 shape for caches built without a file.
QWEN_SHAPE = ModelConfig(n_layers=1, dim=128, ffn_dim=256, n_heads=2, n_kv_heads=2, vocab_size=32,
                         context_length=4096, rope_theta=1e6, rms_eps=1e-6)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    built = write_tiny_qwen2(path, seed=1, n_heads=2, n_kv_heads=1)  # head_dim 32: one Q8_0/Q4_0 block
    return Qwen2Model.load(path), built


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """head_dim 128, as Qwen1.5-4B's: quantized keys rotated in blocks of 128, values in blocks of 64."""
    path = tmp_path_factory.mktemp("wide") / "wide.gguf"
    built = write_tiny_qwen2(path, seed=2, n_layers=1, dim=256, n_heads=2, n_kv_heads=1)
    return Qwen2Model.load(path), built


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / "one.gguf"
    built = write_tiny_qwen2(path, seed=6, n_layers=1, n_heads=2, n_kv_heads=1)
    return Qwen2Model.load(path), built


@pytest.mark.parametrize("keep", [0, 5])
def test_cache_keeps_prefix_never_grows_and_holds_the_newest_tokens_contiguously(tiny, keep):
    model, built = tiny
    capacity = 16
    cache = model.new_cache(capacity, keep=keep)
    k_id, nbytes = id(cache.k), cache.nbytes
    tokens = np.random.default_rng(4).integers(0, built["config"]["vocab_size"], 100)
    model.forward(tokens[:8], cache)
    for t in tokens[8:]:
        model.forward([t], cache)
        n = cache.n_held
        assert n <= capacity
        held = cache.slot_seq[:n]
        assert list(held[:keep]) == list(range(keep))  # the system prompt stays, in its slots
        # then the newest tokens, in stream order, with none missing: positions 0..n-1 are contiguous
        assert list(held[keep:]) == list(range(cache.n_seen - (n - keep), cache.n_seen))
        assert (cache.slot_seq[n:] == -1).all()
    assert id(cache.k) == k_id and cache.nbytes == nbytes
    assert cache.n_seen == 100 and cache.n_evicted == 100 - cache.n_held


def test_a_full_cache_discards_half_of_the_window_at_once(tiny):
    model, built = tiny
    cache = model.new_cache(20, keep=4)
    model.forward(np.arange(20), cache)
    assert cache.n_held == 20
    model.forward([7], cache)  # llama.cpp's n_discard = (n_past - n_keep) / 2
    assert cache.n_evicted == 8 and cache.n_held == 13
    model.forward(np.arange(30, 40), cache)  # half of the 9 non-kept, rounded down
    assert cache.n_evicted == 12 and cache.n_held == 19
    model.forward(np.arange(40, 54), cache)  # a batch that needs more than half: exactly what it needs
    assert cache.n_evicted == 25 and cache.n_held == 20
    assert list(cache.slot_seq[:20]) == [0, 1, 2, 3] + list(range(29, 45))


@pytest.mark.parametrize("keep", [0, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_after_any_discards_equal_a_fresh_pass_over_what_is_held(one_layer, keep, seed):
    """With one layer, cached keys/values depend only on their token and position (deeper layers would
    remember discarded context, as in llama.cpp), so after every discard the logits must equal a fresh
    pass over kept prefix + survivors at positions 0..n-1, and the float64 reference."""
    model, built = one_layer
    rng = np.random.default_rng(seed)
    capacity = 24
    tokens = rng.integers(0, built["config"]["vocab_size"], 200)
    cache = model.new_cache(capacity, keep=keep)
    fed, checked = 0, 0
    while fed < len(tokens) - 12:
        n = int(rng.integers(1, 9))  # batches of any size: decode and prefill paths
        before = cache.n_evicted
        logits = model.forward(tokens[fed:fed + n], cache)[-1]
        fed += n
        if cache.n_evicted == before:
            continue
        held = np.concatenate([tokens[:keep], tokens[fed - (cache.n_held - keep):fed]])
        assert list(cache.slot_seq[:cache.n_held]) == list(range(keep)) + list(range(fed - (cache.n_held - keep), fed))
        fresh = model.forward(held, model.new_cache(capacity))[0]
        ref = reference_logits(built["weights"], built["config"], held)[-1]
        assert rel_err(logits, ref) < 5e-3
        assert rel_err(logits, fresh) < 5e-3
        checked += 1
    assert checked >= 3


def test_truncate_after_discards_keeps_the_prefix_it_still_holds(tiny):
    model, built = tiny
    cache = model.new_cache(16, keep=2)
    model.forward(np.arange(16), cache)
    model.forward(np.arange(4), cache)  # discards 7, holds 13
    assert cache.n_held == 13 and cache.n_seen == 20
    cache.truncate(18)
    assert cache.n_held == 11 and cache.n_seen == 18
    assert list(cache.slot_seq[:11]) == [0, 1] + list(range(9, 18))


@pytest.mark.parametrize("n", [1, 2, 4, 64, 128])
def test_hadamard_is_walsh_hadamard_and_its_own_inverse(n):
    """Sylvester's order: H[i, j] = (-1) ** popcount(i & j) / sqrt(n), as ggml_gen_hadamard builds it."""
    i, j = np.indices((n, n))
    signs = np.vectorize(lambda x: (-1) ** bin(x).count("1"))(i & j)
    assert np.array_equal(hadamard(n), (signs * np.float32(1.0) / np.sqrt(np.float32(n))).astype(np.float32))
    assert np.abs(hadamard(n).astype(np.float64) @ hadamard(n) - np.eye(n)).max() < 1e-6


def test_rotation_sizes_are_llama_cpps():
    """llama_kv_cache: quantized K rotated in blocks of 64 doubled while they divide head_dim, Q4_0 V in
    blocks of 64, nothing for F16 or a head_dim that 64 does not divide; and (qcpu's choice) Q8_0 V not."""
    assert [rotation(T.Q8_0, hd, True) for hd in (32, 64, 96, 128, 192, 256)] == [0, 64, 0, 128, 64, 256]
    assert [rotation(T.Q4_0, hd, False) for hd in (32, 64, 128, 256)] == [0, 64, 64, 64]
    assert [rotation(T.Q8_0, hd, False) for hd in (64, 128)] == [0, 0]
    assert rotation(T.F16, 128, True) == rotation(T.F16, 128, False) == 0
    x = np.random.default_rng(0).standard_normal((3, 2, 128)).astype(np.float32)
    assert np.allclose(rotate(rotate(x, 64), 64), x, atol=1e-6) and rotate(x, 0) is x


@pytest.mark.parametrize("which", ["tiny", "wide"])
@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q4_0, T.F16])
def test_quantized_cache_rows_are_the_reference_quantizers_bytes(request, which, ggml_type):
    """What the cache stores is gguf-py's reference quantization (llama.cpp's quantize_row_*_ref) of the
    RoPE-rotated keys (quantized ones minus their centers, checked on their own below) and the values,
    Hadamard-rotated first where llama.cpp rotates them, laid out [n_kv_heads, slot, row]."""
    model, built = request.getfixturevalue(which)
    cache = model.new_cache(8, type_k=ggml_type, type_v=ggml_type)
    rng = np.random.default_rng(8)
    c = model.config
    k = rng.standard_normal((3, c.n_kv_heads, c.head_dim)).astype(np.float32)
    v = rng.standard_normal((3, c.n_kv_heads, c.head_dim)).astype(np.float32)
    slots, _, _ = cache.reserve(3)
    layer = c.n_layers - 1
    cache.write(layer, slots, k, v)
    assert (cache.centers(layer) is None) == (ggml_type == T.F16)
    centered = k - cache.centers(layer).per_slot(0, 3) if ggml_type != T.F16 else k
    for x, stored, keys in ((centered, cache.k[layer], True), (v, cache.v[layer], False)):
        x = rotate(x, rotation(ggml_type, c.head_dim, keys))
        want = gguf.quants.quantize(x.reshape(-1, c.head_dim), ggml_type).view(np.uint8).reshape(3, c.n_kv_heads, -1)
        assert np.array_equal(stored[:, :3].transpose(1, 0, 2), want)


@pytest.mark.parametrize("type_k,type_v", [(T.Q8_0, T.Q8_0), (T.Q4_0, T.Q4_0)])
def test_quantized_cache_takes_its_share_of_the_bytes_and_tracks_f16_logits(tiny, type_k, type_v):
    model, built = tiny
    tokens = np.random.default_rng(9).integers(0, built["config"]["vocab_size"], 40)
    f16 = model.new_cache(64)
    quant = model.new_cache(64, type_k=type_k, type_v=type_v)
    per_value = {T.Q8_0: 34 / 32, T.Q4_0: 18 / 32}[type_k]
    assert quant.nbytes == f16.nbytes * per_value / 2
    a = model.forward(tokens[:30], f16, all_logits=True)
    b = model.forward(tokens[:30], quant, all_logits=True)
    steps_a = [model.forward([t], f16)[0] for t in tokens[30:]]
    steps_b = [model.forward([t], quant)[0] for t in tokens[30:]]
    tol = 0.02 if type_k == T.Q8_0 else 0.35  # a random tiny model's attention is sharp: 4 bits show
    assert rel_err(b, a) < tol and rel_err(np.array(steps_b), np.array(steps_a)) < tol


@pytest.mark.parametrize("which", ["one_layer", "wide"])
def test_a_quantized_cache_shifts_its_context_like_f16(request, which):
    """Through context shifts a Q8_0 cache stays as close to an F16 one as it is without shifts: its keys
    are re-rotated out of their Hadamard rotation and back into it (wide: head_dim 128, rotated)."""
    model, built = request.getfixturevalue(which)
    tokens = np.random.default_rng(10).integers(0, built["config"]["vocab_size"], 60)
    err = {}
    for capacity in (24, 64):  # 24: shifts; 64: holds all 60 tokens
        outs = {}
        for t in (T.F16, T.Q8_0):
            cache = model.new_cache(capacity, keep=4, type_k=t, type_v=t)
            outs[t] = np.array([model.forward([tok], cache)[0] for tok in tokens])
            assert (cache.n_evicted > 0) == (capacity == 24)
        err[capacity] = rel_err(outs[T.Q8_0], outs[T.F16])
    assert err[24] < max(0.02, 1.5 * err[64]) and err[64] < 0.06, err


def neox_rotate64(x, angles):
    """x float64[n, hd] rotated by angles float64[n, hd/2] (NEOX pairs i, i + hd/2), in float64."""
    h = x.shape[1] // 2
    c, s = np.cos(angles), np.sin(angles)
    return np.concatenate([x[:, :h] * c - x[:, h:] * s, x[:, :h] * s + x[:, h:] * c], axis=1)


def test_key_centers_follow_rope():
    """m is the first batch's mean key rotated back to position 0, zero in the pairs that turn by more than
    pi/3 over half a block, and later batches leave it alone; block b's center is m rotated to the block's
    midpoint; offsets are q.c_b (all against float64 from the RoPE formula)."""
    rng = np.random.default_rng(3)
    hd, n_kv, theta, n = 64, 2, 1e6, 300
    cache = KVCache(1, n, n_kv, hd, Rope(head_dim=hd, theta=theta), type_k=T.Q8_0)
    k = (rng.standard_normal((n, n_kv, hd)) + 5).astype(np.float32)
    for lo, hi in ((0, 100), (100, n)):
        slots, _, _ = cache.reserve(hi - lo)
        cache.write(0, slots, k[lo:hi], k[lo:hi])
    freqs = theta ** (-np.arange(hd // 2) * 2.0 / hd)
    slow = freqs * (CENTER_BLOCK // 2) <= np.pi / 3
    assert 0 < slow.sum() < hd // 2
    centers = cache.centers(0)
    mid = (np.arange(n) // CENTER_BLOCK) * CENTER_BLOCK + CENTER_BLOCK // 2
    for kvh in range(n_kv):
        m = neox_rotate64(k[:100, kvh].astype(np.float64), -np.arange(100)[:, None] * freqs).mean(axis=0)
        m *= np.concatenate([slow, slow])
        assert np.allclose(centers.m[kvh], m, rtol=1e-5, atol=1e-5)
        want = neox_rotate64(np.broadcast_to(m, (n, hd)), mid[:, None] * freqs)
        assert np.allclose(centers.per_slot(0, n)[:, kvh], want, rtol=1e-4, atol=1e-4)
        assert np.allclose(centers.per_slot(70, 200)[:, kvh], want[70:200], rtol=1e-4, atol=1e-4)
        q = rng.standard_normal((3 * n_kv, hd)).astype(np.float32)
        got = centers.offsets(q, -(-n // CENTER_BLOCK))
        for h in range(kvh * 3, kvh * 3 + 3):
            assert np.allclose(got[h], want[::CENTER_BLOCK] @ q[h].astype(np.float64), rtol=1e-4, atol=1e-3)
    assert KVCache(1, n, n_kv, hd, Rope(head_dim=hd, theta=theta)).centers(0) is None  # F16 keys: none


@pytest.mark.parametrize("n_queries", [1, 5])
@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q4_0])
def test_centered_quantized_keys_give_attention_closer_to_exact(ggml_type, n_queries, monkeypatch):
    """Keys sharing a large bias that RoPE turns with the position (as Qwen2's do): stored minus their
    block's center and added back in attention, the quantized cache's attention (decode: 1 query; tiled
    prefill: 5) is closer to the exact float64 one than with the keys stored as they are."""
    from qcpu.attention import attention
    from tests.test_attention import reference

    rng = np.random.default_rng(12)
    n, n_kv, hd = 700, 2, 64
    rope = Rope(head_dim=hd, theta=1e6)
    bias = np.zeros((1, n_kv, hd), np.float32)
    bias[..., [20, 52, 30, 62, 3]] = [40.0, -30.0, 25.0, 20.0, 4.0]  # slow pairs (20, 52), (30, 62); fast 3
    cos, sin = rope.cos_sin(np.arange(n))
    k = apply_rope((rng.standard_normal((n, n_kv, hd)) + bias).astype(np.float32), cos, sin)
    v = rng.standard_normal((n, n_kv, hd)).astype(np.float32)
    q = rng.standard_normal((n_queries, 14, hd)).astype(np.float32) * 0.3
    seq, query = np.arange(n, dtype=np.int64), np.arange(n - n_queries, n)
    exact = reference(q, k, v, seq, query)

    def stored_attention():
        cache = KVCache(1, 768, n_kv, hd, rope=rope, type_k=ggml_type)
        for lo, hi in ((0, 50), (50, 420), (420, n)):  # m comes from the first batch only
            slots, _, _ = cache.reserve(hi - lo)
            cache.write(0, slots, k[lo:hi], v[lo:hi])
        return attention(q, *cache.layer(0), query, cache.type_k, cache.type_v, cache.centers(0))

    err_centered = np.abs(stored_attention() - exact).max()
    monkeypatch.setattr(KVCache, "_centered", lambda self, layer, slots, keys: keys)
    monkeypatch.setattr(KVCache, "centers", lambda self, layer: None)
    err_plain = np.abs(stored_attention() - exact).max()
    assert err_centered < 0.5 * err_plain, (err_centered, err_plain)


def test_f16_rows_stored_a_few_at_a_time_are_numpys_halves():
    """A decode step's F16 keys and values go through _store_f16, a prompt chunk through NumPy's astype:
    the same bytes, for values across the fp16 range (subnormals, rounding ties, overflow to inf)."""
    rng = np.random.default_rng(3)
    n = STORE_F16_ROWS + 4
    k = (rng.standard_normal((n, 2, 64)) * np.float32(10.0) ** rng.integers(-9, 6, (n, 2, 64))).astype(np.float32)
    k[0, 0, :8] = [np.inf, -np.inf, 65519.0, 65520.0, 2.0 ** -25, 3 * 2.0 ** -25, -0.0, 1 + 2.0 ** -11]
    v = rng.standard_normal((n, 2, 64)).astype(np.float32)
    rope = Rope.from_config(QWEN_SHAPE)
    few, many = KVCache(1, 64, 2, 64, rope), KVCache(1, 64, 2, 64, rope)
    for t in range(0, n, 2):  # a step of two rows at a time
        few.write(0, np.arange(t, t + 2), k[t:t + 2], v[t:t + 2])
    with np.errstate(over="ignore"):  # 65520 and inf become inf, as they should
        many.write(0, np.arange(n), k, v)  # above STORE_F16_ROWS: astype
        want = k.astype(np.float16).transpose(1, 0, 2)
    assert np.array_equal(few.k, many.k) and np.array_equal(few.v, many.v)
    assert np.array_equal(many.k[0, :, :n].view(np.float16), want)
