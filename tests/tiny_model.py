"""Write a tiny random qwen2-architecture GGUF (real layout, toy sizes) for fast tests.

The vocabulary is GPT-2's 256 byte symbols, two merges and Qwen's three special tokens, so the whole
pipeline (tokenizer, template, model, sampler, CLI) runs on it in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from qcpu.tokenizer import _bytes_to_unicode


def _byte_symbols() -> list[str]:
    # GPT-2's printable stand-ins for the 256 bytes (the same table byte-level BPE vocabularies use).
    table = _bytes_to_unicode()
    return [table[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e"]


def tiny_config(**overrides) -> dict:
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=256,
               rope_theta=10000.0, rms_eps=1e-6, tied=False)
    cfg.update(overrides)
    return cfg


def write_tiny_qwen2(path: str | Path, seed: int = 0, weight_type: T = T.F32, arch: str = "qwen2",
                     add_bos_token: bool = False, **overrides) -> dict:
    """Write the model; returns its config plus the float32 weights actually stored (after quantization).
    ``add_bos_token`` is written as tokenizer.ggml.add_bos_token (True as in DeepSeek-R1-Distill-Qwen)."""
    cfg = tiny_config(**overrides)
    rng = np.random.default_rng(seed)
    tokens = _byte_symbols() + ["Ġt", "he"] + SPECIALS
    vocab = len(tokens)
    cfg["vocab_size"] = vocab
    d, f, hd = cfg["dim"], cfg["ffn_dim"], cfg["dim"] // cfg["n_heads"]
    q_dim, kv_dim = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-qwen2-test")
    w.add_uint32(f"{arch}.block_count", cfg["n_layers"])
    w.add_uint32(f"{arch}.context_length", cfg["context_length"])
    w.add_uint32(f"{arch}.embedding_length", d)
    w.add_uint32(f"{arch}.feed_forward_length", f)
    w.add_uint32(f"{arch}.attention.head_count", cfg["n_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg["n_kv_heads"])
    w.add_float32(f"{arch}.rope.freq_base", cfg["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(add_bos_token)

    stored: dict[str, np.ndarray] = {}

    def add(name: str, array: np.ndarray, qtype: T = T.F32) -> None:
        array = array.astype(np.float32)
        if qtype == T.F32 or array.ndim == 1:
            w.add_tensor(name, array)
            stored[name] = array
        else:
            data = gguf.quants.quantize(array, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(data, qtype).reshape(array.shape)

    def mat(rows: int, cols: int, scale: float = 0.15) -> np.ndarray:
        return rng.standard_normal((rows, cols)) * scale

    add("token_embd.weight", mat(vocab, d, 1.0), weight_type)
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1 + 0.1 * rng.standard_normal(d))
        add(p + "attn_q.weight", mat(q_dim, d), weight_type)
        add(p + "attn_q.bias", 0.1 * rng.standard_normal(q_dim))
        add(p + "attn_k.weight", mat(kv_dim, d), weight_type)
        add(p + "attn_k.bias", 0.1 * rng.standard_normal(kv_dim))
        add(p + "attn_v.weight", mat(kv_dim, d), weight_type)
        add(p + "attn_v.bias", 0.1 * rng.standard_normal(kv_dim))
        add(p + "attn_output.weight", mat(d, q_dim), weight_type)
        add(p + "ffn_norm.weight", 1 + 0.1 * rng.standard_normal(d))
        add(p + "ffn_gate.weight", mat(f, d), weight_type)
        add(p + "ffn_up.weight", mat(f, d), weight_type)
        add(p + "ffn_down.weight", mat(d, f), weight_type)
    add("output_norm.weight", 1 + 0.1 * rng.standard_normal(d))
    if not cfg["tied"]:
        add("output.weight", mat(vocab, d, 0.5), weight_type)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"config": cfg, "weights": stored, "tokens": tokens}
