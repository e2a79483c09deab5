"""qcpu.sampling: parameter checks, the filters, the seeded draw.

Expected values of the filters are llama.cpp's own (tests/test-sampling.cpp, as vendored in
llama-cpp-python 0.3.36); each ported case names its llama.cpp test. llama.cpp's tester builds logits as
logf(p) from a probability vector, applies one sampler, then `dist` (a softmax over what is left), and
compares those probabilities within 1e-5; `_after` below does the same. llama.cpp returns candidates
sorted by probability; our filters need not, so results are compared as {token id: probability}.

Deliberate differences from llama.cpp (qcpu refuses values llama.cpp maps to something):
  * top-p 0: llama.cpp keeps one token (its min_keep); `SamplingParams.validate` refuses it (top-p must be
    in (0, 1]; greedy is --temp 0). The filter itself, called with 0, still keeps exactly one token.
  * min-p >= 1: llama.cpp keeps the top token; `validate` refuses it (min-p must be in [0, 1)).
  * negative temperature: llama.cpp samples greedily; `validate` refuses it.
  * frequency / presence penalties and DRY, XTC, typical, top-n-sigma, temp-ext: not implemented in qcpu,
    so those llama.cpp cases are not ported.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from qcpu import sampling
from qcpu.errors import QcpuError
from qcpu.sampling import (SEED_MAX, SamplingParams, _keep_min_p, _keep_top_k, _keep_top_p, apply_repeat_penalty,
                           make_sampler, new_rng, resolve_seed)

PROBS = [0.1, 0.2, 0.3, 0.4]  # llama.cpp's usual candidate vector: token i has probability PROBS[i]


def _logits(probs) -> np.ndarray:
    with np.errstate(divide="ignore"):  # logf(0) = -inf, as in llama.cpp's tester
        return np.log(np.asarray(probs, dtype=np.float32))


def _after(ids: np.ndarray, logits: np.ndarray) -> dict[int, float]:
    """llama.cpp's `dist` step: softmax over the remaining candidates (float64, independent of ours)."""
    e = np.exp(logits.astype(np.float64) - np.max(logits))
    return {int(i): float(p) for i, p in zip(ids, e / e.sum())}


def _check(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), (got, want)
    for i, p in want.items():
        assert abs(got[i] - p) < 1e-5, (i, got[i], p)  # llama.cpp's sampler_tester::check tolerance


