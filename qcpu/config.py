"""`ModelConfig`: the shape of a qwen2-architecture model, read from the GGUF's `qwen2.*` metadata."""

from __future__ import annotations

from dataclasses import dataclass

from qcpu.errors import QcpuError
from qcpu.gguf_file import GGUFFile

ARCHITECTURE = "qwen2"


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    dim: int  # hidden size (embedding length)
    ffn_dim: int  # SwiGLU inner size
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention (Qwen2 0.5B: 14 q heads over 2 kv heads)
    vocab_size: int
    context_length: int  # what the model was trained on: positions never exceed it
    rope_theta: float
    rms_eps: float
    name: str = "qwen2"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelConfig":
        arch = f.get("general.architecture")
        if arch != ARCHITECTURE:
            raise QcpuError(
                f"{f.path}: unsupported architecture {arch!r} "
                f"(qcpu runs '{ARCHITECTURE}': Qwen1.5, Qwen2 and Qwen2.5 models)"
            )
        p = ARCHITECTURE
        n_heads = f.require(f"{p}.attention.head_count", int)
        n_kv_heads = f.get(f"{p}.attention.head_count_kv", n_heads)
        dim = f.require(f"{p}.embedding_length", int)
        tokens = f.get("tokenizer.ggml.tokens")
        embd = f.tensors.get("token_embd.weight")
        vocab = embd.shape[1] if embd is not None and len(embd.shape) == 2 else len(tokens or ())
        cfg = cls(
            n_layers=f.require(f"{p}.block_count", int),
            dim=dim,
            ffn_dim=f.require(f"{p}.feed_forward_length", int),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=vocab,
            context_length=f.require(f"{p}.context_length", int),
            rope_theta=float(f.get(f"{p}.rope.freq_base", 10000.0)),
            rms_eps=float(f.get(f"{p}.attention.layer_norm_rms_epsilon", 1e-6)),
            name=str(f.get("general.name", "qwen2")),
        )
        for field, lo, hi in (("n_layers", 1, 1024), ("dim", 1, 1 << 16), ("ffn_dim", 1, 1 << 18),
                              ("n_heads", 1, 1024), ("n_kv_heads", 1, 1024), ("vocab_size", 1, 1 << 22),
                              ("context_length", 1, 1 << 24)):
            value = getattr(cfg, field)
            if not isinstance(value, int) or not lo <= value <= hi:
                raise QcpuError(f"{f.path}: {field} = {value!r} is not sane")
        if dim % n_heads or n_heads % n_kv_heads or cfg.head_dim % 2:
            raise QcpuError(f"{f.path}: {n_heads} heads / {n_kv_heads} kv heads do not divide dim {dim}")
        if not cfg.rope_theta > 0 or not 0 < cfg.rms_eps < 1:
            raise QcpuError(f"{f.path}: rope base {cfg.rope_theta} / rms eps {cfg.rms_eps} not sane")
        return cfg
