"""Speculative decoding (qcpu/speculative.py, Engine.generate_steps with a speculator).

- the exact pass: `Engine.decode` of several tokens gives each row the bits of one-token steps (weight
  types with and without a multi-token matvec, f16 and quantized caches), which is what keeps greedy
  output identical;
- the acceptance rule, statistically against the target distribution (synthetic p and q);
- greedy output with lookup or a draft model equals plain decoding token for token (tiny models; the
  default model on a code-copying prompt, where drafts are mostly accepted);
- sampled output with a sampling draft model has the target's distribution (tiny models, chi-square over
  the first two tokens against the distribution computed from the target's own logits);
- the lookup drafter, the on/off policy, the vocabulary check and the CLI's options.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from typer.testing import CliRunner

from qcpu.cli import app
from qcpu.errors import QcpuError
from qcpu.generate import Engine, Stats
from qcpu.sampling import SamplingParams, make_sampler
from qcpu.speculative import (NgramLookup, SpecOptions, Speculator, accept, attach,
                              check_vocabularies)
from tests.tiny_model import write_tiny_qwen2

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=1)


def _fits(observed: np.ndarray, expected: np.ndarray) -> bool:
    """Pearson's chi-square test at the 0.1% level: the statistic below the chi-square quantile for
    len - 1 degrees of freedom (Wilson-Hilferty's cube-root approximation, z = 3.09)."""
    expected = expected * observed.sum() / expected.sum()
    stat = float(((observed - expected) ** 2 / expected).sum())
    k = len(observed) - 1
    return stat < k * (1 - 2 / (9 * k) + 3.09 * np.sqrt(2 / (9 * k))) ** 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    paths = {}
    for name, seed, wtype in (("target", 0, T.F32), ("draft", 1, T.F32), ("q8", 0, T.Q8_0), ("q4", 0, T.Q4_0),
                              ("f16", 0, T.F16)):
        paths[name] = d / f"{name}.gguf"
        write_tiny_qwen2(paths[name], seed=seed, weight_type=wtype, n_heads=2, n_kv_heads=1)  # head_dim 32
    return paths


def _greedy(engine: Engine, prompt: list[int], n: int, params=GREEDY) -> tuple[list[int], Stats]:
    engine.reset()
    stats = Stats()
    return list(engine.generate_tokens(prompt, params, n, stats)), stats


# ---- the exact pass --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["target", "f16", "q8", "q4"])
@pytest.mark.parametrize("cache", ["f16", "q8_0", "q4_0"])
def test_decode_rows_equal_one_token_steps(tiny, name, cache):
    e = Engine.load(tiny[name], ctx=256, cache_type_k=cache, cache_type_v=cache)
    prompt = e.tokenizer.encode("the theory of the thing, then the other thing")
    more = e.tokenizer.encode(" and then thus the end of it all")[:9]
    e.feed(prompt)
    one = np.stack([e.decode([t])[-1] for t in more])
    e.rewind(len(prompt))
    many = e.decode(more)
    assert many.shape == one.shape
    assert np.array_equal(one, many)
    assert e.tokens == prompt + more


def test_decode_refuses_more_than_the_room(tiny):
    e = Engine.load(tiny["target"], ctx=16)
    e.feed(list(range(10)))
    with pytest.raises(QcpuError, match="room"):
        e.decode(list(range(17)))
    assert e.n_held == 10


# ---- the acceptance rule ---------------------------------------------------------------------------

def _run_rule(p: np.ndarray, q: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """Counts of the tokens the rule outputs when a draft x ~ q (or always token 0, q one-hot) is checked."""
    rng = np.random.default_rng(seed)
    ids = np.arange(len(p))
    counts = np.zeros(len(p), dtype=np.int64)
    for _ in range(n):
        if q is None:
            x, q_ids, q_probs = 0, np.array([0]), np.ones(1)
        else:
            x, q_ids, q_probs = int(rng.choice(len(q), p=q)), ids, q
        ok, token = accept(ids, p, x, q_ids, q_probs, rng)
        assert ok == (token == x) or (not ok and token != x)
        counts[token] += 1
    return counts


@pytest.mark.parametrize("q", [np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]),  # q over-weights token 0
                               np.array([0.05, 0.05, 0.3, 0.3, 0.3, 0.0]),  # q misses token 5 entirely
                               None])  # a deterministic draft (lookup, greedy draft model)