def _plain(**kw) -> SamplingParams:
    """Every filter off unless asked for: temperature 1, no penalty."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0)
    return SamplingParams(**{**base, **kw})


# -- SamplingParams.validate -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {}, dict(temperature=0.0), dict(top_k=0), dict(top_p=1.0), dict(top_p=1e-6), dict(min_p=0.0),
    dict(min_p=0.999), dict(repeat_penalty=1.0), dict(repeat_penalty=0.5), dict(seed=0), dict(seed=SEED_MAX),
    dict(seed=-1),
])
def test_validate_accepts(kw):
    SamplingParams(**kw).validate()


@pytest.mark.parametrize("kw, words", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-1), "top-k"),
    (dict(top_p=0.0), "top-p"), (dict(top_p=1.01), "top-p"), (dict(top_p=math.nan), "top-p"),
    (dict(min_p=1.0), "min-p"), (dict(min_p=1.05), "min-p"), (dict(min_p=-0.1), "min-p"),
    (dict(min_p=math.nan), "min-p"),
    (dict(repeat_penalty=0.0), "repeat penalty"), (dict(repeat_penalty=-1.0), "repeat penalty"),
    (dict(repeat_penalty=math.nan), "repeat penalty"),
    (dict(seed=-2), "seed"), (dict(seed=SEED_MAX + 1), "seed"),
])
def test_validate_refuses_with_the_option_named(kw, words):
    with pytest.raises(QcpuError, match=words):
        SamplingParams(**kw).validate()
    with pytest.raises(QcpuError, match=words):  # and so does the factory, before any draw
        make_sampler(SamplingParams(**kw))


# -- top-k ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, want", [
    # llama.cpp test_top_k({0.1, 0.2, 0.3, 0.4}, expected, k)
    (1, {3: 1.0}),
    (3, {3: 0.44444, 2: 0.33333, 1: 0.22222}),
    (4, {3: 0.4, 2: 0.3, 1: 0.2, 0: 0.1}),
    (0, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),  # 0 = off
])
def test_top_k_llama_cases(k, want):
    _check(_after(*_keep_top_k(np.arange(4), _logits(PROBS), k)), want)


@pytest.mark.parametrize("seed", range(6))
def test_top_k_is_the_k_largest_in_order_ties_by_position(seed):
    """Against a full stable sort: values drawn from a few levels (many ties, also at the k-th place),
    -inf (a grammar's masked tokens) included, k from 1 to n - 1."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400 if seed % 2 else 3000))  # many chunks of _top_k's 64 (seeds 0, 2, 4)
    logits = rng.integers(-3, 4, n).astype(np.float32)
    logits[rng.random(n) < 0.2] = -np.inf
    logits[rng.random(n) < 0.02] = np.nan  # never kept
    for k in sorted({1, n - 1, int(rng.integers(1, n))}):
        order = np.lexsort((np.arange(n), -logits))  # by value, largest first; equal ones by index
        want = order[~np.isnan(logits[order])][:k]
        ids, kept = _keep_top_k(None, logits, k)
        assert ids.tolist() == want.tolist() and np.array_equal(kept, logits[want])


# -- top-p ----------------------------------------------------------------------------------------------------

def test_top_p_keeps_the_token_whose_mass_reaches_p_exactly():
    # llama.cpp stops at the first `cum_sum >= p`: with four equal logits, 0.25 + 0.25 reaches 0.5 exactly
    # (no rounding in float32), so two tokens stay, not three.
    ids, _ = _keep_top_p(np.arange(4), np.zeros(4, np.float32), 0.5)
    assert len(ids) == 2


@pytest.mark.parametrize("p, want", [
    # llama.cpp test_top_p({0.1, 0.2, 0.3, 0.4}, expected, p)
    (0.0, {3: 1.0}),  # (refused by validate; the filter keeps one token, as llama.cpp's min_keep)
    (0.7, {3: 0.571429, 2: 0.428571}),  # 0.4 + 0.3 reaches 0.7: the boundary token is kept
    (0.8, {3: 0.44444, 2: 0.33333, 1: 0.22222}),
    (1.0, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),
])
def test_top_p_llama_cases(p, want):
    _check(_after(*_keep_top_p(np.arange(4), _logits(PROBS), p)), want)


# -- min-p ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, want", [
    # llama.cpp test_min_p({0.1, 0.2, 0.3, 0.4}, expected, p): keep p_i >= p * p_max
    (0.00, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),
    (0.24, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),
    (0.26, {1: 0.2 / 0.9, 2: 0.3 / 0.9, 3: 0.4 / 0.9}),
    (0.49, {1: 0.2 / 0.9, 2: 0.3 / 0.9, 3: 0.4 / 0.9}),
    (0.51, {2: 0.3 / 0.7, 3: 0.4 / 0.7}),
    (0.74, {2: 0.3 / 0.7, 3: 0.4 / 0.7}),
    (0.76, {3: 1.0}),
    (1.00, {3: 1.0}),  # (refused by validate; the filter keeps the top token, as llama.cpp)
    # llama.cpp's 1.05 case is not ported: validate refuses min-p >= 1 before the filter can see it.
])
def test_min_p_llama_cases(p, want):
    _check(_after(*_keep_min_p(np.arange(4), _logits(PROBS), p)), want)


# -- llama.cpp test_sampler_queue: 10000 candidates, logit(i) = logf(i), so p_i = i / sum(0..9999) ---------

N_VOCAB = 10_000


def _top_p_count(ids_desc: list[int], p: str) -> int:
    """Smallest n whose top-n mass reaches p, in exact integer arithmetic (p_i is proportional to i)."""
    target, cum = Fraction(p) * sum(ids_desc), 0
    for n, i in enumerate(ids_desc, 1):
        cum += i
        if cum >= target:
            return n
    return len(ids_desc)


