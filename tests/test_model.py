"""The transformer and its ring KV cache on a tiny random qwen2 model, against float64 NumPy."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qcpu.model import Qwen2Model
from tests.reference import reference_logits
from tests.tiny_model import write_tiny_qwen2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    built = write_tiny_qwen2(path, seed=1)
    return Qwen2Model.load(path), built


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_forward_matches_float64_reference(tiny):
    model, built = tiny
    tokens = np.random.default_rng(0).integers(0, built["config"]["vocab_size"], 40)
    ours = model.forward(tokens, model.new_cache(64), all_logits=True)
    ref = reference_logits(built["weights"], built["config"], tokens)
    # float32 arithmetic and a float16 KV cache (as llama.cpp's): ~1e-3 relative.
    assert rel_err(ours, ref) < 3e-3
    assert (ours.argmax(1) == ref.argmax(1)).mean() > 0.95


@pytest.mark.parametrize("split", [[1] * 12, [5, 1, 3, 3], [12]])
def test_cached_steps_equal_full_recompute(tiny, split):
    model, built = tiny
    tokens = np.random.default_rng(2).integers(0, built["config"]["vocab_size"], 12)
    full = model.forward(tokens, model.new_cache(32), all_logits=True)
    cache, outs, i = model.new_cache(32), [], 0
    for n in split:
        outs.append(model.forward(tokens[i:i + n], cache, all_logits=True))
        i += n
    assert rel_err(np.concatenate(outs), full) < 1e-4


@pytest.mark.parametrize("weight_type", [T.F32, T.Q4_0])
def test_forward_batch_equals_one_pass_per_sequence(tmp_path, weight_type):
    """Several sequences, each after its own history, in one pass (what a server's slots share): the
    same logits as one pass each, and each cache ends as the separate pass leaves it."""
    path = tmp_path / "tiny.gguf"
    write_tiny_qwen2(path, seed=3, weight_type=weight_type, dim=64, n_heads=2, n_kv_heads=1)
    model = Qwen2Model.load(path)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, vocab, n) for n in (5, 2, 9)]
    apart, together = [model.new_cache(32) for _ in prompts], [model.new_cache(32) for _ in prompts]
    for p, a, b in zip(prompts, apart, together):
        model.forward(p, a)
        model.forward(p, b)
    tokens = [3, 4, 5]
    for _ in range(4):
        want = np.concatenate([model.forward([t], c) for t, c in zip(tokens, apart)])
        got = model.forward_batch(tokens, together)
        assert got.shape == want.shape and rel_err(got, want) < 1e-4
        tokens = [int(t) for t in want.argmax(1)]
    for a, b in zip(apart, together):
        assert (a.n_held, a.n_seen) == (b.n_held, b.n_seen)
        assert rel_err(b.k[:, :, :b.n_held].view(np.float16), a.k[:, :, :a.n_held].view(np.float16)) < 1e-3
    # a prompt chunk riding with the others' decode steps: the chunk's last logits, the others' as alone
    chunk = [int(t) for t in rng.integers(0, vocab, 6)]
    want = np.concatenate([model.forward([tokens[0]], apart[0]), model.forward(chunk, apart[1]),
                           model.forward([tokens[2]], apart[2])])
    got = model.forward_batch([tokens[0], chunk, [tokens[2]]], together)
    assert got.shape == want.shape and rel_err(got, want) < 1e-4
    for a, b in zip(apart, together):
        assert (a.n_held, a.n_seen) == (b.n_held, b.n_seen)
    with pytest.raises(ValueError):
        model.forward_batch([1, 2], [together[0], together[0]])
    with pytest.raises(ValueError):
        model.forward_batch([1, []], together[:2])
    assert together[0].n_held == apart[0].n_held  # nothing reserved by the refused calls


@pytest.mark.parametrize("weight_type", [T.Q8_0, T.Q4_0])
def test_quantized_model_matches_reference_of_its_dequantized_weights(tmp_path, weight_type):
    built = write_tiny_qwen2(tmp_path / "q.gguf", seed=3, weight_type=weight_type, dim=64, ffn_dim=128)
    model = Qwen2Model.load(tmp_path / "q.gguf")
    tokens = np.arange(1, 17)
    cache = model.new_cache(32)
    prefill = model.forward(tokens[:8], cache, all_logits=True)  # batched path (dequantized tile + BLAS)
    steps = [model.forward(tokens[i:i + 1], cache)[0] for i in range(8, 16)]  # fused matvec path
    ref = reference_logits(built["weights"], built["config"], tokens)
    # both paths round activations to 8 bits per block, as llama.cpp does: ~1% relative
    assert rel_err(prefill, ref[:8]) < 3e-2
    assert rel_err(np.array(steps), ref[8:]) < 3e-2
    # ...and agree with each other far more tightly: the same rounding, summed in another order. Only
    # where a last-bit difference moves an activation across an 8-bit rounding boundary do they part
    # by one quantum (~1%), as llama.cpp's own batched and one-token paths do.
    again = model.forward(tokens[8:16], _refill(model, tokens[:8]), all_logits=True)
    rows = np.abs(np.array(steps) - again).max(axis=1) / np.abs(again).max()
    assert np.median(rows) < 1e-5 and rows.max() < 3e-2


def _refill(model, tokens):
    cache = model.new_cache(32)
    model.forward(tokens, cache)
    return cache


@pytest.mark.parametrize("types", [(T.F16, T.F16), (T.Q8_0, T.Q8_0), (T.Q4_0, T.Q8_0)], ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_caches_in_one_pool_give_the_bits_of_separate_caches(tmp_path, types):
    """A server's slots keep their caches side by side in one KVPool, read by one attention call per layer
    (attention_pooled): every logit bit for bit what separate caches give, in exact steps with drafts, with
    a prompt chunk riding along, and after a cache shifts (the evicted slots and the pool's other caches
    untouched)."""
    path = tmp_path / "tiny.gguf"
    write_tiny_qwen2(path, seed=4, dim=128, n_heads=4, n_kv_heads=2)
    model = Qwen2Model.load(path)
    vocab = model.config.vocab_size
    type_k, type_v = types
    rng = np.random.default_rng(6)
    pool = model.new_pool(3, 48, type_k, type_v)
    pooled = [model.new_cache(48, keep=2, type_k=type_k, type_v=type_v, pool=pool, index=i) for i in range(3)]
    alone = [model.new_cache(48, keep=2, type_k=type_k, type_v=type_v) for _ in range(3)]
    for n, a, b in zip((5, 30, 1), alone, pooled):
        p = rng.integers(0, vocab, n)
        model.forward(p, a)
        model.forward(p, b)
    for step in range(12):  # the second cache fills up and shifts on the way
        tokens = [[int(rng.integers(vocab))], [int(t) for t in rng.integers(0, vocab, 3)], [int(rng.integers(vocab))]]
        exact = step % 3 != 2
        if not exact:
            tokens[2] = [int(t) for t in rng.integers(0, vocab, 4)]  # a prompt chunk: the batched products
        want = model.forward_batch(tokens, alone, all_logits=True, exact=exact)
        got = model.forward_batch(tokens, pooled, all_logits=True, exact=exact)
        for w, g in zip(want, got):
            assert np.array_equal(w.view(np.uint32), g.view(np.uint32))
    assert pooled[1].n_evicted > 0
    for a, b in zip(alone, pooled):
        assert (a.n_held, a.n_seen, a.n_evicted) == (b.n_held, b.n_seen, b.n_evicted)
        assert np.array_equal(a.k[:, :, :a.n_held], b.k[:, :, :b.n_held])
        assert np.array_equal(a.slot_seq, b.slot_seq)
    assert pooled[0].nbytes == alone[0].nbytes and pool.k.nbytes + pool.v.nbytes == 3 * alone[0].nbytes
    with pytest.raises(ValueError):  # a pool of another shape
        model.new_cache(40, pool=pool, index=0)
