"""Which tensor gets which type: llama-quantize's rules, for the file types we write.

A port of src/llama-quant.cpp (llama.cpp vendored by llama-cpp-python 0.3.36) restricted to dense
models and the k-quant / legacy / float file types:
  * `tensor_allows_quantization`: only 2-D+ tensors whose name ends in "weight" and is not a norm
    (so norms and biases keep their type — F32 in every file `qcpu convert` writes);
  * `llama_tensor_get_type_impl`: output.weight (and a tied token_embd) -> Q6_K, or Q8_0 when its rows
    are not whole blocks; attn_v / ffn_down get more bits in some layers (`use_more_bits`), counting the
    tensors in llama.cpp's order: by layer number, then by name (`weight_name_comparer`);
  * `tensor_type_fallback`: a row that is not a whole number of 256-blocks drops to a 32-block type
    (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), else F16.
As in llama-quantize, the names Q3_K, Q4_K and Q5_K are aliases of the _M mixes, and `pure` puts every
quantizable weight in the file type's base type (still with the row-size fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as T

from qcpu.errors import QcpuError

F = LlamaFileType


@dataclass(frozen=True)
class FileType:
    name: str  # what users type: Q4_K_M
    ftype: LlamaFileType  # general.file_type
    base: T  # the default tensor type (llama_ftype_get_default_type)


_FILE_TYPES = [
    FileType("F32", F.ALL_F32, T.F32), FileType("F16", F.MOSTLY_F16, T.F16),
    FileType("BF16", F.MOSTLY_BF16, T.BF16),
    FileType("Q4_0", F.MOSTLY_Q4_0, T.Q4_0), FileType("Q4_1", F.MOSTLY_Q4_1, T.Q4_1),
    FileType("Q5_0", F.MOSTLY_Q5_0, T.Q5_0), FileType("Q5_1", F.MOSTLY_Q5_1, T.Q5_1),
    FileType("Q8_0", F.MOSTLY_Q8_0, T.Q8_0),
    FileType("Q2_K", F.MOSTLY_Q2_K, T.Q2_K),
    FileType("Q3_K_S", F.MOSTLY_Q3_K_S, T.Q3_K), FileType("Q3_K_M", F.MOSTLY_Q3_K_M, T.Q3_K),
    FileType("Q3_K_L", F.MOSTLY_Q3_K_L, T.Q3_K),
    FileType("Q4_K_S", F.MOSTLY_Q4_K_S, T.Q4_K), FileType("Q4_K_M", F.MOSTLY_Q4_K_M, T.Q4_K),
    FileType("Q5_K_S", F.MOSTLY_Q5_K_S, T.Q5_K), FileType("Q5_K_M", F.MOSTLY_Q5_K_M, T.Q5_K),
    FileType("Q6_K", F.MOSTLY_Q6_K, T.Q6_K),
]
FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in _FILE_TYPES}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # llama-quantize's QUANT_OPTIONS


def file_type(name: str) -> FileType:
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    if key not in FILE_TYPES:
        choices = ", ".join(list(FILE_TYPES) + list(ALIASES))
        raise QcpuError(f"unknown quantization type {name!r} (choose from {choices})")
    return FILE_TYPES[key]


# ----------------------------------------------------------------------------------------------------
# Tensor categories (tensor_get_category)

OUTPUT, TOKEN_EMBD, ATTN_QKV, ATTN_KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT = range(8)
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = range(8, 12)


def category(name: str) -> int:
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for needle, cat in (("attn_qkv.weight", ATTN_QKV), ("attn_kv_b.weight", ATTN_KV_B),
                        ("attn_v.weight", ATTN_V), ("attn_k.weight", ATTN_K), ("attn_q.weight", ATTN_Q),
                        ("attn_output.weight", ATTN_OUTPUT), ("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE),
                        ("ffn_down", FFN_DOWN)):
        if needle in name:
            return cat
    return OTHER


def _is_attn_v(cat: int) -> bool:
    return cat in (ATTN_V, ATTN_QKV, ATTN_KV_B)


# Substrings that keep a 2-D "...weight" tensor unquantized (tensor_allows_quantization).
_NEVER_QUANTIZE = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                   "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                   "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
                   "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
                   "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
                   "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
                   "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
                   ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
                   ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count (GGUF shape order, ne0 first)."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return n


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NEVER_QUANTIZE)


def llama_order(names: Iterable[str]) -> list[str]:
    """llama_model_loader's weights_map order: by layer number (non-layer tensors first), then name."""
    def key(name: str):
        m = re.match(r"blk\.(-?\d+)\.", name)
        return (int(m.group(1)) if m else -1, name.encode())

    return sorted(names, key=key)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def is_quantized(t: T) -> bool:
    return t not in (T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64)


