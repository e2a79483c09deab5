"""Perplexity by llama-perplexity's method (llama.cpp tools/perplexity/perplexity.cpp `perplexity()`,
ppl_stride 0): the text tokenized whole, cut into chunks of `ctx` tokens, each chunk run from an empty
cache, and only the second half of each chunk scored (so every scored token has at least ctx/2 tokens
of context)."""

from __future__ import annotations

import math

import numpy as np

from qcpu.errors import QcpuError


SCORE_PIECE = 256  # positions scored per pass (the engine's prefill chunk)


def _nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """sum over rows r of log_sum_exp(logits[r]) - logits[r, targets[r]] (float32 logits [n, vocab]):
    llama.cpp's log_softmax (perplexity.cpp): float max, float exps, the sum and the log in float64."""
    peak = logits.max(axis=1, keepdims=True)
    sum_exp = np.exp(logits - peak).sum(axis=1, dtype=np.float64)
    picked = logits[np.arange(len(targets)), targets].astype(np.float64) - peak[:, 0]
    return float((np.log(sum_exp) - picked).sum())


def perplexity(engine, text: str, ctx: int, progress=None) -> dict:
    """Perplexity of `text` under `engine`'s model, following llama.cpp's `perplexity()` exactly:

    * one trailing "\\n" is dropped (llama.cpp's `-f` reader, common/arg.cpp);
    * tokens = common_tokenize(text, add_special=true, parse_special=false): one BOS first when the
      file says tokenizer.ggml.add_bos_token, special-token text left as plain text;
    * fewer than 2 * ctx tokens is refused;
    * n_chunks = len(tokens) // ctx; chunk c is tokens[c*ctx : (c+1)*ctx] with, when add_bos, its first
      token replaced by BOS (`tokens[batch_start] = llama_vocab_bos(vocab)`), evaluated on a cleared cache
      from position 0;
    * the logits at positions j in [ctx//2, ctx-1) score token j+1 of the chunk (the original tokens):
      nll += log_sum_exp(logits[j]) - logits[j][token] (float max and exps, float64 sum and log, as
      perplexity.cpp's log_softmax); only those positions' logits are computed, SCORE_PIECE at a time.

    `engine` is a qcpu.generate.Engine (tokenizer, reset(), feed(tokens, all_logits=True) -> float32
    [n, vocab], capacity); `ctx` is the chunk length in tokens.  `progress`, if given, has a
    rich-style `print(str)` for a line per chunk.

    Returns {"perplexity": exp(mean nll), "scored_tokens": int, "chunks": int, "tokens": int (the
    whole text's, BOS included), "chunk_nll": [float64 nll sum (nats) per chunk]}.

    Raises QcpuError (one line) when the text has fewer than 2 * ctx tokens, when ctx is below 3 (no
    token would be scored) or exceeds the engine's context, or when the file asks for a BOS token it
    does not define.
    """
    if ctx < 3:  # llama.cpp would print nan: a chunk scores ctx - ctx//2 - 1 tokens, none below 3
        raise QcpuError(f"--ctx {ctx} scores no tokens: perplexity needs a context of at least 3")
    if text.endswith("\n"):  # llama-perplexity -f drops one trailing newline
        text = text[:-1]
    tok = engine.tokenizer
    bos = None
    if tok.add_bos:
        if tok.bos_id is None:
            raise QcpuError("this GGUF sets tokenizer.ggml.add_bos_token but has no valid bos_token_id")
        bos = tok.bos_id
    tokens = ([bos] if bos is not None else []) + tok.encode(text, parse_special=False)
    if len(tokens) < 2 * ctx:
        # llama.cpp: "you need at least %d tokens to evaluate perplexity with a context of %d" /
        # "the data file you provided tokenizes to only %zu tokens"
        raise QcpuError(f"you need at least {2 * ctx} tokens to evaluate perplexity with a context of {ctx}; "
                        f"the text tokenizes to only {len(tokens)} tokens")
    if ctx > engine.capacity:
        raise QcpuError(f"--ctx {ctx} is larger than the context {engine.capacity}")
    n_chunks = len(tokens) // ctx  # the tail that does not fill a chunk is not scored
    first = ctx // 2
    nll, count, chunk_nll = 0.0, 0, []
    for c in range(n_chunks):
        chunk = tokens[c * ctx:(c + 1) * ctx]
        targets = np.asarray(chunk[first + 1:ctx])  # scored tokens: never position 0, so never the BOS swap
        if bos is not None:
            chunk = [bos] + chunk[1:]  # every chunk starts with BOS, in place of its first token
        engine.reset()
        engine.feed(chunk[:first])
        # Position j predicts token j+1: score j in [first, ctx - 1), a piece of positions at a time so
        # the logits held stay [SCORE_PIECE, vocab] whatever ctx is (4096 x 151936 floats are 2.5 GB).
        s = 0.0
        for lo in range(first, ctx - 1, SCORE_PIECE):
            hi = min(lo + SCORE_PIECE, ctx - 1)
            s += _nll_sum(engine.feed(chunk[lo:hi], all_logits=True), targets[lo - first:hi - first])
        chunk_nll.append(s)
        nll += s
        count += len(targets)
        if progress is not None:
            progress.print(f"[dim]chunk {c + 1}/{n_chunks}: running perplexity {math.exp(nll / count):.4f}[/dim]")
    engine.reset()
    return {"perplexity": math.exp(nll / count), "scored_tokens": count, "chunks": n_chunks,
            "tokens": len(tokens), "chunk_nll": chunk_nll}
