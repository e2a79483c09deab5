"""Byte-level BPE tokenizer built from a GGUF file's own vocabulary, matching llama.cpp token for token.

The GGUF carries everything needed (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` ...), so no
sentencepiece and no hub download: we feed those arrays to the ``tokenizers`` package (Rust BPE) and
reproduce llama.cpp's behaviour around it.  The reference is llama.cpp ``src/llama-vocab.cpp`` (the
version vendored by llama-cpp-python 0.3.36, llama.cpp commit 0c1e570) and ``src/unicode.cpp``:

* pre-tokenizer regex per ``tokenizer.ggml.pre`` -- ``llama_vocab::impl`` / ``llm_tokenizer_bpe``
  constructor, ``case LLAMA_VOCAB_PRE_TYPE_QWEN2``; a file without the key gets llama.cpp's
  ``LLAMA_VOCAB_PRE_TYPE_DEFAULT`` split and a one-line warning (``llama_vocab::impl::load``,
  "missing pre-tokenizer type, using: 'default'");
* no Unicode normalisation.  Hugging Face's tokenizer.json for Qwen2 has an NFC normaliser, llama.cpp
  has none for BPE; we follow llama.cpp (so a decomposed "e" + U+0301 stays decomposed);
* special-token partitioning before BPE -- ``llama_vocab::impl::tokenizer_st_partition``: control
  tokens (token_type 3) are matched in text only when ``parse_special`` is true, user-defined tokens
  (type 4, e.g. Qwen's ``<tool_call>``) are matched always;
* detokenisation -- ``llama_vocab::impl::token_to_piece``: normal tokens are GPT-2 byte-decoded,
  control/user-defined tokens are their literal text, unused tokens (type 5) render as nothing, and
  control tokens are dropped when ``special`` is false;
* end-of-generation ids -- the ``special_eog_ids`` block of ``llama_vocab::impl::load`` (see
  https://github.com/ggml-org/llama.cpp/issues/9606 for what goes wrong when one is missed).
"""

from __future__ import annotations

import codecs
import re
import threading
from typing import Any, Callable, Iterable, Mapping

from qcpu.errors import QcpuError

# GGUF token types (gguf-py ``gguf.constants.TokenType``; llama.h ``llama_token_type``).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Pre-tokenizer regexes, copied from llama.cpp src/llama-vocab.cpp (llm_tokenizer_bpe constructor).
# llama.cpp rewrites the tokenizer.json form "(?i:'s|'t|'re|'ve|'m|'ll|'d)|..." with explicit ASCII
# case classes; we use that rewrite because Oniguruma's Unicode case folding would also let "'ſ"
# (U+017F) match "(?i:'s)", which llama.cpp's hand-written splitter (unicode.cpp,
# unicode_regex_split_custom_qwen2) does not do.
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
# LLAMA_VOCAB_PRE_TYPE_QWEN35: letter runs also take combining marks (\p{M}).
_QWEN35_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
# LLAMA_VOCAB_PRE_TYPE_DEFAULT (llm_tokenizer_bpe constructor, `default:` case): four regexes applied in
# turn, each splitting every piece the previous ones left (unicode.cpp unicode_regex_split), matches and
# the text between them both kept as pieces -- what tokenizers' Split(behavior="isolated") does.
#  1. runs of punctuation and $+<=>^~| (so "'" is cut off before 2. can see "'s");
#  2. GPT-2's regex; llama.cpp runs its hand-written unicode_regex_split_custom_gpt2, which also
#     isolates whitespace the regex leaves unmatched -- the same pieces as Split's gaps;
#  3. digit runs;  4. ASCII digits in threes from the left ("1234567" -> "123", "456", "7").
_DEFAULT_REGEXES = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)
# tokenizer.ggml.pre values llama.cpp maps to the regexes above (llama_vocab::impl::load).
# Only the Qwen family (and llama.cpp's fallback) is supported: an unknown pre-tokenizer would
# silently mis-tokenise.
_PRE_REGEX: dict[str, tuple[str, ...]] = {
    "qwen2": (_QWEN2_REGEX,),
    "deepseek-r1-qwen": (_QWEN2_REGEX,),
    "megrez": (_QWEN2_REGEX,),
    "qwen35": (_QWEN35_REGEX,),
    "default": _DEFAULT_REGEXES,
}
MISSING_PRE_WARNING = ("this GGUF has no tokenizer.ggml.pre: tokenizing with llama.cpp's 'default' "
                       "pre-tokenizer (generation quality may be degraded; consider regenerating the model)")

