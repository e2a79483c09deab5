"""`qcpu convert`: HF Qwen2 checkpoint -> GGUF; round trip through tests/hf_export.py; bad input."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qcpu.errors import QcpuError
from qcpu.gguf_file import GGUFFile
from quant.convert import convert
from quant.quantizers import quantize
from quant.requantize import requantize
from tests import hf_export


# --- round trip on the real model (first 2 layers, bf16, 3 shards) -----------------------------------


@pytest.fixture(scope="module")
def hf_dir(real_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "qwen2.5-coder-0.5b-2layers"
    hf_export.export(real_model_path, out, dtype="bf16", layers=2, shard_size=300_000_000)
    assert len(list(out.glob("*.safetensors"))) == 3
    return out


@pytest.fixture(scope="module")
def f32_gguf(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "f32.gguf"
    convert(hf_dir, path, "f32")
    return path


TOKENIZER_AND_HPARAMS = [
    "general.architecture", "qwen2.context_length", "qwen2.embedding_length", "qwen2.feed_forward_length",
    "qwen2.attention.head_count", "qwen2.attention.head_count_kv", "qwen2.rope.freq_base",
    "qwen2.attention.layer_norm_rms_epsilon", "general.quantization_version", "tokenizer.ggml.model",
    "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
]


@pytest.mark.model
def test_round_trip_metadata_equals_original(real_model_path, f32_gguf):
    a, b = GGUFFile(real_model_path), GGUFFile(f32_gguf)
    for key in TOKENIZER_AND_HPARAMS:
        assert b.metadata[key] == a.metadata[key], key
        assert b.value_types[key] == a.value_types[key], key
    assert b.metadata["qwen2.block_count"] == 2 and b.metadata["general.file_type"] == 0


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return (quantize(x, T.BF16).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(x.shape)


def _original(real_model_path, name):
    from qcpu.kernels import dequantize

    g = GGUFFile(real_model_path)
    info = g.tensors[name]
    return dequantize(np.array(g.raw(name)), info.ggml_type, info.cols)


@pytest.mark.model
def test_round_trip_f32_tensors_are_the_exported_weights(real_model_path, f32_gguf):
    """Exported as bf16, converted to f32: each tensor is the original's weights rounded to bf16, exactly."""
    b = GGUFFile(f32_gguf)
    assert len(b.tensors) == 3 + 2 * 12
    for name, info in b.tensors.items():
        assert info.ggml_type == T.F32
        x = _original(real_model_path, name)
        assert np.array_equal(b.raw(name).view(np.float32).reshape(x.shape), _bf16_round(x)), name


@pytest.mark.model
def test_round_trip_q8_0_and_f16(real_model_path, hf_dir, tmp_path):
    """convert_hf_to_gguf's q8_0 / f16: every 2-D weight in the type (gguf-py's bytes), norms and biases F32."""
    import gguf

    for qtype, ggml in (("q8_0", T.Q8_0), ("f16", T.F16)):
        out = tmp_path / f"{qtype}.gguf"
        convert(hf_dir, out, qtype)
        g = GGUFFile(out)
        for name in ["token_embd.weight", "output.weight", "blk.1.ffn_down.weight", "blk.0.attn_v.weight"]:
            assert g.tensors[name].ggml_type == ggml
            rows = slice(0, 3000)  # gguf-py is slow on the 151936-row tables: a slab of rows is plenty
            ref = gguf.quants.quantize(_bf16_round(_original(real_model_path, name)[rows]), ggml)
            assert np.array_equal(np.ascontiguousarray(g.raw(name)[rows]).view(np.uint8).ravel(),
                                  np.ascontiguousarray(ref).view(np.uint8).ravel()), name
        for name in ["blk.0.attn_norm.weight", "blk.1.attn_q.bias", "output_norm.weight"]:
            assert g.tensors[name].ggml_type == T.F32


@pytest.mark.model
def test_convert_to_mix_equals_quantize_of_f32(hf_dir, f32_gguf, tmp_path):
    """convert --type q4_k_m == quantize(convert --type f32, Q4_K_M): llama-quantize's rules and bytes."""
    direct, two_step = tmp_path / "direct.gguf", tmp_path / "two.gguf"
    convert(hf_dir, direct, "q4_k_m")
    requantize(f32_gguf, two_step, "Q4_K_M")
    a, b = GGUFFile(direct), GGUFFile(two_step)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].ggml_type == b.tensors[name].ggml_type, name
        assert np.array_equal(a.raw(name), b.raw(name)), name
    assert a.metadata["general.file_type"] == 15


