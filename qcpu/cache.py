"""`KVCache`: the keys and values of the tokens a conversation holds, allocated once, never grown.

Layout: slots [0, n_held) hold the held tokens in stream order, and slot i holds RoPE position i, so
positions are always contiguous (0..n_held-1) and attention visits exactly the held slots. Keys are
stored already rotated, as llama.cpp does. Each of k and v is uint8[n_layers, n_kv_heads, capacity,
row_bytes]: one kv head's rows are contiguous, so attention streams them. A row is one head's
head_dim values in the cache type (`-ctk`/`-ctv`, llama.cpp's names and block formats): f16 (default),
q8_0 or q4_0, quantized on write with the reference quantizer (gguf-py's and llama.cpp's `_ref` bytes).
Quantized rows hold the head rotated by a Walsh-Hadamard matrix first (`rotation`, llama.cpp's attention
rotation): an orthogonal map spreads the few huge channels of Qwen2's keys over the whole block, so one
block scale no longer crushes the small ones. Attention rotates q the same way (q.k is unchanged) and
rotates its output back for values. Quantized keys are also stored minus one center per layer and kv
head (`_centered`, qcpu's own step beyond llama.cpp): what the keys share no longer sets the scales.

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

import functools

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from qcpu.errors import QcpuError
from qcpu.rope import Rope, apply_rope

CACHE_TYPES = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}  # -ctk / -ctv values (llama.cpp's names)


def cache_type(name: str) -> T:
    """The GGML type of a -ctk/-ctv name. Raises QcpuError (one line) for another name."""
    try:
        return CACHE_TYPES[name.lower()]
    except (KeyError, AttributeError):
        raise QcpuError(f"unsupported KV cache type {name!r} (supported: {', '.join(CACHE_TYPES)})") from None


def row_bytes(ggml_type: T, head_dim: int) -> int:
    """Bytes of one head's row of head_dim values. Raises QcpuError when head_dim is not whole blocks."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    if head_dim % block:
        raise QcpuError(f"a {ggml_type.name} KV cache needs head_dim to be a multiple of {block}, not {head_dim}")
    return head_dim // block * size


