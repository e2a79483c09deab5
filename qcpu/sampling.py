"""Sampling: a factory returning a closure of small pure filters (MLX-LM's `sample_utils` shape).

Order as llama.cpp's default chain: repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
Temperature 0 means greedy (argmax after the penalty).

Seeds: a run without one draws it (`resolve_seed`) so that it can be shown and replayed. A chat session
keeps one random stream for all its turns, as llama.cpp's samplers do (one `llama_sampler` per session,
seeded once): with a fixed seed the whole session replays, and /retry still gives a different reply.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numba import njit

from qcpu import jit_cache  # noqa: F401  (before any cached kernel)
from qcpu.errors import QcpuError
from qcpu.grammar import Grammar


@dataclass
class SamplingParams:
    # Defaults: Qwen's chat generation config (top_p 0.8, repetition_penalty 1.1, temperature 0.7, top_k 20).
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64  # llama.cpp's window for the penalties
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token in the window
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per occurrence in the window
    grammar: Grammar | None = None  # replies must match it (a JSON schema, any JSON, GBNF/Lark): grammar.py

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise QcpuError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QcpuError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QcpuError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise QcpuError(f"min-p must be in [0, 1), got {self.min_p}")
        if not self.repeat_penalty > 0:
            raise QcpuError(f"repeat penalty must be > 0, got {self.repeat_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise QcpuError(f"{name.replace('_', ' ')} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None:
            resolve_seed(self.seed)


SEED_MAX = 2**64 - 1
RANDOM_SEED = -1  # llama.cpp's --seed -1 (LLAMA_DEFAULT_SEED): draw one


def resolve_seed(seed: int | None) -> int:
    """The seed to use: `seed` itself, or a fresh one drawn from the OS (None or -1), in [0, 2**32).

    Raises QcpuError for any other negative value or one above 2**64 - 1."""
    if seed is None or seed == RANDOM_SEED:
        return secrets.randbelow(2**32)
    if not 0 <= seed <= SEED_MAX:
        raise QcpuError(f"seed must be in 0..{SEED_MAX} (or -1 for a random one), got {seed}")
    return int(seed)


def new_rng(params: "SamplingParams") -> np.random.Generator:
    """The random stream for a session (or one run), seeded by `params.seed`."""
    return np.random.default_rng(resolve_seed(params.seed))


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty on tokens seen recently: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not len(recent):
        return logits
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    logits = logits.copy()
    seen = logits[ids]
    logits[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def apply_presence_frequency(logits: np.ndarray, recent: Sequence[int], presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties over the recent tokens: logit -= presence * (count > 0)
    + frequency * count (llama.cpp's penalty_present / penalty_freq, applied after the repeat penalty)."""
    if (presence == 0.0 and frequency == 0.0) or not len(recent):
        return logits
    ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
    logits = logits.copy()
    logits[ids] -= np.float32(presence) + np.float32(frequency) * counts.astype(np.float32)
    return logits


def _keep_top_k(ids: np.ndarray | None, logits: np.ndarray, k: int):
    """The k largest logits (all if k is 0 or covers them) and their ids, most likely first, ties by
    position (the earlier one is kept). ids None stands for np.arange(len(logits)) (the whole vocabulary)
    without building it."""
    n = len(logits)
    if not 0 < k < n:
        return ids, logits
    top = _top_k(np.ascontiguousarray(logits, dtype=np.float32), k)
    return (top if ids is None else ids[top]), logits[top]


_TOP_K_CHUNK = 64


@njit(cache=True, nogil=True)
def _top_k(logits, k):
    """Indices int64[k] of the k largest of logits float32[n] (0 < k < n), largest first, equal values in
    index order. One pass keeping a sorted list of k: most values lose against its last one, a single
    compare, and in chunks of 64 a chunk with no value above the k-th costs one vectorized count (152K
    tokens, k 20: 0.038 ms; 0.124 without the chunks; argpartition and a sort 0.32). NaN never enters."""
    vals = np.empty(k, np.float32)
    idx = np.empty(k, np.int64)
    size = 0
    n = logits.shape[0]
    for c0 in range(0, n, _TOP_K_CHUNK):
        c1 = min(n, c0 + _TOP_K_CHUNK)
        if size == k:  # a chunk with nothing above the k-th is skipped after one vectorized count
            above, kth = 0, vals[k - 1]
            for i in range(c0, c1):
                above += logits[i] > kth
            if above == 0:
                continue
        for i in range(c0, c1):
            x = logits[i]
            if size == k and not x > vals[k - 1]:
                continue
            if size < k:
                if not x == x:  # NaN: never kept
                    continue
                size += 1
            j = size - 1
            while j > 0 and vals[j - 1] < x:  # after every value >= x: equal values stay in index order
                vals[j] = vals[j - 1]
                idx[j] = idx[j - 1]
                j -= 1
            vals[j] = x
            idx[j] = i
    return idx[:size]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _keep_top_p(ids, logits, p: float):
    if p >= 1.0:
        return ids, logits
    order = np.argsort(-logits, kind="stable")
    ids, logits = ids[order], logits[order]
    cum = np.cumsum(_softmax(logits))
    n = int(np.searchsorted(cum, p) + 1)  # smallest prefix whose mass reaches p
    return ids[:n], logits[:n]