@pytest.mark.model
def test_converted_model_runs(f32_gguf, real_model_path):
    """Our runtime loads the converted (2-layer) model; its logits match those of the same weights in the
    original file's own 2 layers closely (the only difference is bf16 rounding of the weights)."""
    from qcpu.model import Qwen2Model

    m = Qwen2Model.load(f32_gguf)
    logits = m.forward(np.array([9707, 11, 1879, 0]), m.new_cache(8), all_logits=True)
    assert logits.shape == (4, 151936) and np.isfinite(logits).all()


@pytest.mark.model
def test_convert_full_disk_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    from quant import writer

    real_write = writer.StreamingGGUFWriter.write

    def failing(self, data):
        if self._index >= 3:  # the disk fills up at the fourth tensor
            self._fout.write = _raise_enospc
        return real_write(self, data)

    monkeypatch.setattr(writer.StreamingGGUFWriter, "write", failing)
    with pytest.raises(QcpuError, match="no space left on device"):
        convert(hf_dir, tmp_path / "o.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def _raise_enospc(*_):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- bad input (tiny fake checkpoints; fail before the tokenizer is needed) ------------------------


def _tiny_hf(d: Path, arch="Qwen2ForCausalLM", shards=1) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_export.tiny_config(16, arch)))
    t = hf_export.tiny_tensors(16)
    if shards == 1:
        hf_export.write_arrays(d / "model.safetensors", t)
    else:
        names = sorted(t)
        half = {n: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors" for i, n in enumerate(names)}
        for fn in set(half.values()):
            hf_export.write_arrays(d / fn, {n: t[n] for n in names if half[n] == fn})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": half}))
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    return d


def qcpu(*args):
    return subprocess.run([sys.executable, "-m", "qcpu.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_line_error(proc, contains):
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("qcpu: ") and "Traceback" not in proc.stderr, proc.stderr
    assert contains in lines[0], lines[0]


@pytest.mark.parametrize("case,expect", [
    ("no_config", "no config.json"),
    ("not_dir", "no such directory"),
    ("bad_json", "not valid JSON"),
    ("arch", "unknown architecture 'LlamaForCausalLM'"),
    ("missing_shard", "shard model-00002-of-00002.safetensors is missing"),
    ("truncated_shard", "does not fit its shape or the file"),
    ("wrong_shape", "tensor model.layers.0.mlp.up_proj.weight has shape [64, 31]"),
    ("missing_tensor", "tensor model.layers.0.mlp.down_proj.weight is missing"),
    ("extra_tensor", "cannot map tensor 'model.layers.0.mlp.extra.weight'"),
    ("no_weights", "no *.safetensors files"),
    ("exists", "already exists (use --force"),
    ("bad_type", "unknown quantization type"),
])
def test_cli_convert_bad_input(tmp_path, case, expect):
    d = tmp_path / "hf"
    out = tmp_path / "out.gguf"
    qtype = "f16"
    if case == "not_dir":
        d = tmp_path / "nowhere"
    elif case == "no_config":
        d.mkdir()
    else:
        _tiny_hf(d, arch="LlamaForCausalLM" if case == "arch" else "Qwen2ForCausalLM",
                 shards=2 if case in ("missing_shard", "truncated_shard") else 1)
    if case == "bad_json":
        (d / "config.json").write_text("{not json")
    elif case == "missing_shard":
        (d / "model-00002-of-00002.safetensors").unlink()
    elif case == "truncated_shard":
        p = d / "model-00002-of-00002.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
    elif case in ("wrong_shape", "missing_tensor", "extra_tensor"):
        from safetensors.numpy import load_file

        t = load_file(d / "model.safetensors")
        if case == "wrong_shape":
            t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:, :31].copy()
        elif case == "missing_tensor":
            del t["model.layers.0.mlp.down_proj.weight"]
        else:
            t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float16)
        hf_export.write_arrays(d / "model.safetensors", t)
    elif case == "no_weights":
        (d / "model.safetensors").unlink()
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "bad_type":
        qtype = "q9_x"
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(qcpu("convert", d, out, "--type", qtype), expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert out.read_bytes() == b"keep me"