def test_the_rule_gives_the_target_distribution(q):
    p = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    n = 40000
    counts = _run_rule(p, q, n, seed=7)
    assert _fits(counts.astype(float), p * n), (counts / n, p)


def test_the_rule_with_a_greedy_target_keeps_the_argmax_and_draws_nothing():
    class NoRandom:
        def random(self):
            raise AssertionError("no random number for a greedy target")

        def choice(self, *a, **k):
            raise AssertionError("no random number for a greedy target")

    p_ids, p_probs = np.array([42]), np.ones(1)
    assert accept(p_ids, p_probs, 42, np.array([42]), np.ones(1), NoRandom()) == (True, 42)
    assert accept(p_ids, p_probs, 7, np.array([7]), np.ones(1), NoRandom()) == (False, 42)


def test_the_rule_refuses_a_token_q_could_not_draw():
    with pytest.raises(ValueError):
        accept(np.array([1, 2]), np.array([0.5, 0.5]), 3, np.array([1, 2]), np.array([0.5, 0.5]),
               np.random.default_rng(0))


# ---- greedy output is plain decoding's ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["target", "q8", "q4"])
def test_greedy_with_lookup_is_plain_decoding(tiny, name):
    e = Engine.load(tiny[name], ctx=256)
    prompt = e.tokenizer.encode("the theory: the thing then the theory: the thing then the")
    plain, _ = _greedy(e, prompt, 120)
    for always in (True, False):
        attach(e, SpecOptions(lookup=always, draft_max=6))
        spec, stats = _greedy(e, prompt, 120)
        assert spec == plain
        assert stats.generated_tokens == len(plain)
        if always:
            assert stats.draft_passes > 0 and 0 < stats.accepted_tokens <= stats.drafted_tokens
        assert e.tokens == prompt + plain[:-1] or e.tokens == prompt + plain  # the cache holds what was said
        e.speculator = None


@pytest.mark.parametrize("draft", ["target", "draft"])
def test_greedy_with_a_draft_model_is_plain_decoding(tiny, draft):
    e = Engine.load(tiny["target"], ctx=256)
    prompt = e.tokenizer.encode("then the other thing")
    params = SamplingParams(temperature=0.0, repeat_penalty=1.1, seed=1)  # the penalty must follow the drafts
    plain, _ = _greedy(e, prompt, 80, params)
    attach(e, SpecOptions(draft=str(tiny[draft]), draft_max=5, p_min=0.0))
    spec, stats = _greedy(e, prompt, 80, params)
    assert spec == plain
    assert stats.draft_passes > 0
    if draft == "target":  # the model drafting for itself: every draft is taken
        assert stats.accepted_tokens == stats.drafted_tokens > 0
    else:
        assert stats.accepted_tokens < stats.drafted_tokens


def test_greedy_ends_where_plain_decoding_ends(tiny):
    # max_tokens cuts inside a draft; the cache then holds the same stream as after plain decoding
    e = Engine.load(tiny["target"], ctx=256)
    prompt = e.tokenizer.encode("the thing the thing the thing the")
    for n in (1, 2, 7, 13):
        plain, _ = _greedy(e, prompt, n)
        held = e.tokens
        attach(e, SpecOptions(lookup=True, draft_max=8))
        spec, _ = _greedy(e, prompt, n)
        assert spec == plain and e.tokens == held
        e.speculator = None


def test_greedy_near_a_full_cache_falls_back_to_plain_steps(tiny):
    # drafts never make the cache shift (a shift cannot be rewound); plain steps then shift as usual
    e = Engine.load(tiny["target"], ctx=48)
    prompt = e.tokenizer.encode("the thing then the thing then the")
    plain, _ = _greedy(e, prompt, 60)
    attach(e, SpecOptions(lookup=True, draft_max=8))
    spec, _ = _greedy(e, prompt, 60)
    assert spec == plain
    assert e.n_evicted > 0


