"""Block quantizers are bit-exact: legacy types against gguf-py, all types against llama.cpp's bytes."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant.quantizers import QUANTIZERS, nearest_int, quantize
from tests.quant_goldens import ggml_lib, ggml_quantize

GOLDEN = Path(__file__).parent / "golden" / "quant_blocks.npz"
LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
K_QUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda t: t.name)
def test_blocks_equal_llama_cpp_golden(golden, qtype):
    """Bytes recorded from llama.cpp's ggml_quantize_chunk (tools/record_quant_goldens.py)."""
    names = [k[3:] for k in golden.files if k.startswith("in/")]
    assert names
    for name in names:
        ours = quantize(golden[f"in/{name}"], qtype)
        ref = golden[f"{qtype.name}/{name}"]
        assert ours.shape == ref.shape
        diff = np.flatnonzero((ours != ref).any(axis=0))
        assert diff.size == 0, f"{name}: first differing byte column {diff[:5]}"


@pytest.fixture(scope="module")
def real_rows(real_model_path):
    """float32 rows of real tensors of the default model (dequantized from Q5_0 / Q8_0 / Q4_K / Q6_K)."""
    from qcpu.gguf_file import GGUFFile

    g = GGUFFile(real_model_path)
    out = {}
    for name, first, count in [("token_embd.weight", 20000, 48), ("output.weight", 0, 32),
                               ("blk.0.ffn_down.weight", 0, 24), ("blk.11.ffn_down.weight", 500, 24),
                               ("blk.7.attn_v.weight", 0, 64), ("blk.3.ffn_up.weight", 1000, 16)]:
        t = g.tensors[name]
        raw = np.array(g.raw(name)[first:first + count])
        out[name] = gguf.quants.dequantize(raw, T(t.ggml_type)).reshape(count, t.shape[0]).astype(np.float32)
    return out


@pytest.mark.model
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_equal_gguf_py_on_real_tensors(real_rows, qtype):
    for name, x in real_rows.items():
        assert np.array_equal(quantize(x, qtype), gguf.quants.quantize(x, qtype)), name


@pytest.mark.model
@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda t: t.name)
def test_equal_live_llama_cpp_on_real_tensors(real_rows, qtype):
    """When llama-cpp-python is installed: more real rows, straight against libggml-base."""
    pytest.importorskip("llama_cpp")  # an optional extra (`.[llama]`), not a test dependency
    lib = ggml_lib()
    block = QUANTIZERS[qtype].block_size
    for name, x in real_rows.items():
        if x.shape[1] % block:
            x = x.reshape(-1, 2 * x.shape[1])  # join pairs of 896-rows: 1792 = 7 super-blocks
        assert x.shape[1] % block == 0
        assert np.array_equal(quantize(x, qtype), ggml_quantize(lib, x, qtype)), name


def _c_nearest_int(v: np.float32) -> int:
    """ggml's nearest_int, literally: bits of (v + 12582912.f), low 23 bits, minus 0x400000."""
    s = np.array([np.float32(v) + np.float32(12582912.0)], dtype=np.float32)
    return int(s.view(np.int32)[0] & 0x007FFFFF) - 0x00400000


def test_nearest_int_matches_ggml_bit_trick():
    rng = np.random.default_rng(1)
    vals = np.concatenate([
        (rng.standard_normal(5000) * 40).astype(np.float32),
        np.arange(-10, 10, 0.5, dtype=np.float32),  # exact halves: ties to even
        (rng.standard_normal(2000) * 1e8).astype(np.float32),  # outside ggml's assert range
        np.array([4194303.0, -4194304.0, 8388608.0, -2e7, 3e38, -3e38], dtype=np.float32),
    ])
    for v in vals:
        assert nearest_int(np.float32(v)) == _c_nearest_int(v), v


def test_kernels_compiled_only_for_float32():
    """A float64 leaking into the block arithmetic would round differently from the C code."""
    quantize(np.ones((1, 256), np.float32), T.Q4_K)
    for sig in nearest_int.signatures:
        assert str(sig[0]) == "float32", sig


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_float_types_match_gguf_py(qtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((8, 64)) * 10.0 ** rng.integers(-6, 5, (8, 64))).astype(np.float32)
    x[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
    ours = quantize(x, qtype)
    ref = gguf.quants.quantize(x, qtype)
    assert np.array_equal(ours, np.ascontiguousarray(ref).view(np.uint8).reshape(ours.shape))


def test_rejects_partial_blocks():
    from qcpu.errors import QcpuError

    with pytest.raises(QcpuError, match="whole number"):
        quantize(np.zeros((2, 100), np.float32), T.Q4_0)
