"""Dense operations of the transformer: RMSNorm and SiLU (RoPE: rope.py; attention: attention.py).

Arithmetic follows llama.cpp's CPU backend where it is cheap to do so (float64 sum in RMSNorm), so that
our logits track the reference closely.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x[n, dim] / rms(x) * weight[dim] (sum of squares in float64, as ggml does)."""
    mean_sq = np.einsum("ij,ij->i", x, x, dtype=np.float64) / x.shape[1]
    scale = (1.0 / np.sqrt(mean_sq + eps)).astype(np.float32)
    return (x * scale[:, None]) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))