@pytest.mark.model
def test_default_model_greedy_copy_with_lookup(real_engine):
    """A code-echo prompt: drafts are mostly accepted, the text is plain decoding's, token for token."""
    e = real_engine
    code = ("def area(width, height):\n    return width * height\n\n\n"
            "def perimeter(width, height):\n    return 2 * (width + height)\n")
    prompt = e.tokenizer.encode(e.template.render(
        [{"role": "user", "content": "Add type hints to this code and return only the code:\n\n" + code}],
        add_generation_prompt=True))
    params = SamplingParams(temperature=0.0, seed=1)  # Qwen's repeat penalty on
    saved = e.speculator
    try:
        e.speculator = None
        plain, _ = _greedy(e, prompt, 60, params)
        attach(e, SpecOptions(lookup=True, draft_max=8))
        spec, stats = _greedy(e, prompt, 60, params)
    finally:
        e.speculator = saved
    assert spec == plain
    assert stats.accepted_tokens >= len(plain) // 3, stats


# ---- sampled output has the target's distribution ------------------------------------------------------

def test_sampled_speculation_keeps_the_target_distribution(tiny):
    """Two tokens after a prompt, drafted by a different model that samples its own drafts: the joint
    counts of (first, second) match the target's p(t1) p(t2 | t1), computed from its logits."""
    params = SamplingParams(temperature=1.0, top_k=6, top_p=1.0, repeat_penalty=1.0)
    e = Engine.load(tiny["target"], ctx=64)
    prompt = e.tokenizer.encode("the other")
    sampler = make_sampler(params)
    e.reset()
    ids1, p1 = sampler.distribution(e.feed(prompt), prompt)
    eot = e.tokenizer.eot_ids
    expected: dict[tuple, float] = {}  # an end of turn ends the reply: (t1, END) or (END,)
    for t1, pa in zip(ids1, p1):
        if int(t1) in eot:
            expected[(-1,)] = expected.get((-1,), 0.0) + pa
            continue
        e.rewind(len(prompt))
        ids2, p2 = sampler.distribution(e.decode([int(t1)])[-1], prompt + [int(t1)])
        for t2, pb in zip(ids2, p2):
            key = (int(t1), -1 if int(t2) in eot else int(t2))
            expected[key] = expected.get(key, 0.0) + pa * pb
    attach(e, SpecOptions(draft=str(tiny["draft"]), draft_max=2, p_min=0.0))
    rng = np.random.default_rng(11)
    counts: dict[tuple[int, int], int] = {}
    n = 3000
    stats = Stats()
    for _ in range(n):
        rest = e.sync(prompt)
        out = tuple(e.generate_tokens(rest, params, 2, stats, rng=rng))
        out = out if len(out) == 2 else out + (-1,)
        counts[out] = counts.get(out, 0) + 1
    assert set(counts) <= set(expected)
    assert 0 < stats.accepted_tokens < stats.drafted_tokens  # both paths of the rule ran
    keys = sorted(expected)
    observed = np.array([counts.get(k, 0) for k in keys], dtype=float)
    want = np.array([expected[k] for k in keys]) * n
    big = want >= 5  # chi-square's rule of thumb; the rare pairs pooled
    observed = np.append(observed[big], observed[~big].sum())
    want = np.append(want[big], want[~big].sum())
    assert _fits(observed, want), (observed, want)


# ---- the drafters and the policy -------------------------------------------------------------------

def test_lookup_takes_the_latest_longest_match():
    look = NgramLookup(ngram_max=3, ngram_min=1)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    stream = [5, 6, 7, 8, 1, 6, 7, 9, 2, 3, 6, 7]
    assert look.draft(stream, 3).tokens == [9, 2, 3]  # "6 7" last seen at 5-6, followed by 9 2 3
    assert look.draft(stream + [9], 2).tokens == [2, 3]  # "6 7 9" (3-gram) beats later 1-grams
    assert look.draft([1, 2, 3], 4).tokens == []
    assert look.draft([4, 4, 4, 4], 5).tokens == [4]  # the run continues
    assert NgramLookup(ngram_max=2, ngram_min=2).draft([1, 2, 9, 2], 3).tokens == []  # no 2-gram repeats


