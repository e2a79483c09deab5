"""Export a qwen2 GGUF to a Hugging Face checkpoint directory: the test-support half of tools/export_hf.py
(the tests build HF checkpoints with it; the tool adds the command line and the llama.cpp round trip).

Writes what `transformers` / convert_hf_to_gguf.py expect of a Qwen2ForCausalLM checkpoint:
  config.json, generation_config.json,
  model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json with shard_size),
  tokenizer.json (byte-level BPE with Qwen2's pre-tokenizer regex, NFC normalizer, added tokens; loaded
  back with the `tokenizers` package as a check) and tokenizer_config.json (special tokens, chat template).
Weights are the GGUF's tensors dequantized with qcpu's kernels (exact in f32; rounded to nearest even
in bf16 / f16), streamed tensor by tensor. layers=N keeps only the first N blocks (small test models).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from qcpu.gguf_file import GGUFFile

# Qwen2's pre-tokenizer, as its tokenizer.json spells it.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
DTYPES = {"bf16": ("BF16", T.BF16, 2), "f16": ("F16", T.F16, 2), "f32": ("F32", T.F32, 4)}


def hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    blk, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{_LAYER[rest]}"


def f32(v) -> float:
    """The shortest decimal that reads back as the same float32 (1e-06, not 9.999999974752427e-07)."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-")) if v is not None else None


# ----------------------------------------------------------------------------------------------------
# Tokenizer files


def tokenizer_json(meta: dict) -> dict:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab, added = {}, []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ == 1:  # NORMAL
            vocab[tok] = i
        elif typ in (3, 4):  # CONTROL / USER_DEFINED: added tokens
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": typ == 3})
        # UNUSED (5) padding rows ("[PAD151665]"...) are not tokenizer tokens: the converter re-creates them
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": list(meta["tokenizer.ggml.merges"])},
    }


def tokenizer_config(meta: dict, tj: dict, context: int) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def text(key):
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    cfg = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")}
                                 for a in tj["added_tokens"]},
        "additional_special_tokens": [a["content"] for a in tj["added_tokens"] if a["special"]
                                      and a["content"] not in (text("tokenizer.ggml.eos_token_id"),
                                                               text("tokenizer.ggml.padding_token_id"))],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": text("tokenizer.ggml.eos_token_id"),
        "errors": "replace",
        "model_max_length": context,
        "pad_token": text("tokenizer.ggml.padding_token_id"),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


# ----------------------------------------------------------------------------------------------------
# Weights


def write_safetensors(path: Path, entries: list, read, dtype: str) -> None:
    """entries: [(hf name, gguf name, hf shape)]; read(gguf name) -> float32 array. Streams tensor by tensor."""
    st_dtype, _, itemsize = DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, shape in entries:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, gname, _ in entries:
            x = read(gname)
            if dtype == "f32":
                f.write(x.astype(np.float32).tobytes())
            elif dtype == "f16":
                f.write(x.astype(np.float16).tobytes())
            else:
                from quant.quantizers import quantize

                f.write(quantize(x.reshape(-1, x.shape[-1]), T.BF16).tobytes())


def export(model: Path, out: Path, dtype: str = "bf16", layers: int | None = None, shard_size: int = 0,
           force: bool = False) -> Path:
    from qcpu.kernels import dequantize

    g = GGUFFile(model)
    meta = g.metadata
    if meta.get("general.architecture") != "qwen2":
        sys.exit(f"{model}: not a qwen2 GGUF")
    if out.exists():
        if not force:
            sys.exit(f"{out}: exists (use --force)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    a = "qwen2"
    n_layer = meta[f"{a}.block_count"] if layers is None else min(layers, meta[f"{a}.block_count"])
    hidden, n_head = meta[f"{a}.embedding_length"], meta[f"{a}.attention.head_count"]
    tied = "output.weight" not in g.tensors
    context = meta.get(f"{a}.context_length", 32768)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")

    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "attention_dropout": 0.0, "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": meta[f"{a}.feed_forward_length"],
        "max_position_embeddings": context, "max_window_layers": n_layer,
        "num_attention_heads": n_head, "num_hidden_layers": n_layer,
        "num_key_value_heads": meta.get(f"{a}.attention.head_count_kv", n_head),
        "rms_norm_eps": f32(meta[f"{a}.attention.layer_norm_rms_epsilon"]),
        "rope_scaling": None, "rope_theta": f32(meta.get(f"{a}.rope.freq_base", 10000.0)),
        "sliding_window": context, "tie_word_embeddings": tied,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
        "transformers_version": "4.44.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": g.tensors["token_embd.weight"].shape[1],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": bos, "do_sample": True, "eos_token_id": [eos] + ([pad] if pad not in (None, eos) else []),
           "pad_token_id": pad, "repetition_penalty": 1.1, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
           "transformers_version": "4.44.0"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    tj = tokenizer_json(meta)
    from tokenizers import Tokenizer

    text = json.dumps(tj, ensure_ascii=False, indent=2)
    Tokenizer.from_str(text)  # the tokenizers package must accept it
    (out / "tokenizer.json").write_text(text + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(meta, tj, context), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    # Tensors, in HF's usual order, cut into shards of at most shard_size bytes.
    names = [n for n in g.tensors if not n.startswith("blk.") or int(n.split(".")[1]) < n_layer]
    entries = sorted((hf_name(n), n, tuple(reversed(g.tensors[n].shape))) for n in names)
    itemsize = DTYPES[dtype][2]
    shards, cur, size = [], [], 0
    for e in entries:
        n = math.prod(e[2]) * itemsize
        if cur and shard_size and size + n > shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)

    def read(name: str) -> np.ndarray:
        info = g.tensors[name]
        return dequantize(np.ascontiguousarray(g.raw(name)), info.ggml_type, info.cols)

    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], read, dtype)
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fn, shard, read, dtype)
            for e in shard:
                weight_map[e[0]] = fn
                total += math.prod(e[2]) * itemsize
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out


# -- a tiny random HF checkpoint (1 layer, dim 32), for convert's tests ------------------------------------

def tiny_config(vocab: int, arch: str = "Qwen2ForCausalLM") -> dict:
    """config.json of a 1-layer Qwen2 with dim 32, 4 heads (2 KV), FFN 64, tied embeddings."""
    return {"architectures": [arch], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 64, "rope_theta": 10000.0, "tie_word_embeddings": True}


def tiny_tensors(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float16 weights of `tiny_config(vocab)`, by HF name."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s).astype(np.float16)  # noqa: E731
    p = "model.layers.0."
    return {"model.embed_tokens.weight": w(vocab, 32), "model.norm.weight": w(32),
            p + "input_layernorm.weight": w(32), p + "post_attention_layernorm.weight": w(32),
            p + "self_attn.q_proj.weight": w(32, 32), p + "self_attn.q_proj.bias": w(32),
            p + "self_attn.k_proj.weight": w(16, 32), p + "self_attn.k_proj.bias": w(16),
            p + "self_attn.v_proj.weight": w(16, 32), p + "self_attn.v_proj.bias": w(16),
            p + "self_attn.o_proj.weight": w(32, 32), p + "mlp.gate_proj.weight": w(64, 32),
            p + "mlp.up_proj.weight": w(64, 32), p + "mlp.down_proj.weight": w(32, 64)}


def write_arrays(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """In-memory float32/float16 arrays -> one .safetensors file."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        dt = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[a.dtype]
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
