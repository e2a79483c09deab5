"""Rotary position embedding (RoPE, NEOX order as Qwen2 uses): angle tables and rotation.

Angles follow llama.cpp's CPU backend (ggml_rope_cache_init: float32 running product of `theta_scale`),
so rotated keys match its bit-for-bit closely even at large positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables float32[n, head_dim // 2] for integer positions (may be negative: a shift).

    The angle of pair i is pos * theta^(-2i/head_dim), built as llama.cpp does (float32 running product
    of `theta_scale`), so that rotated keys match its bit-for-bit closely even at large positions.
    """
    half = head_dim // 2
    theta_scale = np.float32(theta ** (-2.0 / head_dim))
    angles = np.empty((len(positions), half), dtype=np.float32)
    angles[:, 0] = np.asarray(positions, dtype=np.float32)
    for i in range(1, half):
        angles[:, i] = angles[:, i - 1] * theta_scale
    a = angles.astype(np.float64)
    return np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x[n, heads, head_dim] in NEOX order: pairs are (i, i + head_dim/2), not adjacent."""
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate((x0 * c - x1 * s, x0 * s + x1 * c), axis=-1)


@dataclass(frozen=True)
class Rope:
    """How positions become rotations for one model: base frequency and (later) scaling.

    `cos_sin(positions)` gives the tables that rotate queries and keys at those positions;
    `shift_cos_sin(deltas)` the tables that move already-rotated keys by `deltas` positions (a context
    shift: llama.cpp's build_rope_shift)."""

    head_dim: int
    theta: float

    @classmethod
    def from_config(cls, config) -> "Rope":
        return cls(head_dim=config.head_dim, theta=config.rope_theta)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32[n, head_dim // 2] cos and sin for int positions[n]."""
        return rope_cos_sin(positions, self.head_dim, self.theta)

    def shift_cos_sin(self, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32[n, head_dim // 2] cos and sin that move stored keys by int deltas[n] positions."""
        return rope_cos_sin(deltas, self.head_dim, self.theta)