def test_policy_turns_lookup_off_and_on_by_measured_acceptance():
    spec = Speculator(NgramLookup(), draft_max=8)
    for k in range(10):  # measured steps: a plain one, and each drafted token 20% more
        spec.stepped(k, 1.0 + 0.2 * k)
    spec.rate = 0.05
    assert spec.budget(8) == 0
    stream = [1, 2, 3, 4, 5, 1, 2, 3]
    assert spec.propose(stream, 8).tokens == []  # off: nothing checked...
    for t in (4, 5, 1, 2, 3) * 6:  # ...but what it would have drafted keeps being scored
        spec.drawn(t)
        stream.append(t)
        if spec.propose(stream, 8).tokens:
            break
    assert spec.budget(8) > 0  # on again
    for _ in range(20):  # checked drafts, all taken: longer drafts pay
        k = spec.budget(8)
        spec.checked(k, k)
    assert spec.rate > 0.8 and spec.budget(8) > 3
    assert spec.budget(2) <= 2 and spec.budget(0) == 0
    spec.steps = {0: 1.0, 1: 3.0}  # a pass that costs more than what it can win: off whatever the rate
    assert spec.budget(8) == 0
    assert spec.step_seconds(3) == pytest.approx(7.0)  # extrapolated from the measured sizes
    always = Speculator(NgramLookup(), draft_max=4, always=True)
    always.rate = 0.0
    assert always.budget(8) == 4


def test_policy_in_a_server_batch_prices_by_pass_rows():
    spec = Speculator(NgramLookup(), draft_max=8)
    spec.costs.seconds = {4: 1.0, 5: 1.02, 6: 1.04, 7: 1.06, 8: 1.08, 12: 1.16}  # extra rows nearly free
    spec.rate = 0.6
    assert spec.budget(8, base=4) >= 3
    spec.costs.seconds = {4 + k: 1.0 + 0.7 * k for k in range(9)}  # each row 70% of the batch's pass
    assert spec.budget(8, base=4) == 0


def test_drafts_in_a_batch_pay_for_the_other_replies_slowed_down():
    """Each extra row 10% of the pass, acceptance 0.3: alone, a draft pays (1.3 tokens for 1.1 of the
    time); beside three other replies (a token each), it does not ((3 + 1.3) / 1.1 < 4 / 1)."""
    spec = Speculator(NgramLookup(), draft_max=8)
    spec.costs.seconds = {n: 1.0 + 0.1 * (n - 4) for n in range(4, 13)}
    spec.rate = 0.3
    assert spec.budget(8, base=4) >= 1
    assert spec.budget(8, base=4, others=3) == 0
    spec.rate = 0.9  # a good guesser still drafts beside them
    assert spec.budget(8, base=4, others=3) >= 1


def test_a_draft_min_drops_short_drafts():
    spec = Speculator(NgramLookup(), draft_max=8, draft_min=3, always=True)
    assert spec.propose([1, 2, 3, 1, 2], 8).tokens == [3, 1, 2]
    assert spec.propose([1, 2, 1, 2, 1, 2], 8).tokens == []  # "1 2 1 2" matched at 0-3: 2 tokens follow


def test_a_draft_with_another_vocabulary_is_refused(tiny, tmp_path):
    other = tmp_path / "other.gguf"
    write_tiny_qwen2(other, seed=3, n_heads=2, n_kv_heads=1)
    e = Engine.load(tiny["target"], ctx=64)
    o = Engine.load(other, ctx=64)
    check_vocabularies(e, o)  # same tokens: fine
    o.tokenizer.token_bytes = lambda i: b"x" if i == 40 else e.tokenizer.token_bytes(i)
    with pytest.raises(QcpuError, match="token 40"):
        check_vocabularies(e, o)


def test_cli_options(tiny, tmp_path):
    runner = CliRunner()
    base = ["generate", str(tiny["target"]), "hello", "--temp", "0", "-n", "8", "--stats"]
    r = runner.invoke(app, base + ["--draft", str(tiny["draft"]), "--draft-max", "3", "--draft-p-min", "0"])
    assert r.exit_code == 0, r.output
    assert "drafts:" in r.output
    r = runner.invoke(app, base + ["--draft", str(tiny["draft"]), "--lookup"])
    assert r.exit_code == 2 and "give one" in r.output
    r = runner.invoke(app, base + ["--draft-max", "0"])
    assert r.exit_code == 2
    r = runner.invoke(app, base + ["--draft", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 1 and "Traceback" not in r.output