@functools.cache
def hadamard(n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix float32[n, n], n a power of two: Sylvester's order
    (H_2s = [[H_s, H_s], [H_s, -H_s]]), entries +-1/sqrt(n), symmetric, H @ H = I; llama.cpp's
    ggml_gen_hadamard (llama-kv-cache.cpp). Read-only."""
    h = np.array([[np.float32(1.0) / np.sqrt(np.float32(n))]], dtype=np.float32)  # 1.0 / sqrtf(n)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def rotation(ggml_type: T, head_dim: int, keys: bool) -> int:
    """The size n of the Hadamard blocks a cache row of this type is rotated by, 0 for none: none for F16;
    for quantized keys 64 doubled while it divides head_dim, for quantized values 64; none unless head_dim
    is a multiple of 64 (llama_kv_cache's n_rot_k / n_rot_v)."""
    if ggml_type == T.F16 or head_dim % 64:
        return 0
    n = 64
    while keys and head_dim % (2 * n) == 0:
        n *= 2
    return n


def rotate(x: np.ndarray, n: int) -> np.ndarray:
    """x float32[..., head_dim] with each run of n values multiplied by hadamard(n) (its own inverse); x
    itself for n == 0."""
    if not n:
        return x
    shape = x.shape
    return (np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n) @ hadamard(n)).reshape(shape)


def to_rows(x: np.ndarray, ggml_type: T) -> np.ndarray:
    """float32[..., head_dim] -> uint8[..., row_bytes] in the cache type."""
    if ggml_type == T.F16:
        return x.astype(np.float16).view(np.uint8)
    from quant.quantizers import quantize

    flat = quantize(x.reshape(-1, x.shape[-1]), ggml_type)
    return flat.reshape(*x.shape[:-1], flat.shape[-1])


def from_rows(rows: np.ndarray, ggml_type: T, head_dim: int) -> np.ndarray:
    """uint8[..., row_bytes] in the cache type -> float32[..., head_dim]."""
    if ggml_type == T.F16:
        return rows.view(np.float16).astype(np.float32)
    from qcpu.kernels import dequantize

    flat = dequantize(np.ascontiguousarray(rows.reshape(-1, rows.shape[-1])), ggml_type, head_dim)
    return flat.reshape(*rows.shape[:-1], head_dim)


class KVCache:
    def __init__(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int, rope: Rope, keep: int = 0,
                 type_k: T = T.F16, type_v: T = T.F16):
        """k, v uint8[n_layers, n_kv_heads, capacity, row_bytes] (see the module docstring); `capacity` in
        tokens (--ctx); `keep`: tokens at the start never discarded; type_k/type_v: F16, Q8_0 or Q4_0.
        Raises QcpuError for a capacity below 2 or an unsupported type."""
        if capacity < 2:
            raise QcpuError(f"context size {capacity} is too small")
        for t in (type_k, type_v):
            if t not in CACHE_TYPES.values():
                raise QcpuError(f"unsupported KV cache type {T(t).name}")
        self.capacity = capacity
        self.rope = rope
        self.keep = keep
        self.head_dim = head_dim
        self.type_k, self.type_v = T(type_k), T(type_v)
        self.rot_k, self.rot_v = rotation(self.type_k, head_dim, True), rotation(self.type_v, head_dim, False)
        self.k = np.zeros((n_layers, n_kv_heads, capacity, row_bytes(self.type_k, head_dim)), dtype=np.uint8)
        self.v = np.zeros((n_layers, n_kv_heads, capacity, row_bytes(self.type_v, head_dim)), dtype=np.uint8)
        self.slot_seq = np.full(capacity, -1, dtype=np.int64)  # stream index of each slot's token; -1 = empty
        # quantized keys are stored minus this vector (one per layer and kv head; see `_centered`)
        self.k_center = np.zeros((n_layers, n_kv_heads, head_dim), dtype=np.float32)
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
        moved = end - start
        cos, sin = np.broadcast_to(cos, (moved, cos.shape[1])), np.broadcast_to(sin, (moved, sin.shape[1]))
        try:
            for layer in range(self.k.shape[0]):
                # [n_kv, moved, hd] -> rotate as [moved, n_kv, hd]; quantized keys go through float32 and
                # back (out of their Hadamard rotation and centering and into them), as llama.cpp's shift
                # does for them
                k = from_rows(self.k[layer, :, start:end], self.type_k, self.head_dim).transpose(1, 0, 2)
                center = self.k_center[layer] if self.type_k != T.F16 else 0
                k = apply_rope(rotate(k, self.rot_k) + center, cos, sin) - center
                k = rotate(k, self.rot_k)
                self.k[layer, :, keep:end - n] = to_rows(k.transpose(1, 0, 2), self.type_k)
                self.v[layer, :, keep:end - n] = self.v[layer, :, start:end]
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
        """Store k, v float32[n, n_kv_heads, head_dim] (k already RoPE-rotated) for one layer, converted to
        the cache types (quantized keys centered, `_centered`, and quantized rows Hadamard-rotated,
        `rotation`, first)."""
        self.k[layer, :, slots] = to_rows(rotate(self._centered(layer, slots, k), self.rot_k), self.type_k)
        self.v[layer, :, slots] = to_rows(rotate(v, self.rot_v), self.type_v)

    def _centered(self, layer: int, slots: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Quantized keys minus the layer's center: the mean key of the first batch the empty cache took.

        Exact for attention: q.(k - c) = q.k - q.c shifts every score of a query by the same amount, which
        softmax ignores. It matters to the blocks: Qwen2's keys share a large offset (their bias, in
        slowly turning RoPE pairs) that a Q8_0/Q4_0 block would otherwise spend its range on. F16 keys
        are stored as they are, as llama.cpp stores them."""
        if self.type_k == T.F16:
            return k
        if slots[0] == 0:  # nothing else held: keys stored with an older center are all gone
            self.k_center[layer] = k.mean(axis=0)
        return k - self.k_center[layer]

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What attention reads for one layer: k, v uint8[n_kv_heads, capacity, row_bytes] (the whole
        layer, C-contiguous; only slots [0, n_held) are read) and slot_seq int64[n_held]."""
        return self.k[layer], self.v[layer], self.slot_seq[:self.n_held]

    def truncate(self, n_tokens: int) -> None:
        """Forget every token from stream index n_tokens on (e.g. to re-generate a reply).

        After discards this is only sound if none of the forgotten indices was discarded (the tokens
        before n_tokens are then what the cache would hold anyway); the engine checks that."""
        held = self.slot_seq[:self.n_held]
        self.n_held = int((held < n_tokens).sum())  # stream order: the survivors are a prefix
        self.slot_seq[self.n_held:] = -1
        self.n_seen = min(self.n_seen, n_tokens)