def _keep_min_p(ids, logits, p: float):
    if p <= 0.0:
        return ids, logits
    probs = _softmax(logits)
    keep = probs >= p * probs.max()
    return ids[keep], logits[keep]


class Sampler:
    """One reply's sampler: `sampler(logits[vocab] float32, recent_tokens) -> token id`, and the
    distribution it draws from (`distribution`, for speculative decoding's acceptance rule). Built by
    make_sampler."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator, constraint):
        self.params, self.rng, self.constraint = params, rng, constraint

    @property
    def greedy(self) -> bool:
        """Temperature 0 (llama.cpp's temperature is a float32: 1e-320 is greedy)."""
        return np.float32(self.params.temperature) == 0

    def _filtered(self, logits: np.ndarray, recent: Sequence[int]):
        """Penalties then top-k -> top-p -> min-p: (ids int64[k] or None for the greedy argmax, logits)."""
        params = self.params
        window = list(recent)[-params.repeat_last_n:]
        logits = apply_repeat_penalty(logits, window, params.repeat_penalty)
        logits = apply_presence_frequency(logits, window, params.presence_penalty, params.frequency_penalty)
        if self.greedy:
            return None, logits
        ids, logits = _keep_top_k(None, logits, params.top_k)
        if ids is None:
            ids = np.arange(len(logits))
        ids, logits = _keep_top_p(ids, logits, params.top_p)
        return _keep_min_p(ids, logits, params.min_p)

    def _probs(self, logits: np.ndarray) -> np.ndarray:
        scaled = logits.astype(np.float64)
        # shifted first: a tiny temperature sends the others to -inf, never the top one to +inf (inf - inf
        # would be NaN)
        return _softmax((scaled - scaled.max()) / self.params.temperature)

    def distribution(self, logits: np.ndarray, recent: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The distribution the next token is drawn from, after the penalties and filters: ids int64[k]
        and probabilities float64[k] (summing to 1); greedy: the argmax with probability 1. Without the
        grammar mask (speculative decoding does not run with a grammar)."""
        ids, logits = self._filtered(np.asarray(logits, dtype=np.float32), recent)
        if ids is None:
            return np.array([int(np.argmax(logits))], dtype=np.int64), np.ones(1)
        return ids.astype(np.int64), self._probs(logits)

    def _draw(self, logits: np.ndarray, recent: Sequence[int]) -> int:
        ids, logits = self._filtered(logits, recent)
        if ids is None:
            return int(np.argmax(logits))
        probs = self._probs(logits)
        return int(ids[self.rng.choice(len(ids), p=probs)])

    def __call__(self, logits: np.ndarray, recent: Sequence[int] = ()) -> int:
        logits = np.asarray(logits, dtype=np.float32)
        if self.constraint is None:
            return self._draw(logits, recent)
        token = self._draw(self.constraint.mask(logits), recent)
        self.constraint.accept(token)
        return token


def make_sampler(params: SamplingParams, rng: np.random.Generator | None = None, tokenizer=None) -> Sampler:
    """sampler(logits[vocab] float32, recent_tokens) -> token id, for one reply. Same seed, same tokens.

    `rng` continues a session's random stream (see `new_rng`); without it the stream starts from
    `params.seed`. With `params.grammar` (which needs the `tokenizer`) the sampler keeps the reply's
    parser state: tokens the grammar forbids are masked first (-inf, before the penalties: llama.cpp's
    grammar sampler), and each token drawn advances it. Raises QcpuError for invalid parameters, and
    from the sampler if the grammar has no way on."""
    params.validate()
    rng = rng if rng is not None else new_rng(params)
    if params.grammar is not None and tokenizer is None:
        raise ValueError("make_sampler: a grammar needs the tokenizer")
    constraint = params.grammar.start(tokenizer) if params.grammar is not None else None
    return Sampler(params, rng, constraint)
