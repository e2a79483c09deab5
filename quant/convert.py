"""Hugging Face Qwen2 checkpoint -> GGUF (`qcpu convert`), as llama.cpp's convert_hf_to_gguf.py writes it.

Input: a directory with config.json (architectures: Qwen2ForCausalLM — Qwen1.5, Qwen2, Qwen2.5), one or
sharded *.safetensors (bf16 / f16 / f32; sharded via model.safetensors.index.json), tokenizer.json +
tokenizer_config.json (chat template, special tokens) and optionally generation_config.json.

Output: the `qwen2` GGUF of convert_hf_to_gguf.py (vendored llama.cpp: conversion/base.py TextModel,
conversion/qwen.py Qwen2Model): the same metadata keys and values, tensor names, vocabulary, token types,
merges, special ids and chat template (the last three by gguf-py's own SpecialVocab). Tensor types:
  * f32 / f16 / bf16 / q8_0: convert_hf_to_gguf's --outtype rule: every 2-D weight in that type, 1-D
    tensors and norms F32;
  * any other file type (q4_0 ... q6_k, q4_k_m ...): llama-quantize's rules (quant/recipes.py) applied to
    the float32 weights, i.e. byte for byte what `llama-quantize` makes of our f32 / bf16 file.

Everything is checked before a byte is written (config, architecture, every shard present, every tensor
present with its config shape and a float dtype, the tokenizer); tensors are then streamed in slabs of
rows with plain reads, so memory stays at one slab whatever the model size. Each slab is checked for
NaN/Inf as it is read, and each written slab after quantization (llama-quantize's ggml_validate_row_data
checks, qcpu/validate.py); a failure removes the temporary file, so OUT never holds broken numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType, TokenType

from qcpu.errors import QcpuError
from qcpu.validate import check_rows
from quant import recipes
from quant.quantizers import quantizer_for
from quant.requantize import check_output
from quant.writer import StreamingGGUFWriter, check_output_path, tensor_nbytes

ARCHITECTURES = {"Qwen2ForCausalLM": "", "Qwen2Model": "model."}  # HF class -> prefix added to names
SLAB_VALUES = 1 << 24
_DTYPES = {"BF16": (2, T.BF16), "F16": (2, T.F16), "F32": (4, T.F32)}
# convert_hf_to_gguf's --outtype values: every 2-D weight in this type.
CONVERT_TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0}

# tokenizer.ggml.pre for the pre-tokenizers qcpu runs, by convert_hf_to_gguf's fingerprint: sha256 of
# str(token ids) of CHKTXT (conversion/base.py get_vocab_base_pre).
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
          '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
}


# ----------------------------------------------------------------------------------------------------
# safetensors


@dataclass(frozen=True)
class STensor:
    name: str
    file: Path
    dtype: str  # BF16 / F16 / F32
    shape: tuple[int, ...]  # HF (row-major) order
    offset: int  # absolute byte offset of the data in the file

    @property
    def ggml_type(self) -> T:
        return _DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype][0]


def read_safetensors_header(path: Path) -> dict[str, STensor]:
    """Parse and check a .safetensors header: u64 length, JSON {name: {dtype, shape, data_offsets}}."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QcpuError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 1 << 28):
                raise QcpuError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise QcpuError(f"{path}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QcpuError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise QcpuError(f"{path}: not a safetensors file (bad header)")
    data_start = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QcpuError(f"{path}: tensor {name} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise QcpuError(f"{path}: tensor {name} is {dtype}; qcpu convert reads BF16, F16 and F32 checkpoints")
        t = STensor(name, path, dtype, shape, data_start + int(b))
        if int(e) - int(b) != t.nbytes or data_start + int(e) > size or int(b) < 0:
            raise QcpuError(f"{path}: tensor {name} data does not fit its shape or the file (truncated shard?)")
        out[name] = t
    return out


def index_checkpoint(hf_dir: Path) -> dict[str, STensor]:
    """Every tensor of the checkpoint, checking that all shards are present."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise QcpuError(f"{index}: not a valid safetensors index") from None
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not (hf_dir / fn).is_file():
                raise QcpuError(f"{hf_dir}: shard {fn} is missing (listed in {index.name})")
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        weight_map = None
        if not files:
            raise QcpuError(f"{hf_dir}: no *.safetensors files (qcpu convert reads safetensors checkpoints)")
    tensors: dict[str, STensor] = {}
    for fn in files:
        for name, t in read_safetensors_header(hf_dir / fn).items():
            if name in tensors:
                raise QcpuError(f"{hf_dir}: tensor {name} appears in two shards")
            tensors[name] = t
    if weight_map is not None:
        for name, fn in weight_map.items():
            if name not in tensors or tensors[name].file.name != fn:
                raise QcpuError(f"{hf_dir}: tensor {name} is not in {fn} as {index.name} says")
    return tensors


class RowReader:
    """Rows of a safetensors tensor as float32, read with pread (no mmap: resident memory = one slab)."""

    def __init__(self):
        self.fds: dict[Path, int] = {}

    def rows(self, t: STensor, first: int, count: int, cols: int) -> np.ndarray:
        fd = self.fds.get(t.file)
        if fd is None:
            fd = self.fds[t.file] = os.open(t.file, os.O_RDONLY)
        itemsize = _DTYPES[t.dtype][0]
        buf = np.empty(count * cols * itemsize, dtype=np.uint8)
        view, pos, got = memoryview(buf), t.offset + first * cols * itemsize, 0
        while got < buf.nbytes:
            n = os.preadv(fd, [view[got:]], pos + got)
            if n <= 0:
                raise QcpuError(f"{t.file}: file ended while reading {t.name}")
            got += n
        if t.dtype == "F32":
            return buf.view(np.float32).reshape(count, cols)
        if t.dtype == "F16":
            return buf.view(np.float16).astype(np.float32).reshape(count, cols)
        return (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(count, cols)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


# ----------------------------------------------------------------------------------------------------
# config.json


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QcpuError(f"{path.parent}: no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QcpuError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise QcpuError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise QcpuError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class Qwen2Config:
    prefix: str  # added to tensor names (Qwen2Model checkpoints lack "model.")
    n_layer: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    vocab: int
    context: Optional[int]
    rms_eps: Optional[float]
    rope_theta: Optional[float]
    rope_scaling: dict
    head_dim: Optional[int]  # only when config.json says it
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.n_head * (self.head_dim or self.hidden // self.n_head)

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * (self.head_dim or self.hidden // self.n_head)


def read_config(hf_dir: Path) -> tuple[dict, Qwen2Config]:
    if not hf_dir.exists():
        raise QcpuError(f"{hf_dir}: no such directory")
    if not hf_dir.is_dir():
        raise QcpuError(f"{hf_dir}: not a directory (give the Hugging Face model directory)")
    cfg = _load_json(hf_dir / "config.json", "not a Hugging Face model directory")
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        cfg = {**cfg, **cfg["text_config"]}
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise QcpuError(f"{hf_dir}: unknown architecture {arch!r} in config.json "
                        f"(qcpu convert supports {', '.join(ARCHITECTURES)}: Qwen1.5, Qwen2, Qwen2.5)")

    def need(*keys: str, default=None, kind=int):
        for k in keys:
            if k in cfg and cfg[k] is not None:
                v = cfg[k]
                if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                    raise QcpuError(f"{hf_dir}/config.json: {k} = {v!r} is not a positive integer")
                if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                    raise QcpuError(f"{hf_dir}/config.json: {k} = {v!r} is not a number")
                return v
        if default is None and kind is int:
            raise QcpuError(f"{hf_dir}/config.json: {keys[0]} is missing")
        return default

    n_head = need("num_attention_heads", "n_head", "n_heads")
    hidden = need("hidden_size", "n_embd", "dim")
    c = Qwen2Config(
        prefix=ARCHITECTURES[arch],
        n_layer=need("num_hidden_layers", "n_layers", "n_layer", "num_layers"),
        hidden=hidden, ffn=need("intermediate_size", "n_inner", "hidden_dim"),
        n_head=n_head, n_head_kv=need("num_key_value_heads", "n_kv_heads", default=n_head),
        vocab=need("vocab_size"),
        context=need("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                     "model_max_length", default=0) or None,
        rms_eps=need("rms_norm_eps", "norm_eps", default=None, kind=float),
        rope_theta=need("rope_theta", "rotary_emb_base", default=None, kind=float),
        rope_scaling=cfg.get("rope_parameters") or cfg.get("rope_scaling") or {},
        head_dim=cfg.get("head_dim") if isinstance(cfg.get("head_dim"), int) else None,
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )
    if c.head_dim is None and hidden % n_head:
        raise QcpuError(f"{hf_dir}/config.json: hidden_size {hidden} is not a multiple of num_attention_heads {n_head}")
    if c.n_head % c.n_head_kv:
        raise QcpuError(f"{hf_dir}/config.json: num_attention_heads is not a multiple of num_key_value_heads")
    return cfg, c


# ----------------------------------------------------------------------------------------------------
# Tensor names and shapes

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_SKIP = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def gguf_name(hf_name: str, c: Qwen2Config) -> Optional[str]:
    """HF tensor name -> GGUF name; None for tensors convert_hf_to_gguf drops."""
    name = c.prefix + hf_name if c.prefix and not hf_name.startswith("lm_head") else hf_name
    if name.endswith(_SKIP):
        return None
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and int(m.group(1)) < c.n_layer and m.group(2) in _LAYER_MAP:
        return f"blk.{int(m.group(1))}.{_LAYER_MAP[m.group(2)]}"
    raise QcpuError(f"cannot map tensor {hf_name!r} to a qwen2 GGUF tensor (not a Qwen2 checkpoint?)")


def expected_shapes(c: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """GGUF name -> HF (row-major) shape, from config.json."""
    d, q, kv, f = c.hidden, c.q_dim, c.kv_dim, c.ffn
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab, d), "output_norm.weight": (d,)}
    if not c.tied:
        out["output.weight"] = (c.vocab, d)
    for i in range(c.n_layer):
        p = f"blk.{i}."
        out.update({p + "attn_norm.weight": (d,), p + "attn_q.weight": (q, d), p + "attn_q.bias": (q,),
                    p + "attn_k.weight": (kv, d), p + "attn_k.bias": (kv,), p + "attn_v.weight": (kv, d),
                    p + "attn_v.bias": (kv,), p + "attn_output.weight": (d, q), p + "ffn_norm.weight": (d,),
                    p + "ffn_gate.weight": (f, d), p + "ffn_up.weight": (f, d), p + "ffn_down.weight": (d, f)})
    return out


def hf_name(name: str, c: Qwen2Config) -> str:
    """GGUF name -> the HF tensor name it comes from (for messages)."""
    strip = (lambda n: n[len(c.prefix):] if c.prefix and n.startswith(c.prefix) else n)
    for k, v in _GLOBAL_MAP.items():
        if v == name:
            return strip(k)
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    for k, v in _LAYER_MAP.items():
        if m and v == m.group(2):
            return strip(f"model.layers.{m.group(1)}.{k}")
    return name


def map_tensors(tensors: dict[str, STensor], c: Qwen2Config) -> dict[str, STensor]:
    expected = expected_shapes(c)
    mapped: dict[str, STensor] = {}
    for name_hf, t in tensors.items():
        name = gguf_name(name_hf, c)
        if name is None:
            continue
        want = expected.get(name, (c.vocab, c.hidden) if name == "output.weight" else None)
        if t.shape != want:
            raise QcpuError(f"tensor {name_hf} has shape {list(t.shape)}, config.json says {list(want)}")
        mapped[name] = t
    for name in expected:
        if name not in mapped:
            raise QcpuError(f"tensor {hf_name(name, c)} is missing from the checkpoint")
    return mapped


# ----------------------------------------------------------------------------------------------------
# Vocabulary (get_vocab_base + _set_vocab_gpt2)


def _looks_special(token: str) -> bool:
    """conversion/base.py does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def build_vocab(hf_dir: Path, n_vocab: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, tokenizer.ggml.pre) from tokenizer.json, padded to config's vocab_size."""
    path = hf_dir / "tokenizer.json"
    tj = _load_json(path, "qcpu convert needs the fast tokenizer file")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise QcpuError(f"{path}: not a byte-level BPE tokenizer (Qwen2 uses one)")
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package's own message
        raise QcpuError(f"{path}: cannot load: {str(e).splitlines()[0]}") from None
    chkhsh = hashlib.sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        raise QcpuError(f"{path}: BPE pre-tokenizer not recognized (fingerprint {chkhsh[:12]}...); "
                        "qcpu convert knows Qwen's")

    vocab = dict(model["vocab"])
    added = {}
    for a in tj.get("added_tokens") or []:
        vocab[a["content"]] = a["id"]
        added[a["id"]] = a
    if vocab and max(vocab.values()) >= n_vocab:
        raise QcpuError(f"{path}: token id {max(vocab.values())} is beyond config.json vocab_size {n_vocab}")
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        token = reverse[i]
        if i in added:
            if not added[i].get("normalized", True):
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].get("special") or _looks_special(token):
                types.append(int(TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(token)
    return tokens, types, pre


# ----------------------------------------------------------------------------------------------------
# The conversion


def _metadata(w: StreamingGGUFWriter, hf_dir: Path, cfg: dict, c: Qwen2Config, ftype: LlamaFileType,
              total_params: int, tokens, types, pre) -> None:
    import gguf

    g = w.gguf_writer
    g.add_type(gguf.GGUFType.MODEL)
    try:
        meta = gguf.Metadata.load(None, hf_dir, None, total_params)
    except Exception:  # a model card gguf-py cannot parse only costs us the authorship fields
        meta = gguf.Metadata()
    if meta.name is None:
        meta.name = hf_dir.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
    meta.set_gguf_meta_model(g)

    g.add_block_count(c.n_layer)
    if c.context:
        g.add_context_length(c.context)
    g.add_embedding_length(c.hidden)
    g.add_feed_forward_length(c.ffn)
    g.add_head_count(c.n_head)
    g.add_head_count_kv(c.n_head_kv)
    rope = c.rope_scaling if isinstance(c.rope_scaling, dict) else {}
    rope_type, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        g.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        g.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        g.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        g.add_rope_scaling_factor(factor)
        g.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    theta = rope.get("rope_theta", c.rope_theta)
    if theta is not None:
        g.add_rope_freq_base(theta)
    if c.rms_eps is not None:
        g.add_layer_norm_rms_eps(c.rms_eps)
    if c.head_dim is not None:
        g.add_key_length(c.head_dim)
        g.add_value_length(c.head_dim)
    g.add_file_type(ftype)
    g.add_quantization_version(gguf.GGML_QUANT_VERSION)

    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre(pre)
    g.add_token_list(tokens)
    g.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True)
    if not special.merges:
        raise QcpuError(f"{hf_dir}/tokenizer.json: no BPE merges")
    special.add_to_gguf(g, quiet=True)


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, type_name: str = "F16", force: bool = False,
            progress: Optional[Callable[[list], Callable[[str, int], None]]] = None) -> dict:
    """Write OUT from the checkpoint in HF_DIR. Returns a summary dict.

    Raises QcpuError (OUT untouched, no temporary file left) for a bad checkpoint, NaN/Inf in its weights
    (naming the safetensors tensor, row and column) or values too large for the output type."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    ft = recipes.file_type(type_name)
    check_output_path(out_path, force)
    cfg, c = read_config(hf_dir)
    tensors = map_tensors(index_checkpoint(hf_dir), c)
    tokens, types, pre = build_vocab(hf_dir, c.vocab)
    if not (hf_dir / "tokenizer_config.json").is_file():
        raise QcpuError(f"{hf_dir}: no tokenizer_config.json (special tokens and chat template)")

    # Shapes in GGUF order (row length first) and each tensor's type.
    shapes = {n: tuple(reversed(t.shape)) for n, t in tensors.items()}
    if ft.name in CONVERT_TYPES:
        plan = [(n, CONVERT_TYPES[ft.name] if recipes.n_dims(shapes[n]) >= 2 and not n.endswith("_norm.weight")
                 else T.F32) for n in recipes.llama_order(tensors)]
    else:  # llama-quantize on the F32 conversion
        facts = recipes.ModelFacts(c.n_layer, c.n_head, c.n_head_kv, is_70b=c.n_layer == 80)
        plan = recipes.plan({n: (s, T.F32) for n, s in shapes.items()}, facts, ft)
    for _, t in plan:
        quantizer_for(t)
    total = sum(tensor_nbytes(shapes[n], t) for n, t in plan)
    free = shutil.disk_usage(out_path.parent).free
    if total > free:
        raise QcpuError(f"{out_path.parent}: needs {total / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB free")

    tick = progress([(n, tensors[n].nbytes, tensors[n].ggml_type, t) for n, t in plan]) if progress \
        else (lambda name, n: None)
    reader = RowReader()
    out_bytes = 0
    try:
        with StreamingGGUFWriter(out_path, "qwen2", force) as w:
            for n, t in plan:
                w.add_tensor(n, shapes[n], t)
            _metadata(w, hf_dir, cfg, c, ft.ftype, sum(math.prod(s) for s in shapes.values()), tokens, types, pre)
            w.begin()
            for n, t in plan:
                st = tensors[n]
                cols = st.shape[-1]
                rows = st.nbytes // _DTYPES[st.dtype][0] // cols
                slab = max(1, SLAB_VALUES // cols)
                q = quantizer_for(t)
                for r0 in range(0, rows, slab):
                    k = min(slab, rows - r0)
                    x = reader.rows(st, r0, k, cols)
                    check_rows(x, T.F32, f"{st.file}: tensor {st.name}", first_row=r0)
                    with np.errstate(over="ignore"):  # overflow to Inf is caught, in one line, next
                        data = q.quantize_rows(x)
                    check_output(data, t, n, r0)
                    w.write(data)
                    out_bytes += data.nbytes
                    tick(n, k * cols * _DTYPES[st.dtype][0])
                w.end_tensor()
    finally:
        reader.close()
    return {"tensors": len(plan), "output_bytes": out_bytes, "file_type": ft.name,
            "types": {n: t.name for n, t in plan}, "vocab": len(tokens), "pre": pre}
