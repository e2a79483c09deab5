"""`Engine`'s cache API on the tiny model: sync keeps the longest usable prefix (llama-server's prompt
cache), rewinds, splices after eviction when the held tokens spell the same text, else rebuilds; the cache
then gives the logits a fresh run gives."""

import numpy as np
import pytest

from qcpu.errors import QcpuError
from qcpu.generate import Engine
from tests.tiny_model import write_tiny_qwen2


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_qwen2(path)
    return path


def fresh_logits(path, tokens, ctx=256, keep=0):
    eng = Engine.load(path, ctx=ctx)
    eng.reset(keep)
    return eng.feed(tokens)


def ids(engine, text):
    return engine.tokenizer.encode(text)


def test_sync_keeps_the_common_prefix_and_rewinds(tiny_path):
    eng = Engine.load(tiny_path, ctx=256)
    a = ids(eng, "the quick brown fox jumps")
    b = ids(eng, "the quick brown cat sleeps all day")
    assert eng.sync(a) == a  # empty cache: everything to feed
    eng.feed(a)
    assert eng.n_seen == eng.n_held == len(a) and eng.tokens == a
    assert eng.sync(a + ids(eng, " over")) == ids(eng, " over")  # held is a prefix: only the new part
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    rest = eng.sync(b)
    assert rest == b[common:] and eng.tokens == a[:common]  # rewound to the divergence
    np.testing.assert_allclose(eng.feed(rest), fresh_logits(tiny_path, b), rtol=1e-4, atol=1e-4)
    assert eng.sync(b) == b[-1:]  # all held: the last token is fed again for fresh logits
    eng.feed(b[-1:])
    assert eng.sync(b, need_logits=False) == [] and eng.n_seen == len(b)
    eng.rewind(3)
    assert eng.tokens == b[:3] and eng.n_held == 3


def test_sync_after_eviction_splices_the_same_text_and_rebuilds_other_text(tiny_path):
    eng = Engine.load(tiny_path, ctx=32)
    prefix = ids(eng, "SYS:")
    eng.reset(keep=len(prefix))
    # One token per byte (the tiny vocabulary's ids 0-255 are the bytes): the same text that encode()
    # writes with its "he" merge, as a model's reply may be tokenized otherwise when it is rendered back.
    text = "hello there, the hedge here is the height of heather"
    held = prefix + list(text.encode())
    assert ids(eng, text) != list(text.encode())
    eng.feed(held)
    assert eng.n_evicted == len(held) - 32 and eng.n_held == 32 and eng.n_kept == len(prefix)
    assert eng.oldest_held == len(held) - (32 - len(prefix))
    with pytest.raises(QcpuError, match="cannot rewind"):
        eng.rewind(len(prefix) + 1)
    assert eng.can_rewind(len(held) - 2)
    # Same text where the ring no longer holds the tokens: keep the cache, feed only the text after it.
    rendered = prefix + ids(eng, text + " next")
    assert eng.sync(rendered) == ids(eng, " next") and eng.n_seen == len(held)
    # Other text before what is held: rebuilt from an empty cache with the kept prefix.
    other = prefix + ids(eng, "hello where is the hedge here")
    assert eng.sync(other) == other and eng.n_seen == 0 and eng.n_evicted == 0 and eng.n_kept == len(prefix)


def test_sync_with_a_new_kept_prefix_rebuilds(tiny_path):
    eng = Engine.load(tiny_path, ctx=64)
    eng.reset(keep=2)
    eng.feed(ids(eng, "abcdef"))
    assert eng.sync(ids(eng, "abcdefgh"), keep=3) == ids(eng, "abcdefgh") and eng.n_kept == 3


def test_a_prompt_longer_than_the_room_is_refused_unless_truncating(tiny_path):
    eng = Engine.load(tiny_path, ctx=16)
    from qcpu.sampling import SamplingParams

    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    long = ids(eng, "x" * 40)
    with pytest.raises(QcpuError, match="longer than the context"):
        list(eng.generate_tokens(long, greedy, 2))
    assert eng.n_seen == 0
    out = list(eng.generate_tokens(long, greedy, 2, truncate=True))
    assert eng.n_seen == 40 + len(out)  # every yielded token is fed when resumed
    assert 8 <= eng.n_held <= 16 and eng.n_evicted == eng.n_seen - eng.n_held  # context shifts: half at once


def test_slots_share_one_pool_and_step_together_as_engines_alone(tiny_path):
    """Engine.slots (a server's --parallel): engines with this one's context and cache types whose caches
    sit in one KVPool; fed together they give each slot the logits it gets alone."""
    lead = Engine.load(tiny_path, ctx=64)  # head_dim 16: f16 only (tests/test_model.py pools quantized caches)
    slots = lead.slots(3)
    assert len({id(e._cache.pool) for e in slots}) == 1 and slots[0]._cache.pool is not None
    assert [e._cache.index for e in slots] == [0, 1, 2]
    assert all(e.capacity == 64 and e.cache_types == ("f16", "f16") for e in slots)
    texts = ["the quick brown fox", "a", "jumps over the lazy dog again"]
    alone = [Engine(lead.model, lead.tokenizer, lead.template, 64) for _ in texts]
    for e, a, t in zip(slots, alone, texts):
        e.feed(ids(e, t))
        a.feed(ids(a, t))
    tokens = [7, [8, 9], 10]
    got = Engine.step_together(slots, tokens, all_logits=True, exact=True)
    for e, t, g in zip(alone, tokens, got):
        want = e.decode([t] if np.ndim(t) == 0 else t)
        assert np.array_equal(g.view(np.uint32), want.view(np.uint32))
