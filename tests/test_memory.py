"""qcpu.memory.check_memory: refuse, in one clear line, a model + KV cache that will not fit."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from qcpu import memory
from qcpu.config import ModelConfig
from qcpu.errors import QcpuError
from qcpu.memory import RUNTIME_HEADROOM, check_memory, format_bytes, kv_cache_bytes

MiB, GiB = 1 << 20, 1 << 30

# The default model: Qwen2.5-Coder-0.5B Q4_K_M (24 layers, 2 kv heads x 64).
QWEN05 = ModelConfig(n_layers=24, dim=896, ffn_dim=4864, n_heads=14, n_kv_heads=2, vocab_size=151936,
                     context_length=32768, rope_theta=1e6, rms_eps=1e-6)
MODEL_BYTES = 491_400_064


def test_kv_cache_bytes_matches_the_cache():
    from qcpu.cache import KVCache

    from qcpu.rope import Rope

    cache = KVCache(QWEN05.n_layers, 1024, QWEN05.n_kv_heads, QWEN05.head_dim, Rope.from_config(QWEN05))
    assert kv_cache_bytes(QWEN05, 1024) == cache.k.nbytes + cache.v.nbytes == 12 * MiB
    assert kv_cache_bytes(QWEN05, 32768) == 384 * MiB


@pytest.mark.parametrize("type_k,type_v,per_value", [("q8_0", "q8_0", 34 / 32), ("q4_0", "q4_0", 18 / 32),
                                                     ("q8_0", "f16", (34 / 32 + 2) / 2)])
def test_kv_cache_bytes_of_quantized_caches_match_the_cache(type_k, type_v, per_value):
    from qcpu.cache import KVCache, cache_type
    from qcpu.rope import Rope

    tk, tv = cache_type(type_k), cache_type(type_v)
    cache = KVCache(QWEN05.n_layers, 1024, QWEN05.n_kv_heads, QWEN05.head_dim, Rope.from_config(QWEN05),
                    type_k=tk, type_v=tv)
    assert kv_cache_bytes(QWEN05, 1024, tk, tv) == cache.nbytes == int(12 * MiB * per_value / 2)


def test_fits():
    kv = kv_cache_bytes(QWEN05, 4096)
    check = check_memory(MODEL_BYTES, kv, available=2 * GiB)
    assert check.needed_bytes == MODEL_BYTES + kv + RUNTIME_HEADROOM
    assert check.available_bytes == 2 * GiB
    exactly = MODEL_BYTES + kv + RUNTIME_HEADROOM
    check_memory(MODEL_BYTES, kv, available=exactly)  # the boundary fits


def test_model_too_big_suggests_a_smaller_quant():
    with pytest.raises(QcpuError) as ei:
        check_memory(8 * GiB, kv_cache_bytes(QWEN05, 2048), available=4 * GiB, ctx=2048)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "not enough memory" in msg and "needs about 8.3 GiB" in msg and "only 4.0 GiB is available" in msg
    assert "model 8.0 GiB" in msg and "KV cache 24 MiB for --ctx 2048" in msg
    assert "the model alone does not fit: use a smaller quant" in msg


def test_context_too_big_names_a_ctx_that_fits():
    kv = kv_cache_bytes(QWEN05, 32768)  # 384 MiB
    with pytest.raises(QcpuError) as ei:
        check_memory(MODEL_BYTES, kv, available=900 * MiB, ctx=32768)
    msg = str(ei.value)
    # room for the KV cache: 900 - 469 - 256 = 175 MiB = 14933 positions -> rounded down to 14848
    assert "only 900 MiB is available" in msg and "--ctx 14848 would fit" in msg, msg
    check_memory(MODEL_BYTES, kv_cache_bytes(QWEN05, 14848), available=900 * MiB)  # and it does


def test_huge_context_names_a_ctx_that_fits():
    with pytest.raises(QcpuError, match=r"needs about 64.7 GiB .*only 1.0 GiB is available; use a smaller --ctx "
                                        r"\(--ctx 18944 would fit\)"):
        check_memory(MODEL_BYTES, 64 * GiB, available=1 * GiB, ctx=1 << 22)


def test_without_ctx_the_advice_is_generic():
    with pytest.raises(QcpuError, match="use a smaller --ctx or a smaller quant"):
        check_memory(MODEL_BYTES, 2 * GiB, available=1 * GiB)


def test_default_available_comes_from_the_os(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 100 * MiB)
    with pytest.raises(QcpuError, match="only 100 MiB is available"):
        check_memory(MODEL_BYTES, 0)
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # the OS will not say: no refusal
    assert check_memory(MODEL_BYTES, 0).available_bytes is None


# K and V, 24 layers, 2 kv heads x 64, float16: written out, not taken from qcpu.memory.
KV_PER_POSITION = 2 * 24 * 2 * 64 * 2


def _fits(ctx: int, available: int) -> bool:
    return MODEL_BYTES + ctx * KV_PER_POSITION + RUNTIME_HEADROOM <= available


def _suggested_ctx(msg: str) -> int:
    m = re.search(r"--ctx (\d+) would fit", msg)
    assert m, msg
    return int(m.group(1))


@pytest.mark.parametrize("available_mib, ctx", [(780, 16384), (900, 32768), (1000, 131072), (3000, 1 << 20),
                                                (760, 4096), (1024 + 7, 65536)])
def test_refusal_names_the_sizes_and_the_largest_ctx_that_fits(available_mib, ctx):
    """A model + KV cache over the available memory is refused; the message names what is needed and what
    is available, and a --ctx that fits by the same sum (and is the largest multiple of 256 that does)."""
    available = available_mib * MiB
    assert kv_cache_bytes(QWEN05, ctx) == ctx * KV_PER_POSITION
    assert not _fits(ctx, available)
    with pytest.raises(QcpuError) as ei:
        check_memory(MODEL_BYTES, kv_cache_bytes(QWEN05, ctx), available=available, ctx=ctx)
    msg = str(ei.value)
    needed = MODEL_BYTES + ctx * KV_PER_POSITION + RUNTIME_HEADROOM
    assert f"needs about {format_bytes(needed)}" in msg and f"only {format_bytes(available)} is available" in msg
    assert f"--ctx {ctx}" in msg and "\n" not in msg
    fit = _suggested_ctx(msg)
    assert fit % 256 == 0 and 256 <= fit < ctx
    assert _fits(fit, available) and not _fits(fit + 256, available), fit
    check = check_memory(MODEL_BYTES, kv_cache_bytes(QWEN05, fit), available=available, ctx=fit)  # accepted
    assert check.needed_bytes <= available


def test_no_ctx_is_suggested_when_not_even_256_positions_fit():
    available = MODEL_BYTES + RUNTIME_HEADROOM + 255 * KV_PER_POSITION
    with pytest.raises(QcpuError) as ei:
        check_memory(MODEL_BYTES, kv_cache_bytes(QWEN05, 4096), available=available, ctx=4096)
    assert "would fit" not in str(ei.value) and "use a smaller --ctx or a smaller quant" in str(ei.value)


def _meminfo_available() -> int:
    """MemAvailable from /proc/meminfo, read here independently of qcpu.memory."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


