"""`qcpu quantize`: llama-quantize's tensor types and bytes, streaming, atomic, one-line errors."""

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
from quant import recipes
from quant.requantize import requantize
from tests import quant_goldens

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((ROOT / "tests" / "golden" / "quant_tiny_llama.json").read_text())


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_f16")
    out = {}
    for name in quant_goldens.TINY_MODELS:
        path = d / f"{name}.gguf"
        quant_goldens.write_tiny_f16(path, name)
        assert quant_goldens.file_digest(path)[1] == GOLDEN["models"][name]["source_sha256"], \
            "tiny model builder changed"
        out[name] = path
    return out


@pytest.mark.parametrize("ft", quant_goldens.FILE_TYPES)
@pytest.mark.parametrize("model", list(quant_goldens.TINY_MODELS))
def test_tiny_files_equal_llama_quantize(tiny_sources, tmp_path, model, ft):
    """Every tensor's type and every byte equal what llama_model_quantize wrote (recorded)."""
    out = tmp_path / "out.gguf"
    requantize(tiny_sources[model], out, ft)
    codes, digest = quant_goldens.file_digest(out)
    want = GOLDEN["models"][model]["files"][ft]
    assert codes == want["types"]
    assert digest == want["sha256"]


def test_metadata_copied_with_file_type(tiny_sources, tmp_path):
    src, out = tiny_sources["gqa4"], tmp_path / "q.gguf"
    requantize(src, out, "Q4_K_M")
    a, b = GGUFFile(src), GGUFFile(out)
    for k, v in a.metadata.items():
        if k not in ("general.file_type", "general.quantization_version"):
            assert b.metadata[k] == v, k
            assert b.value_types[k] == a.value_types[k], k
    assert b.metadata["general.file_type"] == 15 and b.metadata["general.quantization_version"] == 2
    assert list(b.tensors) == recipes.llama_order(a.tensors)


def test_quantized_tiny_model_runs(tiny_sources, tmp_path):
    """Our runtime loads what we write: Q8_0 tracks the F16 model; a Q4_K_M file tracks its own weights
    dequantized back into an F32 file (not exactly: the runtime rounds activations to 8 bits for
    quantized weights, as llama.cpp does, and random tiny nets amplify that)."""
    from qcpu.model import Qwen2Model

    def logits(path):
        m = Qwen2Model.load(path)
        return m.forward(np.arange(1, 12), m.new_cache(16), all_logits=True)

    q8, q4, back = tmp_path / "q8.gguf", tmp_path / "q4.gguf", tmp_path / "back.gguf"
    requantize(tiny_sources["tied"], q8, "Q8_0")
    requantize(tiny_sources["tied"], q4, "Q4_K_M")
    requantize(q4, back, "F32", allow_requantize=True)  # dequantizing is requantizing to llama-quantize
    f16 = logits(tiny_sources["tied"])
    assert np.corrcoef(f16.ravel(), logits(q8).ravel())[0, 1] > 0.97  # random tiny nets amplify noise
    assert np.corrcoef(logits(q4).ravel(), logits(back).ravel())[0, 1] > 0.98


def test_pure_puts_every_weight_in_the_base_type(tiny_sources, tmp_path):
    out = tmp_path / "pure.gguf"
    requantize(tiny_sources["gqa4"], out, "Q4_K", pure=True)
    types = {n: T(t.ggml_type) for n, t in GGUFFile(out).tensors.items()}
    assert {t for n, t in types.items() if n.endswith(".weight") and "norm" not in n} == {T.Q4_K}
    assert {t for n, t in types.items() if "norm" in n or n.endswith(".bias")} == {T.F32}


def test_plan_rules_for_a_qwen_shape():
    """Q4_K_M on 24 layers of 896-wide rows: llama.cpp's use_more_bits layers, in layer order, with the
    fallbacks (Q6_K -> Q8_0 and Q4_K -> Q5_0 for 896 columns)."""
    tensors = {"token_embd.weight": ((896, 151936), T.F16), "output.weight": ((896, 151936), T.F16),
               "output_norm.weight": ((896,), T.F32)}
    for i in range(24):
        tensors[f"blk.{i}.attn_v.weight"] = ((896, 128), T.F16)
        tensors[f"blk.{i}.attn_v.bias"] = ((128,), T.F32)
        tensors[f"blk.{i}.ffn_down.weight"] = ((4864, 896), T.F16)
    facts = recipes.ModelFacts(n_layer=24, n_head=14, n_head_kv=2)
    plan = dict(recipes.plan(tensors, facts, recipes.file_type("Q4_K_M")))
    more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23}
    for i in range(24):
        assert plan[f"blk.{i}.ffn_down.weight"] == (T.Q6_K if i in more else T.Q4_K)
        assert plan[f"blk.{i}.attn_v.weight"] == (T.Q8_0 if i in more else T.Q5_0)
        assert plan[f"blk.{i}.attn_v.bias"] == T.F32
    assert plan["output.weight"] == T.Q8_0 and plan["token_embd.weight"] == T.Q5_0
    assert plan["output_norm.weight"] == T.F32


