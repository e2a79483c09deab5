"""The Qwen2 transformer: config, weights and forward(), readable top to bottom.

    x = embed(tokens)
    for each layer:
        h = rms_norm(x);  q, k, v = h @ Wq + bq, h @ Wk + bk, h @ Wv + bv;  rope(q, k)
        x = x + attention(q, cache(k), cache(v)) @ Wo
        h = rms_norm(x);  x = x + (silu(h @ Wgate) * (h @ Wup)) @ Wdown
    logits = rms_norm(x) @ Woutput

Every `W @ h` goes through the quant-type registry: this file never knows how a weight is stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from qcpu.attention import attention, attention_pooled
from qcpu.cache import KVCache, KVPool
from qcpu.config import ModelConfig
from qcpu.gguf_file import GGUFFile
from qcpu.ops import rms_norm, swiglu
from qcpu.rope import Rope, rope_qkv
from qcpu.weights import ModelWeights, matmul_many


class Qwen2Model:
    def __init__(self, gguf: GGUFFile, repack: bool | None = None):
        """The model in `gguf`; repack: legacy-quant matrices into 8-row groups (None: weights.REPACK)."""
        self.file = gguf
        self.config = ModelConfig.from_gguf(gguf)
        self.weights = ModelWeights.from_gguf(gguf, self.config, repack)
        self.rope = Rope.from_config(self.config)

    @classmethod
    def load(cls, path: str | Path, repack: bool | None = None) -> "Qwen2Model":
        return cls(GGUFFile(path), repack)

    def new_cache(self, capacity: int, keep: int = 0, type_k=None, type_v=None, pool: KVPool | None = None,
                  index: int = 0) -> KVCache:
        """A KV cache of `capacity` tokens; type_k/type_v: GGML types (None: F16); `pool`: kept as cache
        `index` of a KVPool from new_pool (the same capacity and types)."""
        c = self.config
        return KVCache(c.n_layers, capacity, c.n_kv_heads, c.head_dim, self.rope, keep=keep,
                       type_k=type_k or T.F16, type_v=type_v or T.F16, pool=pool, index=index)

    def new_pool(self, n_caches: int, capacity: int, type_k=None, type_v=None) -> KVPool:
        """Storage for n_caches caches of `capacity` tokens side by side (a server's slots): forward_batch
        then reads all of them in one attention call per layer."""
        c = self.config
        return KVPool(n_caches, c.n_layers, capacity, c.n_kv_heads, c.head_dim, type_k or T.F16, type_v or T.F16)

    def forward(self, tokens, cache: KVCache, all_logits: bool = False, exact: bool = False) -> np.ndarray:
        """Run tokens[n] after what the cache holds; logits float32[n or 1, vocab] (last position only
        unless all_logits). `exact`: each row's logits bit for bit what feeding the tokens one at a time
        gives (matvec products, decode attention per row): speculative verification, so that greedy
        output is plain decoding's token for token. Meant for a few tokens: it is slower for a prompt."""
        tokens = np.asarray(tokens, dtype=np.int64)
        slots, positions, seqs = cache.reserve(len(tokens))
        try:
            return self._layers(tokens, positions, [(cache, slice(None), slots, seqs)],
                                slice(None) if all_logits else slice(-1, None), exact)
        except BaseException:  # Ctrl-C mid-pass: the cache must not claim tokens it half-holds
            cache.unreserve(slots)
            raise

    def forward_batch(self, tokens, caches: list[KVCache], all_logits=False, exact: bool = False):
        """Several sequences in one pass: tokens[i] (one token id, or a sequence of them: a prompt chunk,
        or a token with drafted ones to check) after what caches[i] holds (distinct caches). Logits
        float32[len(caches), vocab], of each sequence's last token; with all_logits (True, or one bool
        per sequence), a list: float32[len(tokens[i]), vocab], every row's, or [1, vocab], the last's. Every weight is read once for all the rows (the
        products run on the batch), attention runs per cache: continuous batching, as llama-server's slots
        share a batch, a prompt chunk riding with the other slots' decode steps. `exact`: as forward's."""
        seqs = [np.atleast_1d(np.asarray(t, dtype=np.int64)) for t in tokens]
        if len(seqs) != len(caches) or len({id(c) for c in caches}) != len(caches) or any(s.ndim != 1 or not len(s) for s in seqs):
            raise ValueError("forward_batch: one non-empty token sequence for each of distinct caches")
        segments, positions, at = [], [], 0
        try:
            for seq, cache in zip(seqs, caches):
                slots, pos, stream = cache.reserve(len(seq))
                segments.append((cache, slice(at, at + len(seq)), slots, stream))
                positions.append(pos)
                at += len(seq)
            if not isinstance(all_logits, bool) or all_logits:  # per sequence: every row's, or the last's
                every = [all_logits] * len(seqs) if isinstance(all_logits, bool) else list(all_logits)
                picks = [np.arange(r.start, r.stop) if want else np.array([r.stop - 1])
                         for want, (_, r, _, _) in zip(every, segments)]
                logits = self._layers(np.concatenate(seqs), np.concatenate(positions), segments,
                                      np.concatenate(picks), exact)
                bounds = np.cumsum([0] + [len(p) for p in picks])
                return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            last = np.cumsum([len(s) for s in seqs]) - 1
            return self._layers(np.concatenate(seqs), np.concatenate(positions), segments, last, exact)
        except BaseException:
            for cache, _, slots, _ in segments:
                cache.unreserve(slots)
            raise

    def _layers(self, tokens, positions, segments, logit_rows, exact: bool = False):
        """The pass over rows x[n]; segments: (cache, its rows, their slots, their stream indices), one per
        sequence. Logits float32[k, vocab] of the rows logit_rows selects from x (a slice or indices).
        `exact`: see forward."""
        c, w = self.config, self.weights
        n = len(tokens)
        cos, sin = self.rope.cos_sin(positions)

        x = w.token_embd.take_rows(tokens)  # [n, dim]
        pool = segments[0][0].pool if len(segments) > 1 else None
        if pool is not None and any(cache.pool is not pool for cache, _, _, _ in segments):
            pool = None
        for layer, lw in enumerate(w.layers):
            h = rms_norm(x, lw.attn_norm, c.rms_eps)
            q, k, v = matmul_many((lw.wq, lw.wk, lw.wv), h, exact)
            q, k, v = rope_qkv(q, k, v, lw.bq, lw.bk, lw.bv, c.head_dim, cos, sin)  # + biases, q and k rotated
            for cache, rows, slots, seqs in segments:  # rows in order: segment i holds the rows after i - 1's
                cache.write(layer, slots, k[rows], v[rows])
            if pool is not None:  # the slots of one KVPool: one call reads every segment's cache
                a = attention_pooled(q, pool.k[layer], pool.v[layer], pool.slot_seq,
                                     [(cache.index, rows, cache.n_held, seqs, cache.centers(layer))
                                      for cache, rows, _, seqs in segments], pool.type_k, pool.type_v, exact)
            else:
                outs = [attention(q[rows], *cache.layer(layer), seqs, cache.type_k, cache.type_v,
                                  cache.centers(layer), exact) for cache, rows, _, seqs in segments]
                a = outs[0] if len(outs) == 1 else np.concatenate(outs)
            x = x + lw.wo.matmul(a.reshape(n, c.n_heads * c.head_dim), exact)

            h = rms_norm(x, lw.ffn_norm, c.rms_eps)
            x = x + lw.w_down.matmul(swiglu(*matmul_many((lw.w_gate, lw.w_up), h, exact)), exact)

        x = x[logit_rows]
        return w.output.matmul(rms_norm(x, w.output_norm, c.rms_eps), exact)
