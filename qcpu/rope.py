"""Rotary position embedding (RoPE, NEOX order as Qwen2 uses): angle tables, YaRN / linear scaling, rotation.

Everything follows llama.cpp's CPU backend step by step in float32 (ggml-cpu/ops.cpp `ggml_rope_cache_init`,
`rope_yarn`, `rope_yarn_ramp`; ggml.c `ggml_rope_yarn_corr_dims`; the YaRN parameters as llama_context's
constructor derives them), so rotated keys match llama.cpp's bit-for-bit closely even at large positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from qcpu import jit_cache  # noqa: F401  (before any cached kernel)
from qcpu.errors import QcpuError

ROPE_SCALING_TYPES = ("none", "linear", "yarn")  # llama.cpp's names (it also knows longrope: not for qwen2)
YARN_BETA_FAST = 32.0  # llama_hparams defaults; llama.cpp reads no yarn_beta_* keys for qwen2
YARN_BETA_SLOW = 1.0

_f32 = np.float32


def _logf(x) -> np.float32:
    """logf(x) for a float32 x (the float64 log rounded once to float32)."""
    return _f32(math.log(float(x)))


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once, as the FMA instruction llama.cpp's CPU build contracts rope_yarn's
    `theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix` into (measured: tests/golden/rope_yarn.json
    matches this, not two roundings). The float64 product of two float32 values is exact; the float64 sum
    then rounds twice, which differs from one rounding only in vanishingly rare ties."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def rope_yarn_corr_dims(n_dims: int, n_ctx_orig: int, freq_base: float, beta_fast: float,
                        beta_slow: float) -> tuple[float, float]:
    """YaRN's correction range (low, high), in the units `rope_yarn_ramp` compares pair indices with.

    ggml_rope_yarn_corr_dims: corr_dim(r) = n_dims * ln(n_ctx_orig / (2 pi r)) / (2 ln freq_base), low =
    max(0, floor(corr_dim(beta_fast))), high = min(n_dims - 1, ceil(corr_dim(beta_slow))), in float32."""
    def corr_dim(n_rot: float) -> np.float32:
        inner = _f32(n_ctx_orig) / (_f32(n_rot) * _f32(2) * _f32(math.pi))
        return _f32(n_dims) * _logf(inner) / (_f32(2) * _logf(_f32(freq_base)))

    start = math.floor(corr_dim(beta_fast))
    end = math.ceil(corr_dim(beta_slow))
    return float(max(0, start)), float(min(n_dims - 1, end))


def rope_yarn_ramp(low: float, high: float, half: int) -> np.ndarray:
    """float32[half]: 1 for pairs below `low` (kept as trained: extrapolated), 0 above `high` (interpolated
    by freq_scale), linear between. rope_yarn_ramp: y = (i - low) / max(0.001, high - low), 1 - clamp(y)."""
    i = np.arange(half, dtype=np.float32)
    y = (i - _f32(low)) / _f32(max(_f32(0.001), _f32(high) - _f32(low)))
    return (_f32(1) - np.minimum(_f32(1), np.maximum(_f32(0), y))).astype(np.float32)


def rope_yarn_mscale(freq_scale: float, ext_factor: float, attn_factor: float) -> np.float32:
    """The factor that multiplies cos and sin (so q.k by its square): rope_yarn's mscale, attn_factor
    times (1 + 0.1 ln(1 / freq_scale)) when ext_factor != 0, in float32."""
    mscale = _f32(attn_factor)
    if ext_factor != 0.0:
        mscale = mscale * (_f32(1) + _f32(0.1) * _logf(_f32(1) / _f32(freq_scale)))
    return _f32(mscale)


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float, freq_scale: float = 1.0,
                 ext_factor: float = 0.0, attn_factor: float = 1.0, corr_dims: tuple[float, float] = (0.0, 0.0),
                 freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables float32[n, head_dim // 2] for integer positions[n] (may be negative: a shift),
    already multiplied by the YaRN magnitude `mscale` (see rope_yarn_mscale).

    ggml_rope_cache_init + rope_yarn: theta_extrap_i = pos * theta_scale^i (a float32 running product of
    theta_scale = theta^(-2/head_dim)) / freq_factors[i]; theta_interp = freq_scale * theta_extrap; with
    ext_factor != 0 the two are mixed by the ramp over `corr_dims` (times ext_factor, one fused multiply-add
    as llama.cpp's build computes it). cos and sin are those of the float32 angle, rounded once (glibc's
    cosf/sinf, which llama.cpp calls, may differ in the last bit). Defaults: plain RoPE.
    """
    half = head_dim // 2
    theta_scale = _f32(theta ** (-2.0 / head_dim))
    angles = np.empty((len(positions), half), dtype=np.float32)
    angles[:, 0] = np.asarray(positions, dtype=np.float32)
    for i in range(1, half):
        angles[:, i] = angles[:, i - 1] * theta_scale
    if freq_factors is not None:
        angles = angles / np.asarray(freq_factors, dtype=np.float32)[:half]
    if freq_scale != 1.0 or ext_factor != 0.0:
        interp = _f32(freq_scale) * angles
        if ext_factor != 0.0:
            ramp_mix = rope_yarn_ramp(corr_dims[0], corr_dims[1], half) * _f32(ext_factor)
            angles = _fma(interp, _f32(1) - ramp_mix, angles * ramp_mix)
        else:
            angles = interp
    a = angles.astype(np.float64)
    cos, sin = np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)
    mscale = rope_yarn_mscale(freq_scale, ext_factor, attn_factor)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    return cos, sin


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x float32[n, heads, head_dim] by the angles of cos, sin float32[n, head_dim // 2] in NEOX
    order: pairs are (i, i + head_dim/2), not adjacent (ggml's rope_f32 with GGML_ROPE_TYPE_NEOX: x0*cos -
    x1*sin, x0*sin + x1*cos). Returns a new float32[n, heads, head_dim]."""
    out = np.empty(x.shape, np.float32)
    _rope(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(cos, dtype=np.float32),
          np.ascontiguousarray(sin, dtype=np.float32), out)
    return out


def rope_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, bq: np.ndarray, bk: np.ndarray, bv: np.ndarray,
             head_dim: int, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's attention inputs from its projections: q, k, v float32[n, rows] plus their biases
    float32[rows], as float32[n, rows // head_dim, head_dim], q and k rotated as apply_rope rotates (cos,
    sin float32[n, head_dim // 2]). The same float32 operations as `(q + bq)` then apply_rope, in one call:
    for a decode step's row the separate NumPy adds and rotations cost more than the arithmetic."""
    n = q.shape[0]
    outs = tuple(np.empty((n, x.shape[1] // head_dim, head_dim), np.float32) for x in (q, k, v))
    _bias_rope(q, bq, cos, sin, outs[0], True)
    _bias_rope(k, bk, cos, sin, outs[1], True)
    _bias_rope(v, bv, cos, sin, outs[2], False)
    return outs


@njit(cache=True)
def _bias_rope(x, bias, cos, sin, out, rotate):
    """out[t, h] = x[t, h * hd:(h + 1) * hd] + bias[...], then rotated as _rope if `rotate` (no fastmath:
    no FMA contraction, so the bits are NumPy's add then _rope's)."""
    n, heads, hd = out.shape
    half = hd // 2
    for t in range(n):
        for h in range(heads):
            o = h * hd
            if not rotate:
                for i in range(hd):
                    out[t, h, i] = x[t, o + i] + bias[o + i]
                continue
            for i in range(half):
                x0, x1 = x[t, o + i] + bias[o + i], x[t, o + i + half] + bias[o + i + half]
                out[t, h, i], out[t, h, i + half] = _turn(x0, x1, cos[t, i], sin[t, i])


@njit(cache=True)
def _rope(x, cos, sin, out):
    half = x.shape[2] // 2
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                out[t, h, i], out[t, h, i + half] = _turn(x[t, h, i], x[t, h, i + half], cos[t, i], sin[t, i])


@njit(cache=True, inline="always")
def _turn(x0, x1, c, s):
    """The NEOX pair (x0, x1) turned by the angle of (c, s): ggml's rope_f32, x0*c - x1*s, x0*s + x1*c."""
    return x0 * c - x1 * s, x0 * s + x1 * c


@dataclass(frozen=True)
class Rope:
    """How positions become rotations for one model: llama.cpp's ggml_rope_ext arguments.

    `cos_sin(positions)` gives the tables that rotate queries and keys at those positions;
    `shift_cos_sin(deltas)` the tables that move already-rotated keys by `deltas` positions (a context
    shift: llama.cpp's build_rope_shift, which calls ggml_rope_ext with the same YaRN arguments, attn_factor
    included: a shifted key is scaled by mscale once more, and so is ours)."""

    head_dim: int  # n_dims: Qwen2 rotates the whole head
    theta: float  # freq_base
    freq_scale: float = 1.0  # 1 / factor (linear or YaRN); 1: no scaling
    ext_factor: float = 0.0  # YaRN's extrapolation mix: 1 for yarn, 0 otherwise
    attn_factor: float = 1.0  # llama_cparams.yarn_attn_factor
    beta_fast: float = YARN_BETA_FAST
    beta_slow: float = YARN_BETA_SLOW
    n_ctx_orig: int = 0  # n_ctx_orig_yarn: the context the model was trained on before scaling
    freq_factors: tuple[float, ...] | None = None  # rope_freqs.weight: angle i is divided by it
    scaling_type: str = "none"

    @classmethod
    def from_config(cls, config) -> Rope:
        """The rope of a ModelConfig, with llama.cpp's derivation of its YaRN parameters (llama_context's
        constructor): freq_scale = 1/factor (1 for type none); ext_factor = 1 for yarn; then attn_factor =
        get_mscale(1/freq_scale) / (1 + 0.1 ln(1/freq_scale)) (it cancels rope_yarn's own mscale, which
        ggml then applies) times the file's rope.scaling.attn_factor; all in float32. Raises QcpuError for
        an unknown scaling type."""
        kind = config.rope_scaling_type
        if kind not in ROPE_SCALING_TYPES:
            raise QcpuError(f"rope scaling type {kind!r} is not supported (known: {', '.join(ROPE_SCALING_TYPES)})")
        factor = config.rope_scaling_factor
        freq_scale = _f32(1) if factor == 0 or kind == "none" else _f32(1) / _f32(factor)
        ext_factor = _f32(1) if kind == "yarn" else _f32(0)
        attn_factor = _f32(1)  # llama_hparams.yarn_attn_factor
        if ext_factor != 0:
            f = _f32(1) / freq_scale
            attn_factor = _f32(1) if f <= 1 else _f32(0.1) * _f32(1) * _logf(f) + _f32(1)  # get_mscale(f, 1)
            attn_factor = attn_factor * (_f32(1) / (_f32(1) + _f32(0.1) * _logf(f)))
        attn_factor = attn_factor * _f32(config.rope_scaling_attn_factor)
        return cls(head_dim=config.head_dim, theta=float(_f32(config.rope_theta)), freq_scale=float(freq_scale),
                   ext_factor=float(ext_factor), attn_factor=float(attn_factor),
                   n_ctx_orig=config.rope_scaling_orig_ctx or config.context_length,
                   freq_factors=config.rope_freqs, scaling_type=kind)

    @property
    def corr_dims(self) -> tuple[float, float]:
        """ggml_rope_yarn_corr_dims for this rope (only used when ext_factor != 0)."""
        return rope_yarn_corr_dims(self.head_dim, self.n_ctx_orig, self.theta, self.beta_fast, self.beta_slow)

    @property
    def mscale(self) -> float:
        """What cos and sin are multiplied by (rope_yarn's mscale, attn_factor included)."""
        return float(rope_yarn_mscale(self.freq_scale, self.ext_factor, self.attn_factor))

    @property
    def scaled(self) -> bool:
        """Whether positions are stretched (linear or YaRN with a factor above 1): a context beyond the
        trained one is then meaningful."""
        return self.scaling_type in ("linear", "yarn") and self.freq_scale < 1.0

    def describe(self) -> str:
        """One line for `qcpu info` and messages, e.g. 'yarn, factor 4, original context 32768'."""
        if not self.scaled and self.ext_factor == 0 and self.freq_scale == 1.0:
            return "none"
        text = f"{self.scaling_type}, factor {1 / self.freq_scale:g}"
        if self.scaling_type == "yarn":
            text += f", original context {self.n_ctx_orig}"
        return text

    def _table(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        corr = self.corr_dims if self.ext_factor != 0 else (0.0, 0.0)
        ff = None if self.freq_factors is None else np.asarray(self.freq_factors, dtype=np.float32)
        return rope_cos_sin(positions, self.head_dim, self.theta, self.freq_scale, self.ext_factor,
                            self.attn_factor, corr, ff)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32[n, head_dim // 2] cos and sin (times mscale) for int positions[n]."""
        return self._table(positions)

    def shift_cos_sin(self, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32[n, head_dim // 2] cos and sin that move stored keys by int deltas[n] positions: the
        angles of a forward rotation by the deltas, without mscale. llama.cpp's build_rope_shift passes
        the YaRN arguments unchanged, so each of its shifts scales the moved keys by mscale once more
        (x1.139 per shift at factor 4, compounding over a long session); a rotation by a delta keeps the
        key's length, so here it stays a pure rotation."""
        cos, sin = self._table(deltas)
        m = np.float32(self.mscale)
        return (cos, sin) if m == 1 else (cos / m, sin / m)
