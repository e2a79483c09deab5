"""Constrained decoding: replies that must match a JSON schema, any JSON value, or a grammar.

The constraint engine is llguidance (the Rust library llama.cpp's `--grammar`/`--json-schema` with
LLAMA_LLGUIDANCE and vLLM use), not our own: it compiles JSON schemas (with `$ref`, patterns, bounds,
min/max items), Lark and GBNF grammars into a lexer + Earley parser over the model's own vocabulary and
gives, at each step, the set of tokens that keep the output valid, in ~0.1-0.5 ms for 152K tokens.
outlines-core was the alternative; llguidance reads GBNF (llama.cpp's grammars) as well as JSON schemas
and Lark, handles the schema features above, and has wheels for x86-64 and ARM Linux, macOS and Windows.

Flow: `Grammar` (compiled once per request, checked against the vocabulary, so a bad schema is one error
before any decoding) -> `Constraint` (one reply's parser state) -> the sampler masks the logits before
its filters and tells the constraint each token it drew. When the grammar is complete the only tokens left
are the end-of-turn ids, so generation ends as it always does.
"""

from __future__ import annotations

import json
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcpu.errors import QcpuError

# Objects and arrays written as Python's json.dumps does by default: readable, and no run of whitespace
# for a small model to lose itself in.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_TABLES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer):
    """The llguidance token table of a qcpu Tokenizer (built once per tokenizer, ~1 s): each id's bytes
    as the model emits them, control tokens marked special, and the end-of-turn ids as its EOS set."""
    table = _TABLES.get(tokenizer)
    if table is None:
        import llguidance

        class _Wrapped:  # what llguidance.TokenizerWrapper reads
            def __init__(self):
                self.eos_token_id = min(tokenizer.eot_ids) if tokenizer.eot_ids else None
                self.bos_token_id = tokenizer.bos_id
                self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
                self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_control(i)]

            def __call__(self, text):
                if isinstance(text, bytes):
                    text = text.decode("utf-8", errors="replace")
                return tokenizer.encode(text, parse_special=False)

        table = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped()), eos_token=sorted(tokenizer.eot_ids))
        _TABLES[tokenizer] = table
    return table


@dataclass(frozen=True)
class Grammar:
    """A constraint on a reply, as llguidance's grammar text (`source`); `kind` names it in messages."""

    source: str
    kind: str

    @classmethod
    def json_schema(cls, schema: str | dict) -> "Grammar":
        """Replies that are JSON documents valid under `schema` (a JSON Schema, as text or parsed).
        Raises QcpuError (one line) for text that is not JSON or a schema that is not an object."""
        import llguidance

        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise QcpuError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise QcpuError("a JSON schema must be a JSON object")
        try:
            return cls(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE), "JSON schema")
        except (ValueError, TypeError) as e:
            raise QcpuError(f"invalid JSON schema: {e}") from None

    @classmethod
    def any_json(cls) -> "Grammar":
        """Replies that are one JSON object (OpenAI's response_format json_object, llama.cpp's --json)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def from_text(cls, text: str) -> "Grammar":
        """A GBNF grammar (llama.cpp's format, start rule `root`) or a Lark grammar (llguidance's, start
        rule `start`). Raises QcpuError if it is neither."""
        import llguidance

        try:
            return cls(llguidance.grammar_from("grammar", text), "grammar")
        except Exception as e:  # the GBNF converter raises plain exceptions with a useful message
            raise QcpuError(f"invalid grammar: {_one_line(str(e))}") from None

    @classmethod
    def from_lark(cls, text: str, kind: str = "grammar") -> "Grammar":
        """A Lark grammar in llguidance's dialect (which embeds JSON schemas as `%json {...}`); checked
        only by `check`."""
        import llguidance

        return cls(llguidance.LLMatcher.grammar_from_lark(text), kind)

    def check(self, tokenizer) -> None:
        """Compile against the tokenizer's vocabulary; QcpuError (one line) naming the problem if the
        grammar cannot be compiled. Cheap enough to run for every request."""
        import llguidance

        message = llguidance.LLMatcher.validate_grammar(self.source, _vocabulary(tokenizer))
        if message:
            raise QcpuError(f"invalid {self.kind}: {_one_line(message)}")

    def start(self, tokenizer) -> "Constraint":
        """A fresh parser state for one reply."""
        return Constraint(self, tokenizer)


def _one_line(message: str) -> str:
    return " ".join(message.split())[:400]


# One thread computes the next masks while the model runs the forward pass (llguidance releases the GIL,
# the kernels too): on the default model a JSON schema's masks took ~3 ms a token when computed in turn.
_MASKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcpu-grammar")


class Constraint:
    """One reply's parser state: `mask` the logits of the next token, then `accept` the token drawn.
    After `accept`, the next mask is computed in the background (the forward pass of the token runs
    meanwhile); `mask` waits for it."""

    def __init__(self, grammar: Grammar, tokenizer):
        import llguidance

        self.grammar = grammar
        self._vocab = _vocabulary(tokenizer)
        self._matcher = llguidance.LLMatcher(self._vocab, grammar.source, log_level=0)
        if self._matcher.is_error():
            raise QcpuError(f"invalid {grammar.kind}: {_one_line(self._matcher.get_error())}")
        self._bits = np.empty((self._vocab.vocab_size + 31) // 32, np.int32)
        self._next: Future | None = _MASKER.submit(self._compute)

    def _compute(self) -> np.ndarray | None:
        """bool[tokenizer's vocabulary]: the allowed ids, or None when the matcher is in error."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            return None
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(bool)[:self._vocab.vocab_size]

    def allowed(self, n: int) -> np.ndarray:
        """bool[n]: the token ids that keep the reply valid (n: the model's vocabulary, which may be
        larger than the tokenizer's; ids past the tokenizer's are never allowed)."""
        ok = (self._next or _MASKER.submit(self._compute)).result()
        self._next = None
        if ok is None:
            raise QcpuError(f"constrained decoding failed: {_one_line(self._matcher.get_error())}")
        if n == len(ok):
            return ok
        out = np.zeros(n, bool)
        m = min(n, len(ok))
        out[:m] = ok[:m]
        return out

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """float32[vocab]: a copy of logits with every token the grammar forbids at -inf."""
        out = np.full(len(logits), -np.inf, np.float32)
        np.copyto(out, logits, where=self.allowed(len(logits)))
        return out

    def accept(self, token: int) -> None:
        """Advance past `token` (one the mask allowed), and start on the next mask. Raises QcpuError if
        the grammar rejects it."""
        if self._next is not None:  # a mask nobody asked for: let it finish before the matcher moves
            self._next.result()
        if not self._matcher.consume_token(int(token)):
            raise QcpuError(f"constrained decoding failed: {_one_line(self._matcher.get_error())}")
        self._next = _MASKER.submit(self._compute) if not self._matcher.is_stopped() else None

    @property
    def complete(self) -> bool:
        """The reply so far is a whole match (the grammar would accept an end here)."""
        return self._matcher.is_accepting()
