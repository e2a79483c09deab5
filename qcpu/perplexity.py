"""Perplexity by llama-perplexity's method: the text tokenized whole, cut into chunks of `ctx` tokens,
each chunk run from an empty cache, and only the second half of each chunk scored (so every scored
token has at least ctx/2 tokens of context)."""

from __future__ import annotations

import math

import numpy as np

from qcpu.errors import QcpuError


def perplexity(engine, text: str, ctx: int, progress=None) -> dict:
    if text.endswith("\n"):  # llama-perplexity -f drops one trailing newline
        text = text[:-1]
    tokens = engine.tokenizer.encode(text, parse_special=False)
    if engine.tokenizer.add_bos and engine.tokenizer.bos_id is not None:
        tokens = [engine.tokenizer.bos_id] + tokens
    n_chunks = len(tokens) // ctx
    if n_chunks == 0:
        raise QcpuError(f"text is {len(tokens)} tokens: perplexity needs at least --ctx {ctx} of them")
    if ctx > engine.cache.capacity:
        raise QcpuError(f"--ctx {ctx} is larger than the context {engine.cache.capacity}")
    first = ctx // 2
    nll, count, chunk_nll = 0.0, 0, []
    for c in range(n_chunks):
        chunk = tokens[c * ctx:(c + 1) * ctx]
        engine.reset()
        logits = engine.prefill(chunk, all_logits=True).astype(np.float64)  # [ctx, vocab]
        # Position j predicts token j+1: score j in [first, ctx - 1).
        scored = logits[first:ctx - 1]
        targets = np.asarray(chunk[first + 1:ctx])
        peak = scored.max(axis=1, keepdims=True)
        log_z = peak[:, 0] + np.log(np.exp(scored - peak).sum(axis=1))
        s = float((log_z - scored[np.arange(len(targets)), targets]).sum())
        chunk_nll.append(s)
        nll += s
        count += len(targets)
        if progress is not None:
            progress.print(f"[dim]chunk {c + 1}/{n_chunks}: running perplexity {math.exp(nll / count):.4f}[/dim]")
    engine.reset()
    return {"perplexity": math.exp(nll / count), "scored_tokens": count, "chunks": n_chunks,
            "tokens": len(tokens), "chunk_nll": chunk_nll}
