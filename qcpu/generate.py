"""The generation loop: chunked prefill, then one-token decode steps, as a stream of text pieces.

`Engine` ties model, tokenizer, chat template and one ring KV cache together. A chat turn renders the whole
conversation through the template but feeds the model only what the cache does not already hold, so a
multi-turn conversation never re-processes earlier turns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from qcpu.chat_template import ChatTemplate
from qcpu.errors import QcpuError, warn
from qcpu.memory import check_memory, kv_cache_bytes
from qcpu.model import Qwen2Model
from qcpu.sampling import SamplingParams, make_sampler
from qcpu.tokenizer import StreamDecoder, Tokenizer

DEFAULT_CTX = 4096  # tokens of KV cache when the user names none (capped to the trained context)
PREFILL_CHUNK = 256  # tokens per prefill pass: large enough for BLAS, small enough for the ring


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    first_token_seconds: float = 0.0
    stop_reason: str = ""

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
    def __init__(self, model: Qwen2Model, tokenizer: Tokenizer, template: ChatTemplate, ctx: int | None = None):
        """`ctx`: KV cache capacity in tokens; None: DEFAULT_CTX or the trained context if smaller. A ctx
        above the trained context is capped to it with a warning. Raises QcpuError if it cannot fit memory."""
        self.model, self.tokenizer, self.template = model, tokenizer, template
        if ctx is None:
            ctx = min(DEFAULT_CTX, model.config.context_length)
        elif ctx > model.config.context_length:
            warn(f"--ctx {ctx} is above the model's trained context of {model.config.context_length} tokens: "
                 f"using {model.config.context_length}")
            ctx = model.config.context_length
        # Say so clearly, before allocating, instead of being killed by the OS halfway.
        check_memory(model.file.size, kv_cache_bytes(model.config, ctx), ctx=ctx)
        self.cache = model.new_cache(ctx)
        self.tokens: list[int] = []  # the token stream the cache has seen (evicted ones included)

    @classmethod
    def load(cls, path: str | Path, ctx: int | None = None, chat_template: str | None = None) -> "Engine":
        model = Qwen2Model.load(path)
        meta = model.file.metadata
        tokenizer = Tokenizer.from_metadata(meta)
        return cls(model, tokenizer, ChatTemplate.from_metadata(meta, chat_template), ctx)

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []

    # -- the token level ----------------------------------------------------------------------------
    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens after what the cache holds; the logits float32[vocab] of the last one (or
        float32[len(tokens), vocab] of all). Raises QcpuError when the kept prefix leaves no room."""
        chunk = min(PREFILL_CHUNK, self.cache.capacity - self.cache.keep)
        if chunk < 1:
            raise QcpuError(f"the kept prefix ({self.cache.keep} tokens) fills the whole context of "
                            f"{self.cache.capacity} tokens")
        outs = []
        logits = None
        for i in range(0, len(tokens), chunk):
            logits = self.model.forward(tokens[i:i + chunk], self.cache, all_logits=all_logits)
            self.tokens.extend(int(t) for t in tokens[i:i + chunk])
            outs.append(logits)
        return np.concatenate(outs) if all_logits else logits[-1]

    def generate_tokens(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
                        stats: Stats | None = None, rng: np.random.Generator | None = None) -> Iterator[int]:
        """Yield sampled tokens after feeding `prompt`; stops at an end-of-turn id (never yielded).

        `rng` continues a session's random stream (sampling.new_rng); None starts one from params.seed."""
        stats = stats if stats is not None else Stats()
        if len(prompt) == 0:
            raise QcpuError("empty prompt")
        room = self.cache.capacity - self.cache.keep
        if len(prompt) > room:
            raise QcpuError(f"prompt is {len(prompt)} tokens, longer than the context of "
                            f"{self.cache.capacity} tokens (raise --ctx)")
        sampler = make_sampler(params, rng)
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        stats.prompt_tokens += len(prompt)
        stats.prompt_seconds += time.perf_counter() - t0
        t1 = time.perf_counter()
        eot = self.tokenizer.eot_ids
        for i in range(max_tokens):
            token = sampler(logits, self.tokens)
            if i == 0:
                stats.first_token_seconds = time.perf_counter() - t0
            if token in eot:
                stats.stop_reason = "end of turn"
                break
            stats.generated_tokens += 1
            yield token
            logits = self.model.forward([token], self.cache)[-1]
            self.tokens.append(token)
            stats.generate_seconds = time.perf_counter() - t1
        else:
            stats.stop_reason = "max tokens"
        stats.generate_seconds = time.perf_counter() - t1

    def stream(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
               stats: Stats | None = None, rng: np.random.Generator | None = None) -> Iterator[Piece]:
        """Text pieces as they become whole UTF-8; special tokens are never printed."""
        stats = stats if stats is not None else Stats()
        decoder = StreamDecoder(self.tokenizer)
        for token in self.generate_tokens(prompt, params, max_tokens, stats, rng):
            text = decoder.feed(token)
            if text:
                yield Piece(text, token, stats)
        tail = decoder.flush()
        if tail:
            yield Piece(tail, None, stats)

    # -- the chat level -----------------------------------------------------------------------------
    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]:
        """Tokens of the rendered conversation that the cache does not hold yet.

        The cache holds `self.tokens`; if the new rendering extends them, only the extension is new.
        Otherwise (the template re-wrote earlier text) the cache is rewound to the common prefix, or
        cleared when the ring has already evicted tokens.
        """
        full = self.tokenizer.encode(self.template.render(messages, add_generation_prompt=True))
        held = self.tokens
        common = 0
        for a, b in zip(full, held):
            if a != b:
                break
            common += 1
        if self.cache.n_evicted:
            # Earlier text is gone from the cache: render only the new messages after what was said.
            if common == len(held):
                return full[common:]
            return self._tokens_after_eviction(messages)
        if common == len(full):  # the cache holds it all: re-feed the last token for fresh logits
            common -= 1
        if common < len(held):
            self.cache.truncate(common)
            del self.tokens[common:]
        return full[common:]

    def _tokens_after_eviction(self, messages: list[dict]) -> list[int]:
        # The cache ends inside the rendering of messages[:-1] (right after the last reply's text, whose
        # end-of-turn token was sampled but not fed). Feed the rest of that rendering, then the new turn.
        before = self.template.render(messages[:-1], add_generation_prompt=False)
        after = self.template.render(messages, add_generation_prompt=True)
        last = messages[-2]["content"] if len(messages) >= 2 else ""
        cut = before.rfind(last) + len(last) if last and last in before else len(before)
        tail = before[cut:] + (after[len(before):] if after.startswith(before) else after)
        return self.tokenizer.encode(tail)
