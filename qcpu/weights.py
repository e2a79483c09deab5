"""The model's named weights: quantized tensors as views of the mapped file, norms and biases as small
float32 arrays. Checks every tensor's presence and shape against the config.

Matrices of a type with a packed variant (kernels.PACKED: the legacy quants) are repacked at load into
groups of 8 interleaved rows, which decode reads about 1.3-1.6x faster (repack.py); they are read with
pread, so the file's mapped pages of them are never resident and memory holds each weight once. QCPU_REPACK=0 keeps every matrix as the file
has it (llama.cpp's --no-repack).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from qcpu import kernels
from qcpu.kernels import repack
from qcpu.config import ModelConfig
from qcpu.errors import QcpuError
from qcpu.gguf_file import GGUFFile


REPACK = os.environ.get("QCPU_REPACK", "1") != "0"


@dataclass(frozen=True)
class QTensor:
    """A 2-D weight W[rows, cols] kept in its GGML block format: raw is uint8[rows, row_bytes], or with
    `packed` its type's packed layout, uint8[rows/8, 8 * row_bytes] (kernels/repack.py)."""

    name: str
    raw: np.ndarray
    ggml_type: int
    cols: int
    packed: bool = False

    @property
    def rows(self) -> int:
        return self.raw.shape[0] * kernels.kernel_for(self.ggml_type, self.packed).group_rows

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        """x[n, cols] -> x @ W.T, float32[n, rows]."""
        return kernels.matmul(self.raw, self.ggml_type, x, self.packed)

    def matmul(self, x: np.ndarray, exact: bool = False) -> np.ndarray:
        """`self @ x`; with `exact`, each row bit for bit its one-token product (kernels.matmul)."""
        return kernels.matmul(self.raw, self.ggml_type, x, self.packed, exact)

    def take_rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantize the rows `ids` (embedding lookup): float32[len(ids), cols]."""
        rows, ids = self.raw, np.asarray(ids, dtype=np.int64)
        if self.packed:  # unpack the groups holding them, then pick each id's row of its group
            kernel = kernels.kernel_for(self.ggml_type, True)
            groups = kernel.unpack(np.ascontiguousarray(rows[ids // kernel.group_rows]))
            rows, ids = groups, np.arange(len(ids)) * kernel.group_rows + ids % kernel.group_rows
        return kernels.dequantize(np.ascontiguousarray(rows[ids]), self.ggml_type, self.cols)


def matmul_many(tensors: tuple[QTensor, ...], x: np.ndarray, exact: bool = False) -> list[np.ndarray]:
    """[x @ W.T for W in tensors], float32[n, W.rows] each, for weights that read the same x[n, cols]
    (Q/K/V, gate/up): in decode each quant type's weights are one pass (kernels.matmul_many). `exact`:
    each row bit for bit its one-token product."""
    return kernels.matmul_many([(t.raw, t.ggml_type, t.packed) for t in tensors], x, exact)


_PACK_CHUNK_BYTES = 8 << 20  # file bytes read per step while repacking


def _repacked(f: GGUFFile, name: str, kernel) -> np.ndarray:
    """A matrix's bytes read from the file (pread, in ~8 MB pieces of whole groups) into its packed layout.
    The mapped pages are never touched, so memory holds the weight once and loading does not fault in the
    file page by page (3.2 s against 1.6 s for 1.8 GB of Q4_0 here)."""
    info = f.tensors[name]
    row_bytes = info.nbytes // info.rows
    out = repack.empty(info.rows, row_bytes)
    g = kernel.group_rows
    step = max(g, _PACK_CHUNK_BYTES // row_bytes // g * g)
    scratch = np.empty(min(info.rows, step) * row_bytes, np.uint8)
    for r0 in range(0, info.rows, step):
        r1 = min(info.rows, r0 + step)
        kernel.pack(f.read_rows(name, r0, r1, scratch), out[r0 // g:r1 // g])
    return out


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # [dim]
    wq: QTensor  # [n_heads * head_dim, dim]
    bq: np.ndarray  # [n_heads * head_dim]
    wk: QTensor  # [kv_dim, dim]
    bk: np.ndarray  # [kv_dim]
    wv: QTensor  # [kv_dim, dim]
    bv: np.ndarray  # [kv_dim]
    wo: QTensor  # [dim, n_heads * head_dim]
    ffn_norm: np.ndarray  # [dim]
    w_gate: QTensor  # [ffn_dim, dim]
    w_up: QTensor  # [ffn_dim, dim]
    w_down: QTensor  # [dim, ffn_dim]


@dataclass(frozen=True)
class ModelWeights:
    token_embd: QTensor  # [vocab, dim]
    layers: list[LayerWeights]
    output_norm: np.ndarray  # [dim]
    output: QTensor  # [vocab, dim]; the embedding itself when the file ties them

    @classmethod
    def from_gguf(cls, f: GGUFFile, cfg: ModelConfig, repack: bool | None = None) -> "ModelWeights":
        """The weights of `f`, checked against `cfg`; repack (default: REPACK) as the module docstring says.
        Raises QcpuError for a missing or misshapen tensor or an unsupported type."""
        repack = REPACK if repack is None else repack

        def shape_of(name: str, *expected: int) -> None:
            info = f.tensors.get(name)
            if info is None:
                raise QcpuError(f"{f.path}: tensor {name} is missing")
            if tuple(info.shape) != expected:
                raise QcpuError(f"{f.path}: tensor {name} has shape {list(info.shape)}, expected {list(expected)}")

        def matrix(name: str, rows: int, cols: int, multiplied: bool = True) -> QTensor:
            shape_of(name, cols, rows)
            info = f.tensors[name]
            kernels.kernel_for(info.ggml_type)  # unsupported types fail here, at load, with one line
            packed = kernels.PACKED.get(info.ggml_type)
            if repack and multiplied and packed is not None and rows % packed.group_rows == 0:
                return QTensor(name, _repacked(f, name, packed), info.ggml_type, cols, packed=True)
            return QTensor(name, f.raw(name), info.ggml_type, cols)

        def vector(name: str, n: int) -> np.ndarray:
            shape_of(name, n)
            info = f.tensors[name]
            kernels.kernel_for(info.ggml_type)
            return kernels.dequantize(f.raw(name).reshape(1, -1), info.ggml_type, n)[0]

        d, q, kv, ff = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_dim, cfg.ffn_dim
        layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            layers.append(LayerWeights(
                attn_norm=vector(p + "attn_norm.weight", d),
                wq=matrix(p + "attn_q.weight", q, d), bq=vector(p + "attn_q.bias", q),
                wk=matrix(p + "attn_k.weight", kv, d), bk=vector(p + "attn_k.bias", kv),
                wv=matrix(p + "attn_v.weight", kv, d), bv=vector(p + "attn_v.bias", kv),
                wo=matrix(p + "attn_output.weight", d, q),
                ffn_norm=vector(p + "ffn_norm.weight", d),
                w_gate=matrix(p + "ffn_gate.weight", ff, d),
                w_up=matrix(p + "ffn_up.weight", ff, d),
                w_down=matrix(p + "ffn_down.weight", d, ff),
            ))
        tied = "output.weight" not in f.tensors
        # an untied embedding is only looked up: repacking it would read all of it for nothing
        token_embd = matrix("token_embd.weight", cfg.vocab_size, d, multiplied=tied)
        output = token_embd if tied else matrix("output.weight", cfg.vocab_size, d)
        return cls(token_embd, layers, vector("output_norm.weight", d), output)
