"""`KVCache`: the keys and values of the tokens a conversation holds, allocated once, never grown.

Layout: slots [0, n_held) hold the held tokens in stream order, and slot i holds RoPE position i, so
positions are always contiguous (0..n_held-1) and attention visits exactly the held slots. Keys are
stored already rotated, as llama.cpp does.

When a batch does not fit, the oldest tokens after the first `keep` (the system prompt) are discarded
and the survivors move down, their keys re-rotated back by the same number of positions: llama.cpp's
context shift (`llama-cli`'s n_discard, `llama_kv_cache::shift`). As llama.cpp does, half of the
non-kept tokens go at once (or more, if the batch needs it): one pass over the cache buys room for that
many tokens, so the cost is amortized (one re-rotation per ~(capacity - keep) / 2 tokens, never one per
token), and a context as long as the trained one runs at full speed when full. The alternative of
dropping one token per step (StreamingLLM) keeps more history but has to re-rotate the window at every
step to keep positions contiguous.
"""

from __future__ import annotations

import numpy as np

from qcpu.errors import QcpuError
from qcpu.rope import Rope, apply_rope


class KVCache:
    def __init__(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int, rope: Rope, keep: int = 0):
        """float16 k, v[n_layers, capacity, n_kv_heads, head_dim]; `capacity` in tokens (--ctx); `keep`:
        tokens at the start never discarded. Raises QcpuError for a capacity below 2."""
        if capacity < 2:
            raise QcpuError(f"context size {capacity} is too small")
        self.capacity = capacity
        self.rope = rope
        self.keep = keep
        self.k = np.zeros((n_layers, capacity, n_kv_heads, head_dim), dtype=np.float16)
        self.v = np.zeros((n_layers, capacity, n_kv_heads, head_dim), dtype=np.float16)
        self.slot_seq = np.full(capacity, -1, dtype=np.int64)  # stream index of each slot's token; -1 = empty
        self.reset()

    def reset(self) -> None:
        self.slot_seq[:] = -1
        self.n_held = 0  # slots in use: [0, n_held)
        self.n_seen = 0  # tokens ever written: the stream index of the next token
        self.n_evicted = 0

    @property
    def length(self) -> int:
        """Tokens currently held."""
        return self.n_held

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Make room for n new tokens: (slots, RoPE positions, stream indices), all int64[n], discarding
        old tokens if needed. Raises QcpuError when n does not fit beside the kept prefix."""
        keep = min(self.keep, self.capacity - 1, self.n_held)
        if keep + n > self.capacity:
            raise QcpuError(f"a batch of {n} tokens does not fit a context of {self.capacity} keeping {keep}")
        if self.n_held + n > self.capacity:
            held_after_keep = self.n_held - keep
            self._discard(keep, max(self.n_held + n - self.capacity, held_after_keep // 2))
        slots = np.arange(self.n_held, self.n_held + n)
        seqs = np.arange(self.n_seen, self.n_seen + n)
        self.slot_seq[slots] = seqs
        self.n_held += n
        self.n_seen += n
        return slots, slots.copy(), seqs

    def unreserve(self, slots: np.ndarray) -> None:
        """Undo the last `reserve` (its pass was interrupted). Tokens it discarded stay discarded."""
        self.slot_seq[slots] = -1
        self.n_held -= len(slots)
        self.n_seen -= len(slots)

    def _discard(self, keep: int, n: int) -> None:
        """Drop the n tokens after the kept prefix; move the rest down n slots, keys re-rotated by -n."""
        start, end = keep + n, self.n_held
        cos, sin = self.rope.shift_cos_sin(np.array([-n]))
        try:
            for layer in range(self.k.shape[0]):
                k = self.k[layer, start:end].astype(np.float32)
                self.k[layer, keep:end - n] = apply_rope(k, np.broadcast_to(cos, (end - start, cos.shape[1])),
                                                         np.broadcast_to(sin, (end - start, sin.shape[1])))
                self.v[layer, keep:end - n] = self.v[layer, start:end]
        except BaseException:  # interrupted halfway: only the kept prefix is still whole
            self._drop_from(keep)
            raise
        self.slot_seq[keep:end - n] = self.slot_seq[start:end]
        self.slot_seq[end - n:end] = -1
        self.n_held -= n
        self.n_evicted += n

    def _drop_from(self, slot: int) -> None:
        self.n_evicted += int((self.slot_seq[slot:self.n_held] >= 0).sum())
        self.slot_seq[slot:] = -1
        self.n_held = slot

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v float32[n, n_kv_heads, head_dim] (k already rotated) for one layer."""
        self.k[layer, slots] = k
        self.v[layer, slots] = v

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of what attention reads for one layer: k, v float16[n_held, n_kv_heads, head_dim] and
        slot_seq int64[n_held]."""
        n = self.n_held
        return self.k[layer, :n], self.v[layer, :n], self.slot_seq[:n]

    def truncate(self, n_tokens: int) -> None:
        """Forget every token from stream index n_tokens on (e.g. to re-generate a reply).

        After discards this is only sound if none of the forgotten indices was discarded (the tokens
        before n_tokens are then what the cache would hold anyway); the engine checks that."""
        held = self.slot_seq[:self.n_held]
        self.n_held = int((held < n_tokens).sum())  # stream order: the survivors are a prefix
        self.slot_seq[self.n_held:] = -1
        self.n_seen = min(self.n_seen, n_tokens)
