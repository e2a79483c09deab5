"""Will the model fit? Compare what a session needs with the memory the OS says is available, before
loading, and explain instead of being killed by the OOM killer halfway through a prompt.

What a session needs:
  * the model file, memory-mapped: its pages live in the page cache. They are reclaimable, so an
    overshoot here does not kill us, but every token then re-reads the evicted weights from disk
    (seconds per token). The legacy-quant matrices are repacked at load into anonymous memory instead
    (weights.py; the same bytes, their mapped pages never read): we count the whole file;
  * the KV cache: anonymous memory (layers x ctx x kv_heads x head_dim keys and as many values, in the
    cache types: 2 bytes a value in f16, 34/32 in q8_0, 18/32 in q4_0) that must stay resident;
  * the runtime itself: Python, NumPy/Numba, the tokenizer, activations and dequantization tiles
    (~150 MB measured with the default model; `RUNTIME_HEADROOM` allows 256 MiB).

"Available" is `psutil.virtual_memory().available` (Linux: MemAvailable, which already counts
reclaimable page cache, including any of the model's pages cached by an earlier run).

    check_memory(model_path_bytes=path.stat().st_size, kv_cache_bytes=kv_cache_bytes(cfg, ctx), ctx=ctx)
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from qcpu.errors import QcpuError

RUNTIME_HEADROOM = 256 << 20  # bytes: interpreter, libraries, tokenizer, activations, attention's tile


@dataclass(frozen=True)
class MemoryCheck:
    model_bytes: int
    kv_cache_bytes: int
    headroom_bytes: int
    available_bytes: int | None  # None: the OS would not say; nothing was checked

    @property
    def needed_bytes(self) -> int:
        return self.model_bytes + self.kv_cache_bytes + self.headroom_bytes


def kv_cache_bytes(config, ctx: int, type_k: int = T.F16, type_v: int = T.F16) -> int:
    """Bytes of a KV cache of `ctx` positions for a `ModelConfig` (keys + values, every layer) in the
    cache types (cache.CACHE_TYPES). Raises QcpuError when head_dim is not whole blocks of a type."""
    from qcpu.cache import row_bytes

    per_position = config.n_layers * config.n_kv_heads * (row_bytes(T(type_k), config.head_dim) +
                                                           row_bytes(T(type_v), config.head_dim))
    return ctx * per_position


def available_memory() -> int | None:
    """What the OS can hand out without swapping (bytes), or None if it will not say."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported platform: try /proc directly
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return None


def format_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.0f} KiB"
    return f"{n} B"


def check_memory(model_path_bytes: int, kv_cache_bytes: int, available: int | None = None, *,
                 ctx: int | None = None, headroom: int = RUNTIME_HEADROOM) -> MemoryCheck:
    """Raise QcpuError (one line: what is needed, what is available, what to do) when the mapped model
    plus the KV cache plus the runtime clearly will not fit in `available` bytes (default: what the OS
    reports). `ctx` (the context length the KV cache was sized for) lets the message name a --ctx that
    would fit. Returns the figures when it fits (or when the OS would not say how much is available)."""
    for name, value in (("model_path_bytes", model_path_bytes), ("kv_cache_bytes", kv_cache_bytes),
                        ("headroom", headroom)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, not {value!r}")
    if available is None:
        available = available_memory()
    check = MemoryCheck(model_path_bytes, kv_cache_bytes, headroom, available)
    if available is None or check.needed_bytes <= available:
        return check

    need, have = format_bytes(check.needed_bytes), format_bytes(available)
    kv_text = f"KV cache {format_bytes(kv_cache_bytes)}" + (f" for --ctx {ctx}" if ctx else "")
    parts = f"model {format_bytes(model_path_bytes)} + {kv_text} + ~{format_bytes(headroom)} runtime"

    # The largest context that would fit, if the model itself fits.
    fitting_ctx = None
    if ctx and kv_cache_bytes:
        per_position = kv_cache_bytes / ctx
        room = available - model_path_bytes - headroom
        if room >= per_position * 256:
            fitting_ctx = int(room // per_position) // 256 * 256

    if fitting_ctx:
        advice = (f"use a smaller --ctx (--ctx {fitting_ctx} would fit), a quantized KV cache "
                  f"(-ctk q8_0 -ctv q8_0 halves it) or a smaller quant of the model")
    elif model_path_bytes + headroom > available:
        advice = ("the model alone does not fit: use a smaller quant (e.g. Q4_K_M instead of Q8_0) or a "
                  "smaller model, or close other programs")
    else:
        advice = "use a smaller --ctx or a smaller quant of the model"
    raise QcpuError(f"not enough memory: this model needs about {need} ({parts}) but only {have} is available; "
                    f"{advice}")