def _queue(order: str, k: int = 0, p: float = 1.0, m: float = 0.0) -> set[int]:
    ids, logits = np.arange(N_VOCAB), _logits(np.arange(N_VOCAB))
    for s in order:
        ids, logits = {"k": lambda: _keep_top_k(ids, logits, k), "p": lambda: _keep_top_p(ids, logits, p),
                       "m": lambda: _keep_min_p(ids, logits, m)}[s]()
    return set(ids.tolist())


@pytest.mark.parametrize("k, want", [(10_000, range(0, 10_000)), (1, [9999]), (100, range(9900, 10_000))])
def test_queue_top_k(k, want):
    # llama.cpp test_sampler_queue(10000, "k", k, 1.0, 1.0): the k highest ids
    assert _queue("k", k=k) == set(want)


@pytest.mark.parametrize("p", ["1.0", "0.0", "0.0003", "0.8"])
def test_queue_top_p(p):
    # llama.cpp test_sampler_queue(10000, "p", 10000, p, 1.0). With p = 1 the filter is off and keeps
    # even token 0 (p = 0), as llama.cpp's expected size 10000 does.
    ids_desc = list(range(N_VOCAB - 1, -1, -1))
    n = N_VOCAB if p == "1.0" else _top_p_count(ids_desc, p)
    assert (p, n) != ("0.8", N_VOCAB)  # (the reference is not vacuous: 0.8 keeps 5528 ids)
    assert _queue("p", p=float(p)) == set(ids_desc[:n])


@pytest.mark.parametrize("m, first", [
    # llama.cpp test_sampler_queue(10000, "m", 10000, 1.0, m): ids i >= m * 9999 (never id 0: p = 0)
    (1e-12, 1), (9997.9 / 9999.0, 9998), (0.1, 1000), (1.0, 9999),
])
def test_queue_min_p(m, first):
    assert _queue("m", m=m) == set(range(first, N_VOCAB))


def test_queue_top_k_top_p_min_p():
    # llama.cpp test_sampler_queue(10000, "kpm", 100, 0.8, 0.1), our (and llama.cpp's default) chain order:
    # top-k keeps 9900..9999, top-p 0.8 of those, min-p 0.1 then removes none (all are within 10x of 9999).
    top = list(range(N_VOCAB - 1, N_VOCAB - 101, -1))
    n = _top_p_count(top, "0.8")
    assert 1 < n < 100
    assert _queue("kpm", k=100, p=0.8, m=0.1) == set(top[:n])


