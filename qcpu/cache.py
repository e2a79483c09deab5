"""`RingKVCache`: a fixed-size key/value cache, allocated once per context, that never grows.

Slots are filled in order; once full, each new token overwrites the oldest slot outside the first `keep`
tokens (the system prompt), so a conversation can run forever in constant memory.

Keys are stored already rotated (RoPE) at their position, as llama.cpp does. Attention only sees
relative positions, so when the next position would pass `max_position` (the trained context, or twice
the capacity if smaller), the live non-kept keys are re-rotated back to be contiguous after the kept
ones, exactly llama.cpp's context shift (`llama_kv_cache::shift`), but rarely: once every
`max_position - capacity` tokens, instead of re-rotating every key at every step (the alternative,
storing un-rotated keys, costs a rotation of the whole cache per token). Positions therefore never
exceed what the model was trained on, however long the session runs.
"""

from __future__ import annotations

import numpy as np

from qcpu.errors import QcpuError
from qcpu.rope import Rope, apply_rope


class RingKVCache:
    def __init__(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int,
                 rope: Rope, max_position: int, keep: int = 0):
        if capacity < 2:
            raise QcpuError(f"context size {capacity} is too small")
        self.capacity = capacity
        self.rope = rope
        self.max_position = min(max_position, 2 * capacity)
        self.keep = keep
        self.k = np.zeros((n_layers, capacity, n_kv_heads, head_dim), dtype=np.float16)
        self.v = np.zeros((n_layers, capacity, n_kv_heads, head_dim), dtype=np.float16)
        self.slot_seq = np.full(capacity, -1, dtype=np.int64)  # token index in the stream; -1 = empty
        self.slot_pos = np.zeros(capacity, dtype=np.int64)  # RoPE position the key was rotated at
        self.reset()

    def reset(self) -> None:
        self.slot_seq[:] = -1
        self.n_seen = 0  # tokens ever written: the stream index of the next token
        self.next_position = 0
        self.n_evicted = 0

    @property
    def length(self) -> int:
        """Tokens currently held."""
        return int((self.slot_seq >= 0).sum())

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Make room for n new tokens: (slots, RoPE positions, stream indices), evicting if needed."""
        keep = min(self.keep, self.capacity - 1)
        if n > self.capacity - keep:
            raise QcpuError(f"a batch of {n} tokens does not fit a context of {self.capacity} keeping {keep}")
        free = np.flatnonzero(self.slot_seq < 0)
        slots = free[:n]
        if len(slots) < n:
            # Evict the oldest tokens outside the kept prefix.
            seq = np.where(self.slot_seq >= keep, self.slot_seq, np.iinfo(np.int64).max)
            oldest = np.argsort(seq, kind="stable")[: n - len(slots)]
            self.slot_seq[oldest] = -1
            self.n_evicted += len(oldest)
            slots = np.concatenate((slots, oldest))
        if self.next_position + n > self.max_position:
            self._shift(keep)
        positions = np.arange(self.next_position, self.next_position + n)
        seqs = np.arange(self.n_seen, self.n_seen + n)
        self.slot_seq[slots] = seqs
        self.slot_pos[slots] = positions
        self.next_position += n
        self.n_seen += n
        return slots, positions, seqs

    def unreserve(self, slots: np.ndarray) -> None:
        """Undo the last `reserve` (its pass was interrupted). Tokens it evicted stay evicted."""
        self.slot_seq[slots] = -1
        self.n_seen -= len(slots)
        self.next_position -= len(slots)

    def _shift(self, keep: int) -> None:
        """Re-rotate the live non-kept keys so their positions run contiguously from `keep`."""
        live = np.flatnonzero(self.slot_seq >= keep)
        live = live[np.argsort(self.slot_seq[live])]
        new_pos = keep + np.arange(len(live))
        delta = new_pos - self.slot_pos[live]
        moved = delta != 0
        if moved.any():
            slots = live[moved]
            cos, sin = self.rope.shift_cos_sin(delta[moved])
            for layer in range(self.k.shape[0]):
                k = self.k[layer, slots].astype(np.float32)
                self.k[layer, slots] = apply_rope(k, cos, sin).astype(np.float16)
        self.slot_pos[live] = new_pos
        self.next_position = keep + len(live)

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v[n, n_kv_heads, head_dim] (already rotated) for one layer."""
        self.k[layer, slots] = k
        self.v[layer, slots] = v

    def truncate(self, n_tokens: int) -> None:
        """Forget every token from stream index n_tokens on (e.g. to re-generate a reply).

        After evictions this is only sound if none of the forgotten indices was evicted (the tokens
        before n_tokens are then what the ring would hold anyway); the engine checks that."""
        drop = self.slot_seq >= n_tokens
        self.slot_seq[drop] = -1
        self.n_seen = min(self.n_seen, n_tokens)
        live = self.slot_seq >= 0
        # Positions continue after the newest survivor (after a shift they are no longer stream indices).
        self.next_position = int(self.slot_pos[live].max()) + 1 if live.any() else 0