# Token texts llama.cpp treats as end-of-generation whatever the GGUF metadata says
# (llama-vocab.cpp, "maintain a list of tokens that cause end-of-generation").
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>",
})
# FIM pad / repo / file-separator tokens are also EOG in llama.cpp (a model that emits them has left the
# conversation).  Metadata key first, else the token text llama.cpp looks for.
_FIM_EOG = (
    ("tokenizer.ggml.fim_pad_token_id", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    ("tokenizer.ggml.fim_rep_token_id", ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    ("tokenizer.ggml.fim_sep_token_id", ("<|file_sep|>",)),
)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map (openai/gpt-2 src/encoder.py; llama.cpp unicode.cpp
    unicode_byte_to_utf8_map)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _byte_decode(text: str) -> bytes:
    """A normal token's stored text back to its raw bytes (llama-vocab.cpp llama_decode_text)."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        # llama.cpp emits "[UNK_BYTE_0x..]" for such chars; a well-formed vocab never has them.
        return text.encode("utf-8")


def _get(meta: Mapping[str, Any], key: str, default=None):
    v = meta.get(key, default)
    return default if v is None else v


class Tokenizer:
    """Encode/decode for a GGUF gpt2-style (byte-level BPE) vocabulary.  Build with ``from_metadata``.

    ``warn`` receives each warning as one line of text (default: ``qcpu.errors.warn``, which prints
    ``qcpu: warning: ...`` on stderr); the warnings given are also kept in ``self.warnings``.
    Raises QcpuError (one line) for a vocabulary qcpu cannot tokenize exactly as llama.cpp would."""

    def __init__(self, meta: Mapping[str, Any], warn: Callable[[str], None] | None = None):
        self.warnings: list[str] = []
        model = _get(meta, "tokenizer.ggml.model")
        if model is None:
            raise QcpuError("this GGUF has no tokenizer.ggml.model; qcpu only handles gpt2-style byte-level BPE (Qwen2 family)")
        if model != "gpt2":
            raise QcpuError(f"unsupported tokenizer {model!r} in this GGUF: qcpu only handles gpt2-style byte-level BPE (Qwen2 family)")
        tokens = _get(meta, "tokenizer.ggml.tokens")
        merges = _get(meta, "tokenizer.ggml.merges")
        if not tokens or not merges:
            missing = " and ".join(k for k, v in (("tokenizer.ggml.tokens", tokens), ("tokenizer.ggml.merges", merges)) if not v)
            raise QcpuError(f"this GGUF's BPE tokenizer lacks {missing}; cannot tokenize")
        pre = _get(meta, "tokenizer.ggml.pre", "")
        if pre == "":
            # llama.cpp (llama_vocab::impl::load) treats a missing or empty key alike: warn, use 'default'.
            pre = "default"
            self.warnings.append(MISSING_PRE_WARNING)
        elif pre not in _PRE_REGEX:
            raise QcpuError(f"unsupported pre-tokenizer {pre!r} in this GGUF (supported: {', '.join(sorted(_PRE_REGEX))})")
        types = list(_get(meta, "tokenizer.ggml.token_type", [])) or [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise QcpuError(f"this GGUF has {len(tokens)} tokens but {len(types)} token types")

        self.pre = pre
        self.vocab_size = len(tokens)
        self._tokens: list[str] = list(tokens)
        self._types: list[int] = [int(t) for t in types]

        def _id(key):
            v = meta.get(key)
            if v is None:
                return None
            v = int(v)
            return v if 0 <= v < self.vocab_size else None

        self.bos_id: int | None = _id("tokenizer.ggml.bos_token_id")
        self.eos_id: int | None = _id("tokenizer.ggml.eos_token_id")
        self.pad_id: int | None = _id("tokenizer.ggml.padding_token_id")
        self.add_bos: bool = bool(_get(meta, "tokenizer.ggml.add_bos_token", False))

        self._tok = self._build(merges)
        self._special_lock = threading.Lock()
        self._piece_cache: dict[int, bytes] = {}
        self.eot_ids: frozenset[int] = self._eog_ids(meta)
        if self.warnings:  # only once the vocabulary is known to be usable
            if warn is None:
                from qcpu.errors import warn
            for w in self.warnings:
                warn(w)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], warn: Callable[[str], None] | None = None) -> "Tokenizer":
        """The tokenizer of a GGUF's metadata (key -> value, as ``GGUFFile.metadata``); see the class."""
        return cls(meta, warn)

    # -- construction -------------------------------------------------------------------------------

    def _build(self, merges: Iterable[str]):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        vocab: dict[str, int] = {}
        for i, t in enumerate(self._tokens):
            vocab.setdefault(t, i)  # first id wins on a duplicate text, like llama.cpp's token_to_id
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep or " " in b:
                raise QcpuError(f"malformed BPE merge {m!r} in this GGUF")
            pairs.append((a, b))
        try:
            bpe = models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=False)
        except Exception as e:  # a merge naming a token absent from the vocab
            raise QcpuError(f"this GGUF's BPE vocab/merges are inconsistent: {e}") from None
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in _PRE_REGEX[self.pre]),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Control tokens -> "special" added tokens (skipped when encode_special_tokens is on, i.e.
        # parse_special=False); user-defined -> plain added tokens, always matched, as in llama.cpp.
        special, user = [], []
        for i, (t, ty) in enumerate(zip(self._tokens, self._types)):
            if vocab.get(t) != i or not t:
                continue
            if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN):
                special.append(AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False))
            elif ty == TOKEN_USER_DEFINED:
                user.append(AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False))
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        for i, t in enumerate(self._tokens):  # added tokens must keep their GGUF ids
            if self._types[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED) and vocab.get(t) == i and t:
                if tok.token_to_id(t) != i:
                    raise QcpuError(f"special token {t!r} did not keep id {i}; cannot tokenize this GGUF")
        return tok

    def _eog_ids(self, meta) -> frozenset[int]:
        ids = set()
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            v = meta.get(key)
            if v is not None and 0 <= int(v) < self.vocab_size:
                ids.add(int(v))
        for key, texts in _FIM_EOG:
            v = meta.get(key)
            if v is not None and 0 <= int(v) < self.vocab_size:
                ids.add(int(v))
                continue
            for t in texts:
                i = self.token_to_id(t)
                if i is not None:
                    ids.add(i)
                    break
        for t in _EOG_TEXTS:
            i = self.token_to_id(t)
            if i is not None:
                ids.add(i)
        return frozenset(ids)

    # -- queries ------------------------------------------------------------------------------------

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def token_text(self, id: int) -> str:
        """The token's text as stored in the GGUF (byte-level encoded for normal tokens)."""
        return self._tokens[id]

    def token_type(self, id: int) -> int:
        return self._types[id]

    def is_control(self, id: int) -> bool:
        return self._types[id] in (TOKEN_CONTROL, TOKEN_UNKNOWN)

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes token ``id`` stands for; control tokens give their literal text (e.g.
        b"<|im_end|>"), unused/padding slots give b"" (llama.cpp token_to_piece with special=True)."""
        b = self._piece_cache.get(id)
        if b is None:
            if not 0 <= id < self.vocab_size:
                raise IndexError(f"token id {id} out of range for vocab of {self.vocab_size}")
            ty, text = self._types[id], self._tokens[id]
            if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
                b = text.encode("utf-8")
            elif ty == TOKEN_NORMAL:
                b = _byte_decode(text)
            elif ty == TOKEN_BYTE:  # "<0xAB>"; absent from gpt2 vocabs, kept for completeness
                b = bytes([int(text[3:-1], 16)]) if text.startswith("<0x") else b""
            else:
                b = b""
            self._piece_cache[id] = b
        return b

    # -- encode / decode ----------------------------------------------------------------------------

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids for ``text`` (never adds BOS; check ``add_bos``).  With ``parse_special`` the text
        "<|im_start|>" becomes that control token, otherwise it is tokenized as ordinary characters.
        Lone surrogates, which UTF-8 cannot carry, are tokenized as U+FFFD."""
        if not text:
            return []
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (e.g. surrogateescape'd terminal bytes) -> U+FFFD
            text = _SURROGATE.sub("\ufffd", text)
        with self._special_lock:  # encode_special_tokens is state on the shared Rust tokenizer
            self._tok.encode_special_tokens = not parse_special
            return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for ``ids``; invalid UTF-8 (a character cut off at the end) becomes U+FFFD.
        ``skip_special`` drops control tokens (llama.cpp detokenize with special=False)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        tb = self.token_bytes
        if skip_special:
            return b"".join(tb(i) for i in ids if not self.is_control(i))
        return b"".join(tb(i) for i in ids)

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer(gpt2/{self.pre}, vocab_size={self.vocab_size}, eos={self.eos_id}, eot_ids={sorted(self.eot_ids)})"


class StreamDecoder:
    """Incremental detokenizer for generation: ``feed(id)`` returns the newly completed text, holding back
    the bytes of a UTF-8 character that is split across tokens (common for Chinese and emoji) until it
    is whole; ``flush()`` returns whatever is left (an unfinished character as U+FFFD).  The
    concatenation of all outputs equals ``tokenizer.decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, id: int) -> str:
        if self._skip and self._tok.is_control(id):
            return ""
        return self._dec.decode(self._tok.token_bytes(id))

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