def fallback(cols: int, target: T) -> T:
    """tensor_type_fallback: a type whose blocks tile a row of `cols` values."""
    if cols % block_size(target) == 0:
        return target
    new = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(target, target)
    return new if cols % block_size(new) == 0 else T.F16


@dataclass(frozen=True)
class ModelFacts:
    """The hyper-parameters the rules look at."""
    n_layer: int
    n_head: int
    n_head_kv: int
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (qwen2: 80 layers)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @classmethod
    def from_metadata(cls, meta: dict) -> "ModelFacts":
        arch = meta.get("general.architecture", "")
        n_layer = meta.get(f"{arch}.block_count")
        n_head = meta.get(f"{arch}.attention.head_count")
        if not isinstance(n_layer, int) or not isinstance(n_head, int):
            raise QcpuError(f"metadata {arch}.block_count / {arch}.attention.head_count missing")
        n_head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
        if isinstance(n_head_kv, list):  # per-layer counts: llama.cpp's n_gqa() uses layer 0
            n_head_kv = n_head_kv[0] if n_head_kv else n_head
        return cls(n_layer, n_head, int(n_head_kv), is_70b=(arch == "qwen2" and n_layer == 80))


class _State:
    def __init__(self, names: list[str], facts: ModelFacts):
        self.facts = facts
        self.n_attention_wv = sum(_is_attn_v(category(n)) for n in names)
        self.tied = "output.weight" not in names
        self.n_ffn_down = facts.n_layer
        self.i_attention_wv = self.i_ffn_down = 0


def _mix_type(qs: _State, ft: LlamaFileType, new: T, name: str, cols: int, cat: int) -> T:
    """llama_tensor_get_type_impl for dense models and the file types in FILE_TYPES."""
    f = qs.facts
    if cat == OUTPUT or (qs.tied and cat == TOKEN_EMBD):
        if cols % block_size(new) != 0:
            new = T.Q8_0
        elif new != T.Q8_0:
            new = T.Q6_K
    elif cat == TOKEN_EMBD:
        pass
    elif _is_attn_v(cat):
        i, n = qs.i_attention_wv, qs.n_attention_wv
        if ft == F.MOSTLY_Q2_K:
            new = T.Q4_K if f.n_gqa >= 4 else T.Q3_K
        elif ft == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ft == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i, n):
            new = T.Q6_K
        elif ft == F.MOSTLY_Q4_K_S and i < 4:
            new = T.Q5_K
        if f.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        qs.i_attention_wv += 1
    elif cat == FFN_DOWN:
        i, n = qs.i_ffn_down, qs.n_ffn_down  # dense: the counter is the layer
        if ft == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ft == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < n // 16 else T.Q4_K
        elif ft == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ft == F.MOSTLY_Q4_K_M:
            if use_more_bits(i, n):
                new = T.Q6_K
        elif ft == F.MOSTLY_Q5_K_M and use_more_bits(i, n):
            new = T.Q6_K
        elif ft == F.MOSTLY_Q4_K_S and i < n // 8:
            new = T.Q5_K
        qs.i_ffn_down += 1
    elif cat == ATTN_OUTPUT:
        new = {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K}.get(ft, new)
    elif cat == ATTN_QKV:
        new = {F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q5_K,
               F.MOSTLY_Q5_K_M: T.Q6_K}.get(ft, new)
    return new


def plan(tensors: dict[str, tuple[tuple[int, ...], int]], facts: ModelFacts, ft: FileType,
         pure: bool = False) -> list[tuple[str, T]]:
    """[(name, target type)] in llama-quantize's order, for {name: (GGUF shape, current type)}."""
    names = llama_order(tensors)
    qs = _State(names, facts)
    out = []
    for name in names:
        shape, cur = tensors[name]
        cur = T(cur)
        if not allows_quantization(name, shape):
            out.append((name, cur))
            continue
        new = ft.base
        if is_quantized(new):
            if not pure:
                new = _mix_type(qs, ft.ftype, new, name, shape[0], category(name))
            new = fallback(shape[0], new)
        out.append((name, new))
    return out
