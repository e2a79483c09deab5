"""`ModelConfig`: the shape of a qwen2-architecture model, read from the GGUF's `qwen2.*` metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from qcpu.errors import QcpuError
from qcpu.gguf_file import GGUFFile
from qcpu.rope import ROPE_SCALING_TYPES

ARCHITECTURE = "qwen2"


@dataclass(frozen=True)
class RopeOverrides:
    """Rope settings from the command line, over the file's (llama.cpp's options); None: the file's.

    `scaling_type`: --rope-scaling none|linear|yarn; `scale`: --rope-scale N (positions stretched N times,
    freq_scale = 1/N); `yarn_orig_ctx`: --yarn-orig-ctx N (the context trained on before scaling);
    `freq_base`: --rope-freq-base F."""

    scaling_type: str | None = None
    scale: float | None = None
    yarn_orig_ctx: int | None = None
    freq_base: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.scaling_type, self.scale, self.yarn_orig_ctx, self.freq_base))


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
    # Rope scaling, as llama.cpp reads it (llama_model::load_hparams): the type defaults to "linear", which
    # with no factor scales nothing; factor 0 = none given (rope.scaling.factor, else rope.scale_linear).
    rope_scaling_type: str = "linear"
    rope_scaling_factor: float = 0.0
    rope_scaling_orig_ctx: int = 0  # rope.scaling.original_context_length; 0 = context_length
    rope_scaling_attn_factor: float = 1.0  # rope.scaling.attn_factor
    rope_freqs: tuple[float, ...] | None = None  # the rope_freqs.weight tensor (F32[head_dim / 2]), if any

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def rope_freq_scale(self) -> float:
        """llama.cpp's rope_freq_scale: 1 / factor, 1 when no factor or type none."""
        if self.rope_scaling_type == "none" or not self.rope_scaling_factor:
            return 1.0
        return float(np.float32(1) / np.float32(self.rope_scaling_factor))

    @property
    def rope_scaled(self) -> bool:
        """Linear or YaRN scaling that stretches positions (a factor above 1) is in effect."""
        return self.rope_scaling_type in ("linear", "yarn") and self.rope_freq_scale < 1.0

    @property
    def max_context(self) -> int:
        """The longest context positions may span: the trained context, or with rope scaling in effect the
        original context times the factor (llama.cpp's adjusted n_ctx_train, n_ctx_orig_yarn / freq_scale),
        whichever is larger."""
        if not self.rope_scaled:
            return self.context_length
        orig = self.rope_scaling_orig_ctx or self.context_length
        return max(self.context_length, int(orig / self.rope_freq_scale))

    def with_rope_overrides(self, o: RopeOverrides | None) -> ModelConfig:
        """This config with command-line rope settings applied (llama_context_params over the file's
        hparams). Raises QcpuError (one line) for a value out of range."""
        if not o:
            return self
        changes: dict = {}
        if o.scaling_type is not None:
            if o.scaling_type not in ROPE_SCALING_TYPES:
                raise QcpuError(f"--rope-scaling {o.scaling_type!r}: expected one of {', '.join(ROPE_SCALING_TYPES)}")
            changes["rope_scaling_type"] = o.scaling_type
        if o.scale is not None:
            if not (math.isfinite(o.scale) and o.scale > 0):
                raise QcpuError(f"--rope-scale must be a positive number, got {o.scale}")
            changes["rope_scaling_factor"] = float(np.float32(o.scale))
        if o.yarn_orig_ctx is not None:
            if not 0 < o.yarn_orig_ctx <= 1 << 24:
                raise QcpuError(f"--yarn-orig-ctx must be a positive number of tokens, got {o.yarn_orig_ctx}")
            changes["rope_scaling_orig_ctx"] = int(o.yarn_orig_ctx)
        if o.freq_base is not None:
            if not (math.isfinite(o.freq_base) and o.freq_base > 0):
                raise QcpuError(f"--rope-freq-base must be a positive number, got {o.freq_base}")
            changes["rope_theta"] = float(np.float32(o.freq_base))
        return replace(self, **changes)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
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
            **_rope_scaling(f, p, dim // n_heads if isinstance(dim, int) and isinstance(n_heads, int) and n_heads
                            else 0),
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


def _rope_scaling(f: GGUFFile, p: str, head_dim: int) -> dict:
    """The rope scaling keys llama.cpp reads for qwen2 (llama_model::load_hparams; it reads no yarn_beta_* /
    yarn_ext_factor keys for this architecture), and the rope_freqs.weight tensor. Raises QcpuError (one
    line naming the file) for an unknown type or a value out of range."""
    def number(key: str, default, kind=(int, float)):
        value = f.get(key, default)
        if isinstance(value, bool) or not isinstance(value, kind) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise QcpuError(f"{f.path}: metadata {key} = {value!r} is not a sane number")
        return value

    kind = f.get(f"{p}.rope.scaling.type", "linear")
    if not isinstance(kind, str) or kind not in ROPE_SCALING_TYPES:
        shown = repr(kind) if len(repr(kind)) <= 40 else repr(kind)[:36] + "...'"
        raise QcpuError(f"{f.path}: rope scaling type {shown} is not supported "
                        f"(qcpu applies {', '.join(ROPE_SCALING_TYPES)})")
    factor_key = f"{p}.rope.scaling.factor" if f.get(f"{p}.rope.scaling.factor") is not None \
        else f"{p}.rope.scale_linear"
    factor = float(number(factor_key, 0.0))
    orig = number(f"{p}.rope.scaling.original_context_length", 0, int)
    attn = float(number(f"{p}.rope.scaling.attn_factor", 1.0))
    if factor < 0 or not 0 <= orig <= 1 << 24 or not attn > 0:
        raise QcpuError(f"{f.path}: rope scaling factor {factor} / original context {orig} / attn factor "
                        f"{attn} not sane")
    freqs = None
    info = f.tensors.get("rope_freqs.weight")
    if info is not None:
        from gguf import GGMLQuantizationType

        if info.ggml_type != GGMLQuantizationType.F32 or tuple(info.shape) != (head_dim // 2,):
            raise QcpuError(f"{f.path}: tensor rope_freqs.weight has shape {list(info.shape)}, expected an F32 "
                            f"[{head_dim // 2}]")
        values = f.raw("rope_freqs.weight").view("<f4").reshape(-1)
        if not (np.isfinite(values).all() and (values > 0).all()):
            raise QcpuError(f"{f.path}: tensor rope_freqs.weight holds values that are not positive numbers")
        freqs = tuple(float(v) for v in values)
    return {"rope_scaling_type": kind, "rope_scaling_factor": factor, "rope_scaling_orig_ctx": int(orig),
            "rope_scaling_attn_factor": attn, "rope_freqs": freqs}
