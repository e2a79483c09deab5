"""The engine: the one owner of the KV cache, and the generation loop over it.

`Engine` ties model, tokenizer, chat template and one KV cache together (llama-server's slot: one
conversation's cached tokens). Nothing else reads or writes the cache: callers say which tokens the cache
should hold (`sync`, modelled on llama-server's prompt cache and MLX-LM's `trim_prompt_cache`), feed more
(`feed`), rewind (`rewind`), and read the counters a UI shows (`n_held`, `capacity`, `n_kept`,
`n_evicted`). Generation is chunked prefill, then one-token decode steps, as a stream of text pieces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from qcpu.cache import KVPool, cache_type
from qcpu.chat_template import ChatTemplate
from qcpu.config import RopeOverrides
from qcpu.errors import QcpuError
from qcpu.memory import check_memory, kv_cache_bytes
from qcpu.model import Qwen2Model
from qcpu.rope import Rope
from qcpu.sampling import SamplingParams, make_sampler
from qcpu.speculative import Speculator, check
from qcpu.tokenizer import StreamDecoder, Tokenizer

DEFAULT_CTX = 4096  # tokens of KV cache when the user names none (capped to the trained context)
PREFILL_CHUNK = 256  # tokens per prefill pass: packed weight tiles serve them all (512 measured no faster)


def common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences (token ids, or text)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    first_token_seconds: float = 0.0
    stop_reason: str = ""
    draft_passes: int = 0  # speculative decoding: passes that checked drafted tokens
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted_tokens / self.draft_passes if self.draft_passes else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


@dataclass
class Piece:
    text: str
    token: int | None
    stats: Stats = field(repr=False, default_factory=Stats)


class Engine:
    """Model + tokenizer + chat template + the KV cache, which only this class touches.

    The cache holds a stream of tokens (`tokens`: every token fed since the last reset, evicted ones
    included). Its first `n_kept` tokens (a system prompt) are never evicted; when the cache is full, half
    of the others (the oldest) are dropped at once, as llama.cpp's context shift does (cache.py).
    """

    def __init__(self, model: Qwen2Model, tokenizer: Tokenizer, template: ChatTemplate, ctx: int | None = None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", kv_pool: KVPool | None = None,
                 pool_index: int = 0):
        """`ctx`: KV cache capacity in tokens; None: DEFAULT_CTX or the trained context if smaller. A ctx
        above the trained context needs rope scaling (linear or YaRN, from the file or the command line) and
        may reach the original context times its factor (config.max_context). cache_type_k/v: -ctk/-ctv
        (f16, q8_0, q4_0). kv_pool: keep the cache as cache `pool_index` of this KVPool (`slots`). Raises
        QcpuError (one line) for a ctx beyond that, an unknown cache type, or a cache that cannot fit
        memory."""
        self.model, self.tokenizer, self.template = model, tokenizer, template
        cfg = model.config
        if ctx is None:
            ctx = min(DEFAULT_CTX, cfg.context_length)
        elif ctx > cfg.context_length and not cfg.rope_scaled:
            factor = -(-ctx // cfg.context_length)
            raise QcpuError(f"--ctx {ctx} is above the model's trained context of {cfg.context_length} tokens; "
                            f"to stretch it, add rope scaling: --rope-scaling yarn --rope-scale {factor} "
                            f"--yarn-orig-ctx {cfg.context_length}")
        elif ctx > cfg.max_context:
            raise QcpuError(f"--ctx {ctx} is above the {cfg.max_context} tokens the model's rope scaling "
                            f"({model.rope.describe()}) reaches; raise --rope-scale")
        type_k, type_v = cache_type(cache_type_k), cache_type(cache_type_v)
        # Say so clearly, before allocating, instead of being killed by the OS halfway.
        if kv_pool is None:
            check_memory(model.file.size, kv_cache_bytes(model.config, ctx, type_k, type_v), ctx=ctx)
        self._cache = model.new_cache(ctx, type_k=type_k, type_v=type_v, pool=kv_pool, index=pool_index)
        self._tokens: list[int] = []  # the token stream the cache has seen (evicted ones included)
        self.speculator: Speculator | None = None  # drafts checked in one pass while decoding (speculative.py)

    @classmethod
    def load(cls, path: str | Path, ctx: int | None = None, chat_template: str | None = None,
             check_tensors: bool = False, rope: RopeOverrides | None = None, cache_type_k: str = "f16",
             cache_type_v: str = "f16") -> Engine:
        """Open a GGUF file (see __init__ for `ctx`). `check_tensors`: validate every block's scales and
        every float value first (llama.cpp's --check-tensors). `rope`: rope settings over the file's
        (--rope-scaling, --rope-scale, --yarn-orig-ctx, --rope-freq-base). cache_type_k/v: see __init__. Raises QcpuError (one line) for a
        bad file or setting."""
        model = Qwen2Model.load(path)
        if rope:
            model.config = model.config.with_rope_overrides(rope)
            model.rope = Rope.from_config(model.config)
        if check_tensors:
            from qcpu.validate import check_tensors as validate

            validate(model)
        meta = model.file.metadata
        tokenizer = Tokenizer.from_metadata(meta)
        return cls(model, tokenizer, ChatTemplate.from_metadata(meta, chat_template), ctx, cache_type_k, cache_type_v)

    # -- what the cache holds: the counters a UI shows ----------------------------------------------
    @property
    def tokens(self) -> list[int]:
        """A copy of the token stream fed since the last reset (evicted tokens included)."""
        return list(self._tokens)

    @property
    def capacity(self) -> int:
        """Tokens the cache can hold (--ctx)."""
        return self._cache.capacity

    @property
    def cache_types(self) -> tuple[str, str]:
        """The K and V cache types, by their -ctk/-ctv names."""
        return self._cache.type_k.name.lower(), self._cache.type_v.name.lower()

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache takes (allocated once, at its full capacity)."""
        return self._cache.nbytes

    @property
    def n_held(self) -> int:
        """Tokens the cache holds now (at most `capacity`)."""
        return self._cache.length

    @property
    def n_kept(self) -> int:
        """Length of the prefix that is never evicted (the system prompt), in tokens."""
        return self._cache.keep

    @property
    def n_evicted(self) -> int:
        """Tokens dropped by context shifts since the last reset."""
        return self._cache.n_evicted

    @property
    def n_seen(self) -> int:
        """Tokens fed since the last reset: the stream index of the next one."""
        return self._cache.n_seen

    @property
    def room(self) -> int:
        """Tokens one prompt may have without evicting part of itself: capacity minus the kept prefix."""
        return self._cache.capacity - self._cache.keep

    @property
    def oldest_held(self) -> int:
        """Stream index of the oldest token still held outside the kept prefix (n_seen if none)."""
        c = self._cache
        live = c.slot_seq[c.slot_seq >= c.keep]
        return int(live.min()) if len(live) else c.n_seen

    # -- changing what the cache holds --------------------------------------------------------------
    def reset(self, keep: int = 0) -> None:
        """Empty the cache; the first `keep` tokens fed from now on are never evicted."""
        self._cache.reset()
        self._cache.keep = keep
        self._tokens = []

    def can_rewind(self, n: int) -> bool:
        """Whether `rewind(n)` is possible: the cache has not dropped any token at or after index n."""
        return n >= self.n_seen or not self.n_evicted or n >= self.oldest_held

    def rewind(self, n: int) -> None:
        """Forget every token from stream index `n` on (MLX-LM's trim_prompt_cache). Raises QcpuError
        when the cache has already dropped tokens from there on (see `can_rewind`)."""
        if not self.can_rewind(n):
            raise QcpuError(f"cannot rewind to token {n}: the context has already dropped tokens after it")
        if n < self.n_seen:
            self._cache.truncate(n)
            del self._tokens[n:]

    def sync(self, tokens: Sequence[int], keep: int | None = None, need_logits: bool = True) -> list[int]:
        """Make the cache hold the longest usable prefix of `tokens`; return the rest, still to feed.

        Like llama-server's per-slot prompt cache: the common prefix of `tokens` and the cached stream is
        kept, the cache rewound after it. When the cache has dropped tokens past the divergence, the cache
        is kept if the tokens it holds spell the same text as `tokens` there (a reply re-tokenized
        differently), and only the text after it is fed; otherwise it is rebuilt from an empty cache with
        `keep` kept tokens (`keep` None: as now). With `need_logits`, at least one token is left to feed, so
        that its logits are fresh. The returned tokens may be longer than `room`: feeding them then
        evicts the oldest non-kept tokens as it goes."""
        tokens = [int(t) for t in tokens]
        keep = self.n_kept if keep is None else keep
        held = self._tokens
        common = common_prefix(tokens, held)
        if keep != self.n_kept or common < min(keep, len(tokens)):
            self.reset(keep)  # the kept prefix itself changed
            return tokens
        if common == len(held) and (common < len(tokens) or not need_logits):
            return tokens[common:]
        if need_logits and common == len(tokens):
            common -= 1  # everything is held: re-feed the last token for its logits
        if self.can_rewind(common):
            self.rewind(common)
            return tokens[common:]
        # The cache dropped tokens after the divergence: keep what is held if it is the same text.
        held_text = self.tokenizer.decode_bytes(held[common:])
        want_text = self.tokenizer.decode_bytes(tokens[common:])
        if want_text.startswith(held_text) and (len(want_text) > len(held_text) or not need_logits):
            rest = want_text[len(held_text):]
            try:
                return self.tokenizer.encode(rest.decode("utf-8")) if rest else []
            except UnicodeDecodeError:  # the held tokens end inside a character: rebuild instead
                pass
        self.reset(keep)
        return tokens

    def prefill_chunk(self) -> int:
        """Tokens per prefill pass: PREFILL_CHUNK, at most the room the cache has (tokens). Raises
        QcpuError when the kept prefix leaves none."""
        chunk = min(PREFILL_CHUNK, self.room)
        if chunk < 1:
            raise QcpuError(f"the kept prefix ({self.n_kept} tokens) fills the whole context of "
                            f"{self.capacity} tokens")
        return chunk

    def feed(self, tokens: Sequence[int], all_logits: bool = False,
             progress: Callable[[int, int], None] | None = None, first_chunk: int | None = None) -> np.ndarray:
        """Run tokens after what the cache holds, in chunks of at most PREFILL_CHUNK (and `room`); the
        logits float32[vocab] of the last one (or float32[len(tokens), vocab] of all). `progress(done,
        total)` is called after each chunk; `first_chunk` makes the first one that small (compile the
        one-token path first at start-up). Raises QcpuError when the kept prefix leaves no room."""
        chunk = self.prefill_chunk()
        outs = []
        logits = None
        done, total = 0, len(tokens)
        if progress:
            progress(0, total)
        while done < total:
            n = min(first_chunk, chunk) if (first_chunk and done == 0) else chunk
            part = tokens[done:done + n]
            logits = self.model.forward(part, self._cache, all_logits=all_logits)
            self._tokens.extend(int(t) for t in part)
            outs.append(logits)
            done += len(part)
            if progress:
                progress(done, total)
        if logits is None:
            raise QcpuError("nothing to feed")
        return np.concatenate(outs) if all_logits else logits[-1]

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        """A few tokens (a decode step, or one with drafted tokens to check) after what the cache holds, in
        one pass: logits float32[n, vocab] of every row, each bit for bit what feeding the tokens one at
        a time gives (Qwen2Model.forward's `exact`), so speculative decoding keeps greedy output
        identical. A full cache shifts first, as for any feed. Raises QcpuError when the tokens do not fit
        the room."""
        if len(tokens) > self.room:
            raise QcpuError(f"{len(tokens)} tokens do not fit the {self.room} tokens of room")
        logits = self.model.forward(tokens, self._cache, all_logits=True, exact=True)
        self._tokens.extend(int(t) for t in tokens)
        return logits

    def recent_tokens(self, n: int) -> list[int]:
        """The last n tokens of the stream (the sampler's penalty window)."""
        return self._tokens[-n:] if n > 0 else []

    def slots(self, n: int) -> list["Engine"]:
        """n engines over this one's model, tokenizer, template, context and cache types (a server's
        slots), their caches side by side in one KVPool, so that step_together reads them all in one
        attention call per layer; this engine's own cache is not among them. Raises QcpuError when n such
        caches cannot fit memory (the caller may check first, with a better message)."""
        c, ctx = self.model.config, self.capacity
        type_k, type_v = (cache_type(t) for t in self.cache_types)
        check_memory(self.model.file.size, n * kv_cache_bytes(c, ctx, type_k, type_v), ctx=ctx)
        pool = self.model.new_pool(n, ctx, type_k, type_v)
        return [Engine(self.model, self.tokenizer, self.template, ctx, *self.cache_types, kv_pool=pool, pool_index=i)
                for i in range(n)]

    @staticmethod
    def step_together(engines: Sequence["Engine"], tokens: Sequence, all_logits=False, exact: bool = False):
        """Several engines over the same model fed in one pass (the weights are read once for all:
        Qwen2Model.forward_batch): tokens[i] is one token id (a decode step) or a list of them (a prompt
        chunk, or a token and its drafts; at most `room`). Logits float32[len(engines), vocab], each
        engine's last token's; with all_logits (True, or one bool per engine) a list of float32[len(tokens[i])
        or 1, vocab] (Qwen2Model.forward_batch). `exact`: every
        row bit for bit a one-token step (Qwen2Model.forward). Raises ValueError when the engines do not
        share one model or repeat, QcpuError when a chunk does not fit."""
        if len({id(e.model) for e in engines}) != 1:
            raise ValueError("step_together: the engines must share one model")
        seqs = [[int(t)] if np.ndim(t) == 0 else [int(x) for x in t] for t in tokens]
        for e, seq in zip(engines, seqs):
            if len(seq) > 1 and len(seq) > e.room:
                raise QcpuError(f"a chunk of {len(seq)} tokens does not fit the {e.room} tokens of room")
        if len(engines) == 1:
            every = all_logits if isinstance(all_logits, bool) else bool(all_logits[0])
            logits = engines[0].model.forward(seqs[0], engines[0]._cache, every, exact)
            logits = logits if isinstance(all_logits, bool) and not all_logits else [logits]
        else:
            logits = engines[0].model.forward_batch(seqs, [e._cache for e in engines], all_logits, exact)
        for e, seq in zip(engines, seqs):
            e._tokens.extend(seq)
        return logits

    # -- generation ---------------------------------------------------------------------------------
    def generate_tokens(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
                        stats: Stats | None = None, rng: np.random.Generator | None = None,
                        truncate: bool = False) -> Iterator[int]:
        """Yield sampled tokens after feeding `prompt`; stops at an end-of-turn id (never yielded).

        `rng` continues a session's random stream (sampling.new_rng); None starts one from params.seed.
        A prompt longer than `room` raises QcpuError unless `truncate` (then its oldest tokens outside
        the kept prefix are evicted as it is fed: a rebuilt conversation)."""
        for token, _ in self.generate_steps(prompt, params, max_tokens, stats, rng, truncate):
            yield token

    def generate_steps(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
                       stats: Stats | None = None, rng: np.random.Generator | None = None,
                       truncate: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """As `generate_tokens`, with the logits float32[vocab] each token was sampled from (before any
        penalty: the model's own distribution, for logprobs).

        With a `speculator` (and no grammar), each pass feeds the last token drawn together with the
        tokens drafted after it (speculative.py) and keeps those the acceptance rule takes: greedy output
        is plain decoding's token for token, sampled output has its distribution. The cache then holds
        exactly the tokens yielded, as in plain decoding."""
        stats = stats if stats is not None else Stats()
        if len(prompt) == 0:
            raise QcpuError("empty prompt")
        if len(prompt) > self.room and not truncate:
            raise QcpuError(f"prompt is {len(prompt)} tokens, longer than the context of "
                            f"{self.capacity} tokens (raise --ctx)")
        sampler = make_sampler(params, rng, self.tokenizer)
        spec = self.speculator if params.grammar is None else None
        if spec is not None:
            spec.start(params, sampler.rng)
        t0 = time.perf_counter()
        logits = self.feed(prompt)
        if spec is not None:
            spec.prepare(self._tokens)
        stats.prompt_tokens += len(prompt)
        stats.prompt_seconds += time.perf_counter() - t0
        t1 = time.perf_counter()
        eot = self.tokenizer.eot_ids
        token = sampler(logits, self._tokens)
        stats.first_token_seconds = time.perf_counter() - t0
        stats.stop_reason = "max tokens"
        produced = 0
        while produced < max_tokens:
            if token in eot:
                stats.stop_reason = "end of turn"
                break
            produced += 1
            stats.generated_tokens += 1
            if spec is not None:
                spec.drawn(token)
            yield token, logits
            base = len(self._tokens)  # the stream index of `token` in the cache
            t_step = time.perf_counter()
            # a draft may not reach past max_tokens, nor make the cache shift (a shift cannot be rewound)
            limit = min(max_tokens - produced, self.capacity - self.n_held - 1)
            draft = spec.propose(self._tokens + [token], limit) if spec is not None and limit > 0 else None
            if not draft or not draft.tokens:
                logits = self.decode([token])[-1]
                stats.generate_seconds = time.perf_counter() - t1
                if produced < max_tokens:
                    token = sampler(logits, self._tokens)
                    if spec is not None and produced > 1:  # the first step after a prompt runs colder
                        spec.stepped(0, time.perf_counter() - t_step)
                continue
            rows = self.decode([token] + draft.tokens)
            taken, nxt = check(sampler, rows, draft, self._tokens[:base + 1], eot)
            spec.checked(len(draft.tokens), len(taken))
            if produced > 1:
                spec.stepped(len(draft.tokens), time.perf_counter() - t_step)
            self.rewind(base + 1 + len(taken))
            stats.draft_passes += 1
            stats.drafted_tokens += len(draft.tokens)
            stats.accepted_tokens += len(taken)
            for j, d in enumerate(taken):
                produced += 1
                stats.generated_tokens += 1
                yield d, rows[j]
            logits, token = rows[len(taken)], nxt
            stats.generate_seconds = time.perf_counter() - t1
        stats.generate_seconds = time.perf_counter() - t1

    def stream(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
               stats: Stats | None = None, rng: np.random.Generator | None = None,
               truncate: bool = False) -> Iterator[Piece]:
        """Text pieces as they become whole UTF-8; special tokens are never printed."""
        stats = stats if stats is not None else Stats()
        decoder = StreamDecoder(self.tokenizer)
        for token in self.generate_tokens(prompt, params, max_tokens, stats, rng, truncate):
            text = decoder.feed(token)
            if text:
                yield Piece(text, token, stats)
        tail = decoder.flush()
        if tail:
            yield Piece(tail, None, stats)

    # -- the chat level -----------------------------------------------------------------------------
    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]:
        """Render `messages` through the chat template (with the assistant's header) and `sync` the
        cache to it; the tokens still to feed."""
        return self.sync(self.tokenizer.encode(self.template.render(messages, add_generation_prompt=True)))
