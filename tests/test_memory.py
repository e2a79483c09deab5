"""qcpu.memory.check_memory: refuse, in one clear line, a model + KV cache that will not fit."""

from __future__ import annotations

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
    from qcpu.cache import RingKVCache

    cache = RingKVCache(QWEN05.n_layers, 1024, QWEN05.n_kv_heads, QWEN05.head_dim, QWEN05.rope_theta,
                        max_position=QWEN05.context_length)
    assert kv_cache_bytes(QWEN05, 1024) == cache.k.nbytes + cache.v.nbytes == 12 * MiB
    assert kv_cache_bytes(QWEN05, 32768) == 384 * MiB


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


def test_available_memory_is_sane():
    avail = memory.available_memory()
    assert avail is None or 0 < avail < 1 << 50


def test_real_machine_default_model_small_ctx_fits():
    check = check_memory(MODEL_BYTES, kv_cache_bytes(QWEN05, 512))
    assert check.available_bytes is None or check.needed_bytes <= check.available_bytes


@pytest.mark.parametrize("args", [(-1, 0), (0, -5), (1.5, 0), (True, 0), (0, "1")])
def test_bad_arguments_are_programming_errors(args):
    with pytest.raises(ValueError):
        check_memory(*args, available=GiB)


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 4096, 3 * MiB, 1536 * MiB)] == ["512 B", "4 KiB", "3 MiB", "1.5 GiB"]
