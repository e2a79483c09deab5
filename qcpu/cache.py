"""`KVCache`: the keys and values of the tokens a conversation holds, allocated once, never grown.

Layout: slots [0, n_held) hold the held tokens in stream order, and slot i holds RoPE position i, so
positions are always contiguous (0..n_held-1) and attention visits exactly the held slots. Keys are
stored already rotated, as llama.cpp does. Each of k and v is uint8[n_layers, n_kv_heads, capacity,
row_bytes]: one kv head's rows are contiguous, so attention streams them. A row is one head's
head_dim values in the cache type (`-ctk`/`-ctv`, llama.cpp's names and block formats): f16 (default),
q8_0 or q4_0, quantized on write with the reference quantizer (gguf-py's and llama.cpp's `_ref` bytes).
Quantized rows (but Q8_0 values) hold the head rotated by a Walsh-Hadamard matrix first (`rotation`,
llama.cpp's attention rotation): an orthogonal map spreads the few huge channels of Qwen2's keys over the
whole block, so one block scale no longer crushes the small ones. Attention rotates q the same way (q.k
is unchanged) and rotates its output back for values. Quantized keys are also stored minus a center that
follows RoPE (`KeyCenters`, qcpu's own step beyond llama.cpp): what the keys share no longer sets the
scales.

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
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from numba import njit

from qcpu.errors import QcpuError
from qcpu.kernels.halves import f32_to_f16
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


@functools.cache
def rotation(ggml_type: T, head_dim: int, keys: bool) -> int:
    """The size n of the Hadamard blocks a cache row of this type is rotated by, 0 for none: for quantized
    keys 64 doubled while it divides head_dim, for Q4_0 values 64 (llama_kv_cache's n_rot_k / n_rot_v);
    none for F16, for Q8_0 values, and unless head_dim is a multiple of 64.

    Q8_0 values are not rotated, unlike llama.cpp's: on the default model (ctx 4096, GPL-3 + GPL-2, q8_0 K)
    the mean KL divergence from the f16 cache's next-token distributions is 0.00353 with f16 values,
    0.00363 with Q8_0 values as they are and 0.00379 with them rotated: 8 bits lose less to a value's own
    channels than to everything the rotation mixes in. Q4_0 values gain from it (perplexity 6.48 rotated,
    6.53 not)."""
    if ggml_type == T.F16 or head_dim % 64 or (not keys and ggml_type == T.Q8_0):
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


CENTER_BLOCK = 64  # slots that share one key center: within +-32 positions its slow pairs barely turn


@dataclass(frozen=True)
class KeyCenters:
    """What one layer's quantized keys are stored minus: the keys of block b (slots [b * CENTER_BLOCK,
    (b + 1) * CENTER_BLOCK), which hold those positions) minus c_b = RoPE(mid_b) m, where m is the mean
    key of the first batch the empty cache took, rotated back to position 0 (`KVCache._centered`), zero in
    the pairs that turn by more than pi/3 over half a block (there a center at the block's midpoint would
    miss by more than it removes).

    Why: Qwen2's keys share a large offset (mostly their bias), and RoPE turns it with the position; a
    Q8_0/Q4_0 block would spend its range on it. One fixed center stops matching after a few thousand
    positions in the middle frequencies. Default model, q8_0 cache, perplexity over f16's (ctx 512
    ppl_text / ctx 4096 GPL-3 + GPL-2): one fixed center -0.2% / +1.3%; the attn_k bias turned by RoPE
    +0.8% / +0.4%; this +0.1% / -0.3%. Attention adds q.c_b back to every score of block b (`offsets`:
    one Numba loop per layer and token), so the result is exact whatever m is.

    m: float32[n_kv_heads, head_dim]; cos_t, sin_t: float32[head_dim // 2, n_blocks], the pure rotation
    (no mscale) to each block's midpoint position, pair-major (offsets' loop runs along the blocks)."""

    m: np.ndarray
    cos_t: np.ndarray
    sin_t: np.ndarray

    def vectors(self, lo: int, hi: int) -> np.ndarray:
        """c_b for blocks [lo, hi): float32[hi - lo, n_kv_heads, head_dim]."""
        m = np.broadcast_to(self.m, (hi - lo, *self.m.shape))
        return apply_rope(m, self.cos_t[:, lo:hi].T, self.sin_t[:, lo:hi].T)

    def per_slot(self, lo: int, hi: int) -> np.ndarray:
        """The center of each slot in [lo, hi): float32[hi - lo, n_kv_heads, head_dim]."""
        if hi <= lo:
            return np.zeros((0, *self.m.shape), np.float32)
        b0, b1 = lo // CENTER_BLOCK, (hi - 1) // CENTER_BLOCK + 1
        return np.repeat(self.vectors(b0, b1), CENTER_BLOCK, axis=0)[lo - b0 * CENTER_BLOCK:hi - b0 * CENTER_BLOCK]

    def offsets(self, q: np.ndarray, n_blocks: int) -> np.ndarray:
        """q.c_b for q float32[..., n_heads, head_dim] (head h reads kv head h // (n_heads / n_kv_heads))
        and blocks [0, n_blocks): float32[..., n_heads, n_blocks]. With (x0, x1) a NEOX pair (i, i +
        head_dim/2), q.R(t)m = cos t (q0 m0 + q1 m1) + sin t (q1 m0 - q0 m1)."""
        rows = np.ascontiguousarray(q, dtype=np.float32).reshape(-1, q.shape[-2], q.shape[-1])
        out = _center_offsets(rows, self.m, self.cos_t, self.sin_t, n_blocks)
        return out.reshape(*q.shape[:-1], n_blocks)


@njit(cache=True, fastmath={"contract"})
def _center_offsets(q, m, cos_t, sin_t, n_blocks):
    """KeyCenters.offsets for q float32[n, n_heads, head_dim]: out[r, h, b] = sum_i a_i cos_t[i, b] + sum_i
    b_i sin_t[i, b], each sum in pair order i (a, b: the pair products of q and m), the loop along the
    blocks so it vectorizes. In a 16K-key decode step it took 41 us a layer (median) where NumPy + BLAS
    took 78 (both in one process; ~0.9 ms a token over 24 layers)."""
    n, n_heads, hd = q.shape
    h2 = hd // 2
    group = n_heads // m.shape[0]
    out = np.zeros((n, n_heads, n_blocks), np.float32)
    sin_part = np.empty(n_blocks, np.float32)
    for r in range(n):
        for h in range(n_heads):
            mk = m[h // group]
            row = out[r, h]
            sin_part[:] = 0.0
            for i in range(h2):
                q0, q1, m0, m1 = q[r, h, i], q[r, h, h2 + i], mk[i], mk[h2 + i]
                a = q0 * m0 + q1 * m1
                b = q1 * m0 - q0 * m1
                for j in range(n_blocks):
                    row[j] += a * cos_t[i, j]
                    sin_part[j] += b * sin_t[i, j]
            for j in range(n_blocks):
                row[j] += sin_part[j]
    return out


# Rows up to which F16 keys/values are stored by _store_f16 (a decode step, a server's batch): for a row or
# two, astype + transpose + slice assignment cost ~10x the conversion; a prompt chunk keeps NumPy's
# vectorized astype (the same bits: both round to nearest even).
STORE_F16_ROWS = 16


@njit(cache=True)
def _store_f16(x, dst, s0):
    """dst[h, s0 + t, :] = fp16 bits of x[t, h, :], x float32[n, n_kv_heads, head_dim], dst uint16[n_kv_heads,
    capacity, head_dim] (a layer of an F16 cache)."""
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for d in range(x.shape[2]):
                dst[h, s0 + t, d] = f32_to_f16(x[t, h, d])


class KVPool:
    """The storage of several caches of one shape and types, side by side (a server's slots): k, v
    uint8[n_layers, n_caches, n_kv_heads, capacity, row_bytes] and slot_seq int64[n_caches, capacity]. Cache
    i's arrays are views of index i, each layer of them C-contiguous as a cache's own, so a cache works the
    same in a pool or alone; and one attention call can read the queries of several caches in one pass over
    the threads (`attention.attention_pooled`), as llama-server's slots share one unified KV buffer."""

    def __init__(self, n_caches: int, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int,
                 type_k: T = T.F16, type_v: T = T.F16):
        if n_caches < 1:
            raise ValueError("KVPool: at least one cache")
        self.n_caches, self.capacity = n_caches, capacity
        self.type_k, self.type_v = T(type_k), T(type_v)
        self.k = np.zeros((n_layers, n_caches, n_kv_heads, capacity, row_bytes(self.type_k, head_dim)), dtype=np.uint8)
        self.v = np.zeros((n_layers, n_caches, n_kv_heads, capacity, row_bytes(self.type_v, head_dim)), dtype=np.uint8)
        self.slot_seq = np.full((n_caches, capacity), -1, dtype=np.int64)


class KVCache:
    def __init__(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int, rope: Rope, keep: int = 0,
                 type_k: T = T.F16, type_v: T = T.F16, pool: KVPool | None = None, index: int = 0):
        """k, v uint8[n_layers, n_kv_heads, capacity, row_bytes] (see the module docstring); `capacity` in
        tokens (--ctx); `keep`: tokens at the start never discarded; type_k/type_v: F16, Q8_0 or Q4_0;
        `pool`: keep them in cache `index` of a KVPool of the same shape and types instead of own arrays.
        Raises QcpuError for a capacity below 2 or an unsupported type, ValueError for a pool that does not
        match."""
        if capacity < 2:
            raise QcpuError(f"context size {capacity} is too small")
        for t in (type_k, type_v):
            if t not in CACHE_TYPES.values():
                raise QcpuError(f"unsupported KV cache type {T(t).name}")
        self.pool, self.index = pool, index
        self.capacity = capacity
        self.rope = rope
        self.keep = keep
        self.head_dim = head_dim
        self.type_k, self.type_v = T(type_k), T(type_v)
        self.rot_k, self.rot_v = rotation(self.type_k, head_dim, True), rotation(self.type_v, head_dim, False)
        if pool is None:
            self.k = np.zeros((n_layers, n_kv_heads, capacity, row_bytes(self.type_k, head_dim)), dtype=np.uint8)
            self.v = np.zeros((n_layers, n_kv_heads, capacity, row_bytes(self.type_v, head_dim)), dtype=np.uint8)
            self.slot_seq = np.full(capacity, -1, dtype=np.int64)  # stream index of each slot's token; -1 = empty
        else:
            if ((pool.k.shape[0], pool.k.shape[2], pool.k.shape[3]) != (n_layers, n_kv_heads, capacity)
                    or (pool.type_k, pool.type_v) != (self.type_k, self.type_v) or not 0 <= index < pool.n_caches):
                raise ValueError("KVCache: the pool's shape or types do not match this cache's")
            self.k, self.v, self.slot_seq = pool.k[:, index], pool.v[:, index], pool.slot_seq[index]
        # quantized keys are stored minus RoPE(block midpoint) of this pre-RoPE vector (`KeyCenters`)
        self.k_center = None
        if self.type_k != T.F16:
            self.k_center = np.zeros((n_layers, n_kv_heads, head_dim), dtype=np.float32)
            mids = np.arange(-(-capacity // CENTER_BLOCK)) * CENTER_BLOCK + CENTER_BLOCK // 2
            self.center_cos_t, self.center_sin_t = (np.ascontiguousarray(t.T) for t in rope.shift_cos_sin(mids))
            cos1, sin1 = rope.shift_cos_sin(np.array([1]))
            turning = np.arctan2(sin1[0], cos1[0]) * (CENTER_BLOCK // 2) > np.pi / 3
            self.fast_pairs = np.concatenate([turning, turning])
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
                centers = self.centers(layer)
                if centers is None:  # F16 keys: neither rotated nor centered
                    k = apply_rope(k, cos, sin)
                else:
                    k = rotate(k, self.rot_k) + centers.per_slot(start, end)
                    k = apply_rope(k, cos, sin) - centers.per_slot(keep, end - n)
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
        `rotation`, first). `slots` are contiguous (reserve's): a basic slice stores them, ~2x faster than
        an index array for a decode step's one row."""
        if not len(slots):
            return
        at = slice(int(slots[0]), int(slots[-1]) + 1)
        few = len(slots) <= STORE_F16_ROWS
        if self.type_k == T.F16 and few:
            _store_f16(np.ascontiguousarray(k, dtype=np.float32), self.k[layer].view(np.uint16), at.start)
        else:
            k = rotate(self._centered(layer, slots, k), self.rot_k)
            self.k[layer, :, at] = to_rows(k, self.type_k).transpose(1, 0, 2)
        if self.type_v == T.F16 and few:
            _store_f16(np.ascontiguousarray(v, dtype=np.float32), self.v[layer].view(np.uint16), at.start)
        else:
            self.v[layer, :, at] = to_rows(rotate(v, self.rot_v), self.type_v).transpose(1, 0, 2)

    def _centered(self, layer: int, slots: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Keys k float32[n, n_kv_heads, head_dim] at the contiguous slots `slots` (reserve's) minus their
        block's center (`KeyCenters`); a batch into the empty cache first sets the layer's m (its mean key
        rotated back to position 0 by pure rotations, so YaRN's mscale stays in it as in the keys). F16
        keys are stored as they are, as llama.cpp stores them."""
        if self.k_center is None:
            return k
        if slots[0] == 0:  # nothing else held: keys stored with an older center are all gone
            cos, sin = self.rope.shift_cos_sin(-slots)
            m = apply_rope(k, cos, sin).mean(axis=0)
            m[:, self.fast_pairs] = 0.0
            self.k_center[layer] = m
        return k - self.centers(layer).per_slot(int(slots[0]), int(slots[-1]) + 1)

    def centers(self, layer: int) -> KeyCenters | None:
        """The centers one layer's quantized keys are stored minus, which attention adds back (None: F16
        keys, stored as they are)."""
        if self.k_center is None:
            return None
        return KeyCenters(self.k_center[layer], self.center_cos_t, self.center_sin_t)

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
