"""Speculative decoding: guess several tokens cheaply, check them in one pass of the model.

Decode reads every weight once per token; a pass over a few tokens costs little more (the multi-token
matvec reads each weight once for all of them). So a drafter proposes up to `draft_max` tokens, the target
model scores the pending token and the drafts in one exact pass (`Engine.decode`: each row bit for bit a
one-token step), and the drafts are accepted from the left by speculative sampling's rule:

    accept draft x with probability min(1, p(x) / q(x)); at the first rejection draw from
    normalize(max(0, p - q)) instead and drop the rest; if all are accepted, draw one more from p

(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", Algorithm 1; Chen et
al. 2023). p is the target's distribution after the sampler's penalties and filters, q the drafter's. The
output then has the target's distribution exactly; greedy (p one-hot) gives plain decoding's tokens.

Drafters:
- `NgramLookup`: prompt lookup decoding (llama.cpp's lookup, HF's prompt_lookup_num_tokens): the text that
  followed the latest earlier occurrence of the last n tokens. q is one-hot.
- `DraftModel`: a smaller model with the same vocabulary (llama.cpp's `-md`), on its own Engine and KV
  cache; greedy drafts for a greedy target (stopping below `p_min`, llama.cpp's --draft-p-min), drafts
  drawn from its own filtered distribution otherwise.

`Speculator` decides how many tokens to draft each step from the measured acceptance rate and the
measured wall time of a step by its drafted tokens, so lookup turns itself off where it does not pay
(plain chat) and on where it does (edits, code echoed back); while off, the acceptance of the drafts it
would have made is still measured, for free, against the tokens actually drawn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from qcpu.errors import QcpuError
from qcpu.sampling import Sampler, SamplingParams, make_sampler

if TYPE_CHECKING:
    from qcpu.generate import Engine

DRAFT_MAX = 16  # most tokens per step (llama.cpp's --draft-max was 16, now 3): the policy picks what pays
DRAFT_MIN = 0  # llama.cpp's --draft-min: fewer drafted tokens than this are not checked
DRAFT_P_MIN = 0.0  # llama.cpp's --draft-p-min (its default now): a greedy draft stops below this probability
NGRAM_MAX, NGRAM_MIN = 4, 2  # lookup: the longest n-gram tried first (llama.cpp's LLAMA_NGRAM_MAX is 4)
VOCAB_MAX_DIFFERENCE = 128  # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE


# ---- the acceptance rule ---------------------------------------------------------------------------

def accept(p_ids: np.ndarray, p_probs: np.ndarray, token: int, q_ids: np.ndarray, q_probs: np.ndarray,
           rng: np.random.Generator) -> tuple[bool, int]:
    """Speculative sampling's rule for one drafted `token` drawn from q: (True, token) with probability
    min(1, p(token) / q(token)), else (False, a token drawn from normalize(max(0, p - q))). p and q are
    sparse distributions: ids int64[k] with probabilities float64[k] (Sampler.distribution); a one-hot q
    (a deterministic draft) is q_ids [token], q_probs [1]. No random number is used when p(token) >=
    q(token) or when the residual has one token (a greedy p). Raises ValueError when q(token) is 0."""
    p_x = float(p_probs[p_ids == token].sum())
    q_x = float(q_probs[q_ids == token].sum())
    if q_x <= 0:
        raise ValueError("accept: the drafted token has no probability under q")
    if p_x >= q_x or (p_x > 0 and rng.random() < p_x / q_x):
        return True, token
    # residual over p's support (where p - q can be positive): p minus q there, clipped at 0
    q_on_p = np.zeros(len(p_ids))
    order = np.argsort(q_ids)
    at = np.searchsorted(q_ids[order], p_ids)
    found = (at < len(q_ids)) & (q_ids[order][np.minimum(at, len(q_ids) - 1)] == p_ids)
    q_on_p[found] = q_probs[order][at[found]]
    residual = np.maximum(p_probs - q_on_p, 0.0)
    total = residual.sum()
    if total <= 0:  # p == q on p's support: cannot happen after a rejection, bar rounding
        residual, total = p_probs.copy(), p_probs.sum()
    if np.count_nonzero(residual) == 1:
        return False, int(p_ids[np.argmax(residual)])
    return False, int(p_ids[rng.choice(len(p_ids), p=residual / total)])


def check(sampler: Sampler, rows: np.ndarray, draft: "Draft", stream: list[int], eot) -> tuple[list[int], int]:
    """Check `draft` against the target's logits rows float32[1 + len(draft), vocab] of one pass (row j:
    after `stream`, which ends with the pending token, and the first j drafted tokens). Returns the
    drafted tokens taken (from the left, up to the first rejection or an end-of-turn id, which ends the
    reply and is not taken) and the next token: drawn from the residual at a rejection, the end of turn,
    or drawn from the row after the last draft when all are taken."""
    taken: list[int] = []
    for j, (d, q) in enumerate(zip(draft.tokens, draft.q)):
        p_ids, p_probs = sampler.distribution(rows[j], stream + taken)
        q_ids, q_probs = (np.array([d]), np.ones(1)) if q is None else q
        ok, token = accept(p_ids, p_probs, d, q_ids, q_probs, sampler.rng)
        if not ok or d in eot:
            return taken, token
        taken.append(d)
    return taken, sampler(rows[len(taken)], stream + taken)


# ---- drafters --------------------------------------------------------------------------------------

@dataclass
class Draft:
    """Drafted tokens and, for each, the distribution it was drawn from (None: one-hot on the token)."""
    tokens: list[int]
    q: list[tuple[np.ndarray, np.ndarray] | None]


class NgramLookup:
    """Prompt lookup: the last n tokens of the stream (n from NGRAM_MAX down to NGRAM_MIN) searched for in
    the earlier stream; the tokens that followed their latest occurrence are the draft. The stream is kept
    as a growing int32 array, so a search is a few vectorized compares over it (~50 us at 32K tokens)."""

    def __init__(self, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self._buf = np.empty(1024, dtype=np.int32)
        self._seen: list[int] = []

    def _sync(self, tokens: Sequence[int]) -> np.ndarray:
        n = len(tokens)
        keep = 0
        for keep, (a, b) in enumerate(zip(self._seen, tokens)):  # usually all of _seen
            if a != b:
                break
        else:
            keep = min(len(self._seen), n)
        if len(self._buf) < n:
            self._buf = np.resize(self._buf, max(n, 2 * len(self._buf)))
        self._buf[keep:n] = tokens[keep:n]
        self._seen = list(tokens)
        return self._buf[:n]

    def draft(self, tokens: Sequence[int], n: int) -> Draft:
        """Up to n tokens continuing `tokens` (the whole stream: prompt and reply so far)."""
        a = self._sync(tokens)
        size = len(a)
        for g in range(min(self.ngram_max, size - 1), self.ngram_min - 1, -1):
            tail = a[size - g:]
            # candidate starts i in [0, size - g - 1]: an earlier occurrence followed by at least one token
            hit = a[:size - g] == tail[0]
            for j in range(1, g):
                hit &= a[j:size - g + j] == tail[j]
            where = np.flatnonzero(hit)
            if len(where):
                start = int(where[-1]) + g
                out = [int(t) for t in a[start:start + n]]
                return Draft(out, [None] * len(out))
        return Draft([], [])

    seconds_per_token = 0.0  # a search, not a model pass
    catch_up_seconds = 0.0

    def prepare(self, tokens: Sequence[int]) -> None:
        self._sync(tokens)

def check_vocabularies(target, draft) -> None:
    """llama.cpp's rule for a draft model (common_speculative_are_compatible): vocabulary sizes within
    VOCAB_MAX_DIFFERENCE and the same token bytes over the shared ids. Raises QcpuError (one line)."""
    a, b = target.tokenizer, draft.tokenizer
    if abs(a.vocab_size - b.vocab_size) > VOCAB_MAX_DIFFERENCE:
        raise QcpuError(f"the draft model's vocabulary ({b.vocab_size} tokens) differs from the model's "
                        f"({a.vocab_size}): a draft must share its tokenizer")
    for i in range(min(a.vocab_size, b.vocab_size)):
        if a.token_bytes(i) != b.token_bytes(i):
            raise QcpuError(f"the draft model's token {i} is {b.token_bytes(i)!r}, the model's is "
                            f"{a.token_bytes(i)!r}: a draft must share its tokenizer")


class DraftModel:
    """A smaller model with the same vocabulary, on its own Engine (its own KV cache, kept in step with the
    target's stream by Engine.sync: only new tokens are fed)."""

    def __init__(self, engine: "Engine", p_min: float = DRAFT_P_MIN, vocab_size: int | None = None):
        """vocab_size: the target's (a draft may have up to VOCAB_MAX_DIFFERENCE more ids: never drafted)."""
        self.engine, self.p_min = engine, p_min
        self.vocab_size = vocab_size or engine.tokenizer.vocab_size
        self.sampler: Sampler | None = None
        self.seconds_per_token: float | None = None  # running average of a draft step (a model pass)
        self.catch_up_seconds = 0.0  # the last draft's time reading tokens it had not seen (after idle steps)

    def start(self, params: SamplingParams, rng: np.random.Generator) -> None:
        """A reply starts: greedy drafts for a greedy target, else drawn with the reply's own settings."""
        self.sampler = make_sampler(SamplingParams(**{**params.__dict__, "grammar": None}), rng)

    def prepare(self, tokens: Sequence[int]) -> None:
        """Read the prompt now (its time counts as prompt processing, as in llama.cpp), not at the first
        draft."""
        e = self.engine
        if len(tokens) < e.capacity:
            e.feed(e.sync(tokens))

    def draft(self, tokens: Sequence[int], n: int) -> Draft:
        e = self.engine
        out = Draft([], [])
        if n <= 0:
            return out
        rest = e.sync(tokens)
        if len(tokens) + n > e.capacity:
            return out  # the draft's context would shift: not worth it
        t0 = time.perf_counter()
        logits = e.feed(rest)
        # A step feeds the token the target drew, and the last drafted one if all were taken: one pass of
        # 1-2 rows. More is catching up after steps without drafts (a prefill), not a draft step's cost.
        fed = time.perf_counter() - t0
        spent, passes = (fed, 1) if len(rest) <= 2 else (0.0, 0)
        self.catch_up_seconds = 0.0 if len(rest) <= 2 else max(0.0, fed - (self.seconds_per_token or 0.0))
        sampler = self.sampler
        for i in range(n):
            ids, probs = sampler.distribution(logits, e.recent_tokens(sampler.params.repeat_last_n))
            if sampler.greedy:
                if self.p_min > 0:
                    top = np.exp(logits.astype(np.float64) - logits.max())
                    if top.max() / top.sum() < self.p_min:
                        break
                token, q = int(ids[0]), None
            else:
                token, q = int(ids[sampler.rng.choice(len(ids), p=probs)]), (ids, probs)
            if token >= self.vocab_size or token in e.tokenizer.eot_ids:
                break
            out.tokens.append(token)
            out.q.append(q)
            if i + 1 < n:
                t0 = time.perf_counter()
                logits = e.decode([token])[-1]
                spent, passes = spent + time.perf_counter() - t0, passes + 1
        if passes:
            step = spent / passes
            self.seconds_per_token = step if self.seconds_per_token is None else (
                0.9 * self.seconds_per_token + 0.1 * step)
        return out


# ---- the policy ------------------------------------------------------------------------------------

@dataclass
class SpecStats:
    """Counters of one reply (or a server's lifetime): verification passes, tokens drafted and checked,
    tokens accepted."""
    passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted / self.passes if self.passes else 0.0

    def add(self, other: "SpecStats") -> None:
        self.passes += other.passes
        self.drafted += other.drafted
        self.accepted += other.accepted


class PassCosts:
    """Seconds of a model pass by its rows (running averages), shared by whatever feeds that model (the
    slots of a server share their passes); unmeasured sizes are priced by a prior slope."""

    PRIOR_SLOPE = 0.35  # cost(n) / cost(1) ~ 1 + slope (n - 1) before a size is measured (Q4_K_M, 2 threads)
    DECAY = 0.9  # weight of the past in the running averages

    def __init__(self):
        self.seconds: dict[int, float] = {}

    def timed(self, rows: int, seconds: float) -> None:
        """A pass of `rows` rows took `seconds`."""
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else self.DECAY * old + (1 - self.DECAY) * seconds

    def ratio(self, n: int, base: int = 1) -> float:
        """cost(n) / cost(base): measured where both are, else the prior slope."""
        if base in self.seconds and n in self.seconds:
            return self.seconds[n] / self.seconds[base]
        return (1.0 + self.PRIOR_SLOPE * (n - 1)) / (1.0 + self.PRIOR_SLOPE * (base - 1))


class Speculator:
    """How many tokens to draft each step: the k that maximizes the expected tokens per second,
    (1 + a + ... + a^k) / seconds(k), where a is the measured acceptance rate (a running average) and
    seconds(k) the measured wall time of a decode step that drafts and checks k tokens (drafting, the
    pass, checking: a running average per k, `steps`; k = 0 is a plain step). Sizes not yet measured are
    interpolated or extrapolated from the measured ones, or priced by a prior slope; in a server, whose
    passes carry other slots' rows, the prices are the measured pass costs by rows instead (PassCosts,
    shared by the slots). Lookup may draft nothing (k = 0: it turns itself off), and while off the drafts
    it would have made are scored against the tokens drawn, for free; a draft model, which the user chose,
    drafts at least one token. `always` (an explicit --lookup) drafts whatever the drafter has, up to
    draft_max."""

    DECAY = 0.9  # running averages: weight of the past
    LOOKUP_SLOPE = 0.35  # cost(k) / cost(0) ~ 1 + slope k before measured: a (k+1)-row pass (Q4_K_M, 2 threads)
    DRAFT_SLOPE = 0.6  # the same with a draft model's own step per drafted token (a draft a few times smaller)
    DRAFT_RATE = 0.8  # a draft model's acceptance before measured: the user chose it as a good guesser
    LOOKUP_RATE = 0.25  # lookup's: below what pays, so it starts off
    PLAIN_EVERY = 48  # steps between plain steps, which measure what drafting is compared with

    def __init__(self, drafter, draft_max: int = DRAFT_MAX, draft_min: int = DRAFT_MIN, always: bool = False,
                 costs: PassCosts | None = None):
        """`costs`: the passes' costs, shared by the slots of a server (their passes are one)."""
        if draft_max < 1 or draft_min < 0:
            raise QcpuError(f"--draft-max must be >= 1 and --draft-min >= 0 (got {draft_max}, {draft_min})")
        self.drafter, self.draft_max, self.draft_min, self.always = drafter, draft_max, draft_min, always
        # acceptance priors: lookup starts off and is turned on by the drafts it would have made (scored for
        # free); a draft model is trusted until measured
        self.rate = self.LOOKUP_RATE if self.is_lookup else self.DRAFT_RATE
        self.costs = costs if costs is not None else PassCosts()
        self.steps: dict[int, float] = {}  # seconds of a decode step by tokens drafted (running averages)
        self._since_plain = 0  # steps since the last plain one
        self._shadow: list[int] = []  # an unchecked lookup draft, to score against the tokens drawn
        self.stats = SpecStats()

    def step_seconds(self, k: int) -> float:
        """Seconds of a step drafting k tokens: measured, else interpolated or extrapolated linearly from
        the measured sizes, else scaled from the one measured by the prior slope (in units of a plain step
        when none is)."""
        s = self.steps
        slope = self.LOOKUP_SLOPE if self.is_lookup else self.DRAFT_SLOPE
        if k in s:
            return s[k]
        if not s:
            return 1.0 + slope * k
        known = sorted(s)
        if len(known) == 1:
            j = known[0]
            return s[j] * (1.0 + slope * k) / (1.0 + slope * j)
        below = [j for j in known if j < k]
        above = [j for j in known if j > k]
        a, b = (below[-1], above[0]) if below and above else (known[-2], known[-1]) if below else (known[0], known[1])
        return max(s[a] + (s[b] - s[a]) / (b - a) * (k - a), 0.5 * min(s.values()))

    def budget(self, limit: int, base: int | None = None, others: int = 0) -> int:
        """Tokens worth drafting now (limit: room left in the reply and the cache). `base`: in a server's
        batch, the rows the pass has without them (priced by PassCosts); None: a decode step of its own
        (priced by the measured steps). `others`: the other replies decoding in that pass, a token each.
        The batch's tokens per second is what is maximized, (others + 1 + a + ... + a^k) / seconds: drafts
        slow the pass for every reply in it, so they must pay for the others' time too. Lookup may choose
        none; a draft model, which the user chose, drafts at least one."""
        k_max = min(self.draft_max, limit)
        if k_max <= 0:
            return 0
        if self.always:
            return k_max
        k_min = 0 if self.is_lookup else 1
        best_k, best = 0, -1.0
        gain, term = 1.0, 1.0
        for k in range(0, k_max + 1):
            if k:
                term *= self.rate
                gain += term
            if k < k_min:
                continue
            cost = self.step_seconds(k) if base is None else self._batch_cost(k, base)
            value = (others + gain) / cost
            if best < 0 or value > best * 1.02:  # a longer step must be clearly better
                best_k, best = k, value
        return best_k

    def _batch_cost(self, k: int, base: int) -> float:
        """A server step: the batch pass with k more rows, plus k of the drafter's own steps, relative to
        the pass without them."""
        per_draft, t_base = self.drafter.seconds_per_token, self.costs.seconds.get(base)
        own = per_draft / t_base if per_draft is not None and t_base else (0.0 if self.is_lookup else 0.5)
        return self.costs.ratio(base + k, base) + k * own

    def stepped(self, drafted: int, seconds: float) -> None:
        """A decode step that drafted (and checked) `drafted` tokens took `seconds` of wall time (a draft
        model's catching up after idle steps is not a step's cost: it is taken off)."""
        if drafted:
            seconds -= self.drafter.catch_up_seconds
        old = self.steps.get(drafted)
        self.steps[drafted] = seconds if old is None else self.DECAY * old + (1 - self.DECAY) * seconds

    @property
    def is_lookup(self) -> bool:
        return isinstance(self.drafter, NgramLookup)

    @property
    def kind(self) -> str:
        """'draft model', 'lookup' (always on) or 'lookup (auto)'."""
        if not self.is_lookup:
            return "draft model"
        return "lookup" if self.always else "lookup (auto)"

    def start(self, params: SamplingParams, rng: np.random.Generator) -> None:
        self._shadow = []
        if isinstance(self.drafter, DraftModel):
            self.drafter.start(params, rng)

    def prepare(self, tokens: Sequence[int]) -> None:
        """The prompt is in the target's cache: let the drafter read it too."""
        self.drafter.prepare(tokens)

    def propose(self, tokens: Sequence[int], limit: int, base: int | None = None, others: int = 0) -> Draft:
        """The draft after `tokens` (the stream including the pending token), maybe empty (base, others:
        see budget)."""
        k = self.budget(limit, base, others)
        self._shadow = []
        # lookup: a plain step now and then keeps the price drafting is compared with fresh
        self._since_plain += 1
        if base is None and self.is_lookup and not self.always and (0 not in self.steps or
                                                                    self._since_plain > self.PLAIN_EVERY):
            k = 0
        if k == 0:
            self._since_plain = 0
            if self.is_lookup and limit > 0:  # not checked: scored later against what is drawn
                self._shadow = self.drafter.draft(tokens, min(self.draft_max, limit, 8)).tokens
            return Draft([], [])
        draft = self.drafter.draft(tokens, k)
        if len(draft.tokens) < max(1, self.draft_min):
            return Draft([], [])
        return draft

    def drawn(self, token: int) -> None:
        """A token drawn by plain decoding (no draft checked): score the unchecked draft against it."""
        if self._shadow:
            hit = self._shadow[0] == token
            self._update(1 if hit else 0, 1)
            self._shadow = self._shadow[1:] if hit else []

    def checked(self, drafted: int, accepted: int, n_pass: int | None = None, seconds: float = 0.0) -> None:
        """`accepted` of `drafted` drafted tokens were taken (in a pass of n_pass rows that took
        `seconds`, when given)."""
        if n_pass is not None:
            self.costs.timed(n_pass, seconds)
        if drafted:
            self.stats.passes += 1
            self.stats.drafted += drafted
            self.stats.accepted += accepted
            # a rejection ends the run: accepted successes, then one failure (if any)
            self._update(accepted, accepted + (1 if accepted < drafted else 0))

    def _update(self, hits: int, trials: int) -> None:
        for i in range(trials):
            self.rate = self.DECAY * self.rate + (1 - self.DECAY) * (1.0 if i < hits else 0.0)





# ---- set-up from the command line --------------------------------------------------------------------

@dataclass
class SpecOptions:
    """What the CLI asked for: a draft model (`--draft`/-md), or prompt lookup (`lookup`: True = always
    draft, False = never, None = on when it pays, the default), and llama.cpp's draft limits."""
    draft: str | None = None
    draft_max: int = DRAFT_MAX
    draft_min: int = DRAFT_MIN
    p_min: float = DRAFT_P_MIN
    lookup: bool | None = None


def attach(engine: "Engine", options: SpecOptions | None, costs: PassCosts | None = None,
           draft_model=None) -> Speculator | None:
    """Give `engine` the speculator the options ask for (engine.speculator; None for none). A draft model
    is loaded with the target's context size and checked for the same vocabulary. Raises QcpuError (one
    line) for a bad draft file, a different vocabulary, or bad limits. `costs`: shared pass costs (a
    server's slots); `draft_model`: an Engine over the draft already loaded (its model is shared, a new
    cache made for this engine)."""
    if options is None or (options.draft is None and options.lookup is False):
        engine.speculator = None
        return None
    if not 0.0 <= options.p_min <= 1.0:
        raise QcpuError(f"--draft-p-min must be in [0, 1], got {options.p_min}")
    if options.draft is not None:
        from qcpu.generate import Engine

        if options.lookup:
            raise QcpuError("--lookup and --draft are two ways to draft: give one")
        if draft_model is None:
            draft = Engine.load(options.draft, ctx=engine.capacity)
        else:
            draft = Engine(draft_model.model, draft_model.tokenizer, draft_model.template, engine.capacity)
        check_vocabularies(engine, draft)
        spec = Speculator(DraftModel(draft, options.p_min, engine.tokenizer.vocab_size), options.draft_max,
                          options.draft_min, costs=costs)
    else:
        spec = Speculator(NgramLookup(), options.draft_max, options.draft_min, always=bool(options.lookup),
                          costs=costs)
    engine.speculator = spec
    return spec