# -- repetition penalty ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("last, want", [
    # llama.cpp test_penalties({0.2 x 5}, last_tokens, expected, repeat_penalty=50, 0, 0): every logit is
    # log 0.2 < 0, so a seen token's logit is multiplied by 50; a token seen 3 times is penalized once.
    ([0], {0: 0.0, 1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}),
    ([0, 1, 2], {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5, 4: 0.5}),
    ([0, 1, 2, 0, 0], {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5, 4: 0.5}),
])
def test_repeat_penalty_llama_cases(last, want):
    logits = _logits([0.2] * 5)
    _check(_after(np.arange(5), apply_repeat_penalty(logits, last, 50.0)), want)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 0.0, 3.0], np.float32)
    before = logits.copy()
    out = apply_repeat_penalty(logits, [0, 1, 2, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 0.0, 3.0]  # 0 stays 0 (llama.cpp: logit <= 0 is multiplied)
    assert np.array_equal(logits, before)  # the caller's logits are not modified
    assert apply_repeat_penalty(logits, [], 2.0).tolist() == before.tolist()
    assert apply_repeat_penalty(logits, [0], 1.0).tolist() == before.tolist()


# -- the sampler ----------------------------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    # llama.cpp test_temp({0.1, 0.2, 0.3, 0.4}, {0, 0, 0, 1}, 0.0)
    assert make_sampler(_plain(temperature=0.0))(_logits(PROBS)) == 3


@pytest.mark.parametrize("logits, recent, want", [
    ([1.0, 3.0, 2.9, -1.0], [], 1),
    ([1.0, 3.0, 2.9, -1.0], [1], 2),  # 3.0 / 1.1 = 2.73 < 2.9
    ([-1.0, -0.5, -0.52], [1], 2),  # -0.5 * 1.1 = -0.55 < -0.52
    ([1.0, 3.0, 2.9, -1.0], [1, 0, 3], 1),  # 1 is outside the last 2 tokens: not penalized
])
def test_greedy_is_argmax_after_the_penalty(logits, recent, want):
    sample = make_sampler(SamplingParams(temperature=0.0, repeat_penalty=1.1, repeat_last_n=2))
    assert sample(np.array(logits, np.float32), recent) == want


def test_same_seed_same_tokens_and_the_session_stream():
    rng = np.random.default_rng(0)
    steps = [(rng.normal(0, 2, 300).astype(np.float32), rng.integers(0, 300, 10).tolist()) for _ in range(60)]
    params = SamplingParams(seed=1234)  # Qwen's defaults: penalty, top-k, top-p, temperature 0.7

    def run(sample, part):
        return [sample(lg, rec) for lg, rec in part]

    a = run(make_sampler(params), steps)
    assert a == run(make_sampler(params), steps)
    assert a != run(make_sampler(SamplingParams(seed=1235)), steps)
    assert len(set(a)) > 5  # it really samples
    # A session keeps one stream across turns (new samplers on the same rng): the same tokens as one sampler.
    stream = new_rng(params)
    assert run(make_sampler(params, stream), steps[:25]) + run(make_sampler(params, stream), steps[25:]) == a


def test_one_candidate_still_draws_from_the_stream():
    # llama.cpp test_dist_singleton_rng: a draw from one candidate advances the stream like any other, so
    # two samplers with one seed stay in step whatever the first distribution was.
    params = _plain(seed=4242)
    singleton, control = make_sampler(params), make_sampler(params)
    singleton(np.zeros(1, np.float32))
    control(np.zeros(2, np.float32))
    flat = np.zeros(256, np.float32)
    assert [singleton(flat) for _ in range(8)] == [control(flat) for _ in range(8)]


def _reference_distribution(logits, recent, temp, k, p, m, penalty) -> tuple[dict[int, float], list[int]]:
    """The chain written out in float64: penalty -> top-k -> top-p -> min-p -> softmax(logits / temp).
    Returns {token: probability} and the number of candidates after each filter."""
    lg = logits.astype(np.float64)
    for t in set(recent):
        lg[t] = lg[t] / penalty if lg[t] > 0 else lg[t] * penalty
    order = np.argsort(-lg)[:k or None]  # (k = 0: off)
    pk = np.exp(lg[order] - lg[order].max())
    cum = np.cumsum(pk / pk.sum())
    n = len(order) if p >= 1.0 else int(np.argmax(cum >= p)) + 1  # (1.0: off, as in the sampler)
    # no boundary so close that float32 (ours) and float64 (here) could disagree
    assert p == 1.0 or (abs(cum[n - 1] - p) > 1e-3 and (n == 1 or abs(cum[n - 2] - p) > 1e-3))
    kept = order[:n]
    pm = np.exp(lg[kept] - lg[kept].max())
    assert np.all(np.abs(pm - m) > 1e-3)  # (pm is relative to the max already)
    sizes = [len(order), n]
    kept = kept[pm >= m]
    sizes.append(len(kept))
    q = np.exp((lg[kept] - lg[kept].max()) / temp)
    return dict(zip(kept.tolist(), (q / q.sum()).tolist())), sizes


@pytest.mark.parametrize("k, p, m, binding", [
    (12, 1.0, 0.0, 0),  # top-k alone: 64 -> 12
    (12, 0.75, 0.1, 1),  # top-p cuts the 12 to 7; min-p 0.1 would keep all 7
    (12, 0.95, 0.3, 2),  # top-p keeps 11, min-p 0.3 cuts them to 6
])
def test_sampled_frequencies_match_the_filtered_softmax(k, p, m, binding):
    """20000 draws with a fixed seed against the chain computed independently: a chi-square test at
    the 0.1% level (llama.cpp test_temp's temperature-1 case is the unfiltered version of this). Each case
    has a different filter deciding what is left, so leaving any one of them out fails a case."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 1.5, 64).astype(np.float32)
    recent = [int(np.argmax(logits)), 3, 3, 17]
    params = SamplingParams(temperature=0.8, top_k=k, top_p=p, min_p=m, repeat_penalty=1.3, seed=99)
    want, sizes = _reference_distribution(logits, recent, 0.8, k, p, m, 1.3)
    before = [len(logits), *sizes]
    assert before[binding + 1] < before[binding] and before[-1] == before[binding + 1] > 1, before
    sample = make_sampler(params)
    n = 20_000
    counts = np.bincount([sample(logits, recent) for _ in range(n)], minlength=len(logits))
    assert set(np.flatnonzero(counts).tolist()) <= set(want)  # never a filtered-out token
    expected = np.array([want[i] * n for i in want])
    chi2 = float((((counts[list(want)] - expected) ** 2) / expected).sum())
    df = len(want) - 1
    z = 3.0902  # upper 0.1% point of N(0, 1); Wilson-Hilferty approximation of the chi-square quantile
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit, (chi2, limit, counts[list(want)].tolist(), expected.round().tolist())


def test_temperature_one_draws_the_probabilities():
    # llama.cpp test_temp({0.1, 0.2, 0.3, 0.4}, {0.1, 0.2, 0.3, 0.4}, 1.0), checked by drawing.
    sample = make_sampler(_plain(seed=3))
    n = 20_000
    freq = np.bincount([sample(_logits(PROBS)) for _ in range(n)], minlength=4) / n
    # 4 standard errors: sqrt(p(1-p)/n) <= 0.0035
    assert np.all(np.abs(freq - PROBS) < 4 * np.sqrt(np.array(PROBS) * (1 - np.array(PROBS)) / n)), freq


# -- seeds ----------------------------------------------------------------------------------------------------

def test_resolve_seed():
    assert resolve_seed(0) == 0 and resolve_seed(SEED_MAX) == SEED_MAX and resolve_seed(42) == 42
    drawn = {resolve_seed(None) for _ in range(16)} | {resolve_seed(-1) for _ in range(16)}
    assert all(0 <= s < 2**32 for s in drawn)
    assert len(drawn) > 1  # drawn from the OS, not a constant (32 equal draws: chance 2**-992)
    for bad in (-2, SEED_MAX + 1):
        with pytest.raises(QcpuError, match="seed must be in"):
            resolve_seed(bad)


def test_new_rng_is_seeded_by_the_params(monkeypatch):
    a, b = new_rng(SamplingParams(seed=7)), new_rng(SamplingParams(seed=7))
    assert a.random(5).tolist() == b.random(5).tolist() == np.random.default_rng(7).random(5).tolist()
    monkeypatch.setattr(sampling.secrets, "randbelow", lambda n: 11)  # no seed: one is drawn
    assert new_rng(SamplingParams(seed=None)).random(3).tolist() == np.random.default_rng(11).random(3).tolist()


@pytest.mark.parametrize("temperature", [1e-320, 1e-300, 1e-40])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    # llama.cpp's temperature is a float32 (1e-320 and 1e-300 become 0: greedy); a tiny float32 one still
    # picks the top token. Dividing the raw logits by it used to overflow to inf and give NaN probabilities.
    logits = np.array([1.0, 3.0, 2.9999, -5.0], dtype=np.float32)
    sample = make_sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=3))
    assert {sample(logits) for _ in range(50)} == {1}


def test_presence_and_frequency_penalties_as_llama_cpp_applies_them():
    """llama.cpp's penalty_present / penalty_freq (OpenAI's presence_penalty / frequency_penalty): each
    token in the window loses presence once and frequency per occurrence; others are untouched."""
    logits = np.array([1.0, 2.0, -1.0, 0.5], np.float32)
    recent = [1, 1, 2, 1]
    got = sampling.apply_presence_frequency(logits, recent, presence=0.5, frequency=0.25)
    assert got.tolist() == [1.0, 2.0 - 0.5 - 3 * 0.25, -1.0 - 0.5 - 0.25, 0.5]
    assert logits.tolist() == [1.0, 2.0, -1.0, 0.5]  # a copy
    # through the sampler: greedy picks the token the penalties leave on top
    params = SamplingParams(temperature=0.0, repeat_penalty=1.0, frequency_penalty=2.0)
    assert sampling.make_sampler(params)(np.array([0.0, 3.0, 2.5], np.float32), [1]) == 2
    with pytest.raises(QcpuError, match="presence penalty"):
        SamplingParams(presence_penalty=2.5).validate()
