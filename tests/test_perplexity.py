"""qcpu.perplexity against llama-perplexity's rules (llama.cpp tools/perplexity/perplexity.cpp
`perplexity()`), on the tiny model, with a float64 reference of that method built on tests/reference.py
(not on qcpu/perplexity.py): BOS in place of every chunk's first token when the file says
add_bos_token, chunks of ctx tokens with the tail dropped, the second half of each chunk scored, and a
refusal below 2 * ctx tokens."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from qcpu.errors import QcpuError
from qcpu.generate import Engine
from qcpu.perplexity import perplexity
from tests.reference import reference_logits
from tests.tiny_model import write_tiny_qwen2

BOS = 256 + 2  # tests/tiny_model.py: 256 byte tokens, 2 merges, then <|endoftext|> (its BOS)
# No "h" or "t": the tiny vocab's only merges are "Ġ t" and "h e", so without them every byte is its own
# token and the reference can tokenize on its own (token id == byte value).
ALPHABET = list("abcdefgijklmnopqrsuvwxyz     ,.\n")


def _text_of(n_bytes: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    s = "".join(rng.choice(ALPHABET, n_bytes))
    return s[:-1] + "." if s.endswith("\n") else s  # a trailing newline would be dropped (llama.cpp -f)


def llama_perplexity_reference(weights: dict, cfg: dict, tokens: list[int], n_ctx: int, bos: int | None):
    """perplexity.cpp perplexity() in float64: returns (ppl, [nll per chunk], count); `tokens` is the
    whole text's tokenization (with the BOS common_tokenize adds), `bos` the id swapped in or None."""
    assert len(tokens) >= 2 * n_ctx
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    nll, count, per_chunk = 0.0, 0, []
    for i in range(n_chunk):
        start = i * n_ctx
        batch = list(tokens[start:start + n_ctx])
        if bos is not None:
            batch[0] = bos  # tokens[batch_start] = llama_vocab_bos(vocab), restored after the decode
        logits = reference_logits(weights, cfg, batch)
        logits = logits[first:]  # outputs requested only for pos >= first
        tokens_data = tokens[start + first:]  # process_logits(..., tokens + start + first, n_ctx - 1 - first)
        s = 0.0
        for k in range(n_ctx - 1 - first):
            row = logits[k]
            m = row.max()
            s += (m + math.log(np.exp(row - m).sum())) - row[tokens_data[k + 1]]
        per_chunk.append(s)
        nll += s
        count += n_ctx - first - 1
    return math.exp(nll / count), per_chunk, count


@pytest.fixture(scope="module", params=[True, False], ids=["add_bos", "no_bos"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "tiny.gguf"
    built = write_tiny_qwen2(path, seed=11, add_bos_token=request.param)
    return path, built, request.param


@pytest.mark.parametrize("ctx", [16, 15])
def test_matches_llama_perplexity_method(tiny, ctx):
    path, built, add_bos = tiny
    # With BOS the text's tokens are exactly 4 chunks; without it the same text would give only 3,
    # so counting the BOS among the text's tokens (as common_tokenize does) is checked too.
    text = _text_of(4 * ctx - 1, seed=ctx)
    ref_tokens = ([BOS] if add_bos else []) + list(text.encode())
    engine = Engine.load(path, ctx=ctx)
    assert engine.tokenizer.add_bos is add_bos and engine.tokenizer.bos_id == BOS
    assert engine.tokenizer.encode(text, parse_special=False) == list(text.encode())  # the test's premise

    got = perplexity(engine, text, ctx)
    want_ppl, want_chunks, want_count = llama_perplexity_reference(
        built["weights"], built["config"], ref_tokens, ctx, BOS if add_bos else None)
    assert got["tokens"] == len(ref_tokens)
    assert got["chunks"] == len(ref_tokens) // ctx == (4 if add_bos else 3)
    assert got["scored_tokens"] == want_count == got["chunks"] * (ctx - ctx // 2 - 1)
    # qcpu computes in float32 with a float16 KV cache (as llama.cpp does): ~1e-3 relative on logits,
    # measured <= 0.011 nats on these 7-token chunk sums.
    np.testing.assert_allclose(got["chunk_nll"], want_chunks, rtol=0, atol=0.05)
    assert got["perplexity"] == pytest.approx(want_ppl, rel=3e-3)
    if add_bos:
        # Sensitivity: prepending one BOS to the text (qcpu's old way) instead of swapping it into every
        # chunk moves chunks 2.. by nats (measured >= 2.5), far beyond the tolerance above.
        _, old_way, _ = llama_perplexity_reference(built["weights"], built["config"], ref_tokens, ctx, None)
        assert old_way[0] == pytest.approx(want_chunks[0], rel=1e-9)
        assert min(abs(a - b) for a, b in zip(old_way[1:], want_chunks[1:])) > 1.0


def test_needs_two_contexts_of_tokens(tiny):
    path, _, add_bos = tiny
    ctx = 16
    engine = Engine.load(path, ctx=ctx)
    n_bos = int(add_bos)
    enough = _text_of(2 * ctx - n_bos)  # exactly 2 * ctx tokens: accepted (llama.cpp: `< 2*n_ctx` refuses)
    assert perplexity(engine, enough, ctx)["tokens"] == 2 * ctx
    short = _text_of(2 * ctx - n_bos - 1)
    with pytest.raises(QcpuError) as ei:
        perplexity(engine, short, ctx)
    msg = str(ei.value)
    assert "\n" not in msg
    assert f"you need at least {2 * ctx} tokens" in msg and f"only {2 * ctx - 1} tokens" in msg


def test_context_too_small_to_score_is_refused(tiny):
    path, _, _ = tiny
    engine = Engine.load(path, ctx=16)
    with pytest.raises(QcpuError, match="at least 3"):
        perplexity(engine, _text_of(40), 2)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qcpu.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_refuses_short_text_in_one_line(tiny, tmp_path):
    path, _, add_bos = tiny
    f = tmp_path / "short.txt"
    f.write_text(_text_of(20), encoding="utf-8")  # 20 (+1 BOS) tokens < 2 * 16
    proc = _cli("perplexity", path, f, "--ctx", 16)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qcpu: ")
    assert "you need at least 32 tokens to evaluate perplexity with a context of 16" in lines[0]
    assert f"only {20 + int(add_bos)} tokens" in lines[0]


def test_cli_json_equals_reference(tiny, tmp_path):
    path, built, add_bos = tiny
    ctx = 16
    text = _text_of(3 * ctx + 5, seed=3)
    f = tmp_path / "ok.txt"
    f.write_text(text + "\n", encoding="utf-8")  # the one trailing newline is dropped, as with -f
    proc = _cli("perplexity", path, f, "--ctx", ctx, "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ref_tokens = ([BOS] if add_bos else []) + list(text.encode())
    want, _, count = llama_perplexity_reference(built["weights"], built["config"], ref_tokens, ctx,
                                                BOS if add_bos else None)
    assert got["scored_tokens"] == count
    assert got["perplexity"] == pytest.approx(want, rel=3e-3)  # float16 KV cache, as above