LINUX = pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux's /proc/meminfo")
SLACK = 256 * MiB  # other processes allocate and free between two readings


@LINUX
@pytest.mark.parametrize("psutil_present", [True, False])
def test_available_memory_is_the_kernels_figure(monkeypatch, psutil_present):
    if not psutil_present:  # the fallback: /proc/meminfo read by qcpu itself
        monkeypatch.setitem(sys.modules, "psutil", None)
    avail = memory.available_memory()
    assert avail is not None and abs(avail - _meminfo_available()) < SLACK, (avail, _meminfo_available())


@LINUX
def test_this_machine_refuses_a_kv_cache_larger_than_its_memory():
    """Without `available`, the figure is the OS's: a KV cache twice the machine's available memory is
    refused, the message's "available" is the kernel's MemAvailable, and the --ctx it names fits in it."""
    have = _meminfo_available()
    ctx = (2 * have // KV_PER_POSITION) // 256 * 256
    with pytest.raises(QcpuError) as ei:
        check_memory(MODEL_BYTES, kv_cache_bytes(QWEN05, ctx), ctx=ctx)
    msg = str(ei.value)
    m = re.search(r"only ([\d.]+) (GiB|MiB) is available", msg)
    assert m, msg
    said = float(m.group(1)) * (GiB if m.group(2) == "GiB" else MiB)
    assert abs(said - have) < SLACK + 0.05 * GiB, (msg, have)  # (rounded to 0.1 GiB in the message)
    fit = _suggested_ctx(msg)
    assert _fits(fit, _meminfo_available() + SLACK) and fit < ctx


@pytest.mark.parametrize("args", [(-1, 0), (0, -5), (1.5, 0), (True, 0), (0, "1")])
def test_bad_arguments_are_programming_errors(args):
    with pytest.raises(ValueError):
        check_memory(*args, available=GiB)


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 4096, 3 * MiB, 1536 * MiB)] == ["512 B", "4 KiB", "3 MiB", "1.5 GiB"]