def test_file_type_names():
    assert recipes.file_type("q4_k").name == "Q4_K_M"  # llama-quantize's alias
    assert recipes.file_type("Q5_K").name == "Q5_K_M"
    with pytest.raises(QcpuError, match="unknown quantization type"):
        recipes.file_type("Q7_X")


def test_full_disk_leaves_nothing(tiny_sources, tmp_path, monkeypatch):
    from quant import writer

    calls = {"n": 0}
    real_write = writer.StreamingGGUFWriter.write

    def failing_write(self, data):
        calls["n"] += 1
        if calls["n"] > 5:
            self._fout.write = _raise_enospc
        return real_write(self, data)

    monkeypatch.setattr(writer.StreamingGGUFWriter, "write", failing_write)
    out = tmp_path / "full.gguf"
    with pytest.raises(QcpuError, match="no space left on device"):
        requantize(tiny_sources["gqa4"], out, "Q8_0")
    assert list(tmp_path.iterdir()) == []


def _raise_enospc(*_):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- the command line ---------------------------------------------------------------------------------


def qcpu(*args):
    return subprocess.run([sys.executable, "-m", "qcpu.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_line_error(proc, contains):
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("qcpu: ") and "Traceback" not in proc.stderr, proc.stderr
    assert contains in lines[0], lines[0]


def test_cli_quantize_refuses_to_overwrite_then_forces(tiny_sources, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    proc = qcpu("quantize", tiny_sources["tied"], out, "Q8_0")
    one_line_error(proc, "already exists (use --force")
    assert out.read_bytes() == b"precious"
    proc = qcpu("quantize", tiny_sources["tied"], out, "Q8_0", "--force")
    assert proc.returncode == 0, proc.stderr
    assert quant_goldens.file_digest(out) == tuple(GOLDEN["models"]["tied"]["files"]["Q8_0"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]


@pytest.mark.parametrize("case", ["type", "missing", "notgguf", "nodir", "same"])
def test_cli_quantize_bad_input(tiny_sources, tmp_path, case):
    src, out, qtype = tiny_sources["tied"], tmp_path / "o.gguf", "Q4_0"
    expect = {"type": "unknown quantization type", "missing": "no such file", "notgguf": "not a GGUF file",
              "nodir": "no such directory", "same": "overwrite the input"}[case]
    if case == "type":
        qtype = "Q9_9"
    elif case == "missing":
        src = tmp_path / "nope.gguf"
    elif case == "notgguf":
        src = tmp_path / "text.gguf"
        src.write_text("hello, this is not a model file at all\n")
    elif case == "nodir":
        out = tmp_path / "no" / "such" / "o.gguf"
    elif case == "same":
        src = tmp_path / "copy.gguf"
        src.write_bytes(tiny_sources["tied"].read_bytes())
        out = src
    extra = ["--force"] if case == "same" else []
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(qcpu("quantize", src, out, qtype, *extra), expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_too_little_free_space_is_refused_up_front(tiny_sources, tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(QcpuError, match=r"needs 0\.\d\d GiB, only 0\.00 GiB free"):
        requantize(tiny_sources["gqa4"], tmp_path / "o.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []


# --- already-quantized input: refused unless --allow-requantize (llama_model_quantize_impl) ----------


@pytest.fixture(scope="module")
def tiny_q4_0(tmp_path_factory):
    """A tiny model whose 2-D weights are Q4_0 (written by gguf-py), norms and biases F32."""
    from tests.tiny_model import write_tiny_qwen2

    path = tmp_path_factory.mktemp("tiny_q4_0") / "q4_0.gguf"
    write_tiny_qwen2(path, weight_type=T.Q4_0)
    return path


def _types(path) -> dict[str, T]:
    return {n: T(t.ggml_type) for n, t in GGUFFile(path).tensors.items()}


def test_cli_refuses_to_requantize_a_quantized_model(tiny_q4_0, tmp_path):
    """`qcpu quantize q4_0.gguf out.gguf Q8_0`: one line naming a Q4_0 tensor and the flag; exit 1; the
    directory exactly as it was (no OUT, no temporary file)."""
    out = tmp_path / "out.gguf"
    proc = qcpu("quantize", tiny_q4_0, out, "Q8_0")
    one_line_error(proc, "--allow-requantize")
    line = proc.stderr.strip()
    name = line.split("qcpu: ", 1)[1].split(" ", 1)[0]
    assert _types(tiny_q4_0)[name] == T.Q4_0, line  # it names a tensor that really is Q4_0
    assert f"{name} is already Q4_0: requantizing it to Q8_0 loses quality" in line
    assert proc.returncode == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_allow_requantize_does_it(tiny_q4_0, tmp_path):
    """With the flag every weight becomes Q8_0 and holds the Q4_0 weights (as gguf-py dequantizes them)
    to within Q8_0's rounding."""
    import gguf

    out = tmp_path / "out.gguf"
    proc = qcpu("quantize", tiny_q4_0, out, "Q8_0", "--allow-requantize", "--quiet")
    assert proc.returncode == 0, proc.stderr
    src, dst = GGUFFile(tiny_q4_0), GGUFFile(out)
    for name, info in src.tensors.items():
        if info.ggml_type != T.Q4_0:
            continue
        assert dst.tensors[name].ggml_type == T.Q8_0, name
        a = gguf.quants.dequantize(np.array(src.raw(name)), T.Q4_0)
        b = gguf.quants.dequantize(np.array(dst.raw(name)), T.Q8_0)
        step = np.abs(a).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # one Q8_0 step per block
        # half a step of rounding, plus the fp16 rounding of the step itself (2^-11 relative, times |q| <= 127)
        assert np.all(np.abs(b - a).reshape(-1, 32) <= step * (0.5 + 127 * 2.0**-11) + 1e-7), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_copying_quantized_tensors_needs_no_flag(tiny_q4_0, tmp_path):
    """Q4_0 -> Q4_0 --pure changes no tensor's type, so nothing is requantized: allowed, and every tensor's
    bytes are the input's."""
    out = tmp_path / "same.gguf"
    proc = qcpu("quantize", tiny_q4_0, out, "Q4_0", "--pure", "--quiet")
    assert proc.returncode == 0, proc.stderr
    a, b = GGUFFile(tiny_q4_0), GGUFFile(out)
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].ggml_type == b.tensors[name].ggml_type, name
        assert np.array_equal(a.raw(name), b.raw(name)), name


def test_q4_0_mix_still_refused(tiny_q4_0, tmp_path):
    """Q4_0 without --pure puts output.weight in Q6_K (llama.cpp's rule; Q8_0 here, its fallback for
    64-wide rows), which requantizes it: refused, naming output.weight (written first)."""
    with pytest.raises(QcpuError, match=r"^output\.weight is already Q4_0: requantizing it to Q8_0 loses quality"):
        requantize(tiny_q4_0, tmp_path / "o.gguf", "Q4_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("weight_type", [T.F16, T.BF16, T.F32])
def test_float_sources_are_not_requantizing(tmp_path, weight_type):
    """F32, F16 and BF16 are not quantized types (ggml_is_quantized): they quantize without the flag."""
    from tests.tiny_model import write_tiny_qwen2

    src = tmp_path / "src.gguf"
    write_tiny_qwen2(src, weight_type=weight_type)
    assert weight_type in set(_types(src).values())
    requantize(src, tmp_path / "o.gguf", "Q8_0")
    assert _types(tmp_path / "o.gguf")["blk.0.attn_q.weight"] == T.Q8_0


def test_dequantizing_is_refused_too(tiny_sources, tmp_path):
    """llama-quantize also refuses quantized -> F32/F16 without --allow-requantize; the reason differs."""
    q4 = tmp_path / "q4.gguf"
    requantize(tiny_sources["tied"], q4, "Q4_K_M")
    with pytest.raises(QcpuError, match=r"is already Q\d_K: converting it to F16 cannot restore what quantizing "
                                        r"lost; pass --allow-requantize"):
        requantize(q4, tmp_path / "f16.gguf", "F16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4.gguf"]


def test_refusal_comes_before_any_work(tiny_q4_0, tmp_path, monkeypatch):
    """The check runs on the plan alone: no writer is created, no tensor read or dequantized."""
    import quant.requantize as rq

    def boom(*a, **k):
        raise AssertionError("work started before the requantize check")

    monkeypatch.setattr(rq, "StreamingGGUFWriter", boom)
    monkeypatch.setattr(rq, "TensorReader", boom)
    monkeypatch.setattr(rq, "dequantize_rows", boom)
    with pytest.raises(QcpuError, match="--allow-requantize"):
        requantize(tiny_q4_0, tmp_path / "o.gguf", "Q8_0")
