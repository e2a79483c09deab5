"""An independent float64 NumPy Qwen2 forward pass: no cache, no quantized kernels, exact RoPE angles.
Written from the paper's equations, not from qcpu's code, to check qcpu against."""

import numpy as np


def reference_logits(weights: dict, cfg: dict, tokens, positions=None) -> np.ndarray:
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    n = len(tokens)
    d, H, KV = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hd = d // H
    pos = np.arange(n) if positions is None else np.asarray(positions)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + cfg["rms_eps"]) * w

    inv = cfg["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):  # NEOX: rotate (x[i], x[i + hd/2])
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    x = W["token_embd.weight"][np.asarray(tokens)]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        h = norm(x, W[p + "attn_norm.weight"])
        q = (h @ W[p + "attn_q.weight"].T + W[p + "attn_q.bias"]).reshape(n, H, hd)
        k = (h @ W[p + "attn_k.weight"].T + W[p + "attn_k.bias"]).reshape(n, KV, hd)
        v = (h @ W[p + "attn_v.weight"].T + W[p + "attn_v.bias"]).reshape(n, KV, hd)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hqk,khd->qhd", s, v).reshape(n, H * hd)
        x = x + a @ W[p + "attn_output.weight"].T
        h = norm(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    out = W.get("output.weight", W["token_embd.weight"])
    return norm(x, W["output_norm.weight"]) @ out.T
