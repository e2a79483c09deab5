"""NaN/Inf checks (qcpu/validate.py, llama.cpp's ggml_validate_row_data) and their use by `qcpu quantize`
and `qcpu convert`.

Bad numbers are planted at byte offsets written out here from ggml-common.h's block structs (not taken
from qcpu's kernels), and gguf-py's own dequantizer confirms each plant: exactly the planted block (or
value) turns non-finite, so the offset really is a scale field and the check really had to find it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qcpu.errors import QcpuError
from qcpu.gguf_file import GGUFFile
from qcpu.validate import Invalid, check_rows, check_tensors, find_invalid
from quant.quantizers import quantize as qcpu_quantize
from tests.tiny_model import write_tiny_qwen2

# ggml-common.h: bytes per block and the fp16 scale fields (name, byte offset) of each block struct.
BLOCKS = {
    T.Q4_0: (18, [("d", 0)]),                 # d, qs[16]
    T.Q4_1: (20, [("d", 0), ("m", 2)]),       # d, m, qs[16]
    T.Q5_0: (22, [("d", 0)]),                 # d, qh[4], qs[16]
    T.Q5_1: (24, [("d", 0), ("m", 2)]),       # d, m, qh[4], qs[16]
    T.Q8_0: (34, [("d", 0)]),                 # d, qs[32]
    T.Q2_K: (84, [("d", 80), ("dmin", 82)]),  # scales[16], qs[64], d, dmin
    T.Q3_K: (110, [("d", 108)]),              # hmask[32], qs[64], scales[12], d
    T.Q4_K: (144, [("d", 0), ("dmin", 2)]),   # d, dmin, scales[12], qs[128]
    T.Q5_K: (176, [("d", 0), ("dmin", 2)]),   # d, dmin, scales[12], qh[32], qs[128]
    T.Q6_K: (210, [("d", 208)]),              # ql[128], qh[64], scales[16], d
}
FLOATS = {T.F32: 4, T.F16: 2, T.BF16: 2}
ALL_TYPES = list(FLOATS) + list(BLOCKS)
ROWS, COLS = 3, 512  # 512 = 2 K-quant super-blocks, 16 legacy blocks per row

# Bit patterns: name -> (fp16 bits, bf16 bits, float32 value, how the message spells it)
BAD = {
    "nan": (0x7E00, 0x7FC0, np.float32(np.nan), "NaN"),
    "inf": (0x7C00, 0x7F80, np.float32(np.inf), "+Inf"),
    "-inf": (0xFC00, 0xFF80, np.float32(-np.inf), "-Inf"),
    "signalling-nan": (0x7C01, 0x7F81, np.uint32(0x7F800001).view(np.float32), "NaN"),
}


def tensor_bytes(t: T, seed: int = 0) -> np.ndarray:
    """A clean [ROWS, COLS] tensor of type t as uint8[ROWS, row_bytes]: gguf-py's quantizer where it has
    one, qcpu's (byte-identical to llama.cpp's, tests/test_quant_blocks.py) for the K-quants."""
    x = np.random.default_rng(seed).standard_normal((ROWS, COLS)).astype(np.float32)
    try:
        q = gguf.quants.quantize(x, t)
    except NotImplementedError:
        q = qcpu_quantize(x, t)
    return np.ascontiguousarray(q).view(np.uint8).reshape(ROWS, -1).copy()


def reference_values(raw: np.ndarray, t: T) -> np.ndarray:
    """gguf-py's dequantization, float32[ROWS, COLS] (NaN/Inf allowed through)."""
    with np.errstate(all="ignore"):
        if t == T.F32:
            return raw.view(np.float32).reshape(ROWS, COLS)
        if t == T.F16:
            return raw.view(np.float16).astype(np.float32).reshape(ROWS, COLS)
        return gguf.quants.dequantize(raw, t).reshape(ROWS, COLS)


def plant(raw: np.ndarray, t: T, index: int, field: str, bad: str) -> np.ndarray:
    """A copy of raw with `bad` written into block `index`'s `field` (float types: value `index`)."""
    out = raw.copy()
    flat = out.reshape(-1)
    f16, bf16, f32, _ = BAD[bad]
    if t == T.F32:
        flat[4 * index: 4 * index + 4] = np.frombuffer(np.float32(f32).tobytes(), np.uint8)
    elif t in FLOATS:
        flat[2 * index: 2 * index + 2] = np.frombuffer(struct.pack("<H", f16 if t == T.F16 else bf16), np.uint8)
    else:
        size, fields = BLOCKS[t]
        at = index * size + dict(fields)[field]
        flat[at: at + 2] = np.frombuffer(struct.pack("<H", f16), np.uint8)
    return out


def items_per_row(t: T) -> int:
    return COLS if t in FLOATS else COLS // (32 if t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0) else 256)


def cases():
    for t in ALL_TYPES:
        fields = ["value"] if t in FLOATS else [f for f, _ in BLOCKS[t][1]]
        for field in fields:
            for bad in BAD:
                yield pytest.param(t, field, bad, id=f"{t.name}-{field}-{bad}")


@pytest.mark.parametrize("t,field,bad", list(cases()))
def test_planted_nan_or_inf_is_found(t, field, bad):
    """Every supported type, every scale field, NaN / ±Inf / a signalling NaN, in row 1: the error names
    the tensor, the block (value) index, the row, the field and what was found."""
    raw = tensor_bytes(t)
    per_row = items_per_row(t)
    index = per_row + per_row // 2  # row 1, its middle (not the first block of a row)
    broken = plant(raw, t, index, field, bad)

    # The reference dequantizer agrees: the planted block (value) and nothing else is non-finite.
    finite = np.isfinite(reference_values(broken, t)).reshape(-1)
    span = 1 if t in FLOATS else COLS // per_row
    expect = np.ones(ROWS * COLS, bool)
    expect[index * span:(index + 1) * span] = False
    assert np.array_equal(finite, expect)

    word = BAD[bad][3]
    found = find_invalid(broken, t)
    assert found.index == index and found.field == field and found.kind == word
    with pytest.raises(QcpuError) as e:
        check_rows(broken, t, "tensor blk.7.ffn_up.weight")
    msg = str(e.value)
    if t in FLOATS:
        assert msg == (f"tensor blk.7.ffn_up.weight has invalid data: value {index} "
                       f"(row 1, column {index - per_row}) is {word}")
    else:
        assert msg == f"tensor blk.7.ffn_up.weight has invalid data: block {index} (row 1) has scale {field} = {word}"


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_clean_tensors_pass(t):
    for seed in range(3):
        raw = tensor_bytes(t, seed)
        assert np.isfinite(reference_values(raw, t)).all()
        assert find_invalid(raw, t) is None
        check_rows(raw, t, "x")


@pytest.mark.parametrize("t", list(BLOCKS), ids=lambda t: t.name)
def test_only_scales_are_checked(t):
    """Quant bytes are small integers whatever their bits, so all-ones bytes outside the scale fields are
    valid (ggml checks only d/m/dmin), and so are the extreme finite halves in the scales: 65504 (0x7BFF)
    and the smallest subnormal. The reference dequantizer agrees everything is finite."""
    size, fields = BLOCKS[t]
    raw = tensor_bytes(t)
    blocks = raw.reshape(-1, size)
    scale_bytes = {o + k for _, o in fields for k in (0, 1)}
    for j in range(size):
        if j not in scale_bytes:
            blocks[:, j] = 0xFF
    for _, o in fields:
        blocks[0::2, o:o + 2] = np.frombuffer(struct.pack("<H", 0x7BFF), np.uint8)
        blocks[1::2, o:o + 2] = np.frombuffer(struct.pack("<H", 0x0001), np.uint8)
    assert np.isfinite(reference_values(raw, t)).all()
    assert find_invalid(raw, t) is None


def test_first_bad_block_wins_and_d_before_m():
    """llama.cpp stops at the first bad block and checks d before m within it."""
    raw = tensor_bytes(T.Q4_1)
    two = plant(plant(raw, T.Q4_1, 20, "d", "nan"), T.Q4_1, 9, "m", "inf")
    assert find_invalid(two, T.Q4_1) == Invalid(9, "m", float("inf"))
    same = plant(plant(raw, T.Q4_1, 9, "m", "inf"), T.Q4_1, 9, "d", "-inf")
    assert find_invalid(same, T.Q4_1) == Invalid(9, "d", float("-inf"))
    vals = plant(plant(tensor_bytes(T.F16), T.F16, 700, "value", "inf"), T.F16, 1000, "value", "nan")
    assert find_invalid(vals, T.F16) == Invalid(700, "value", float("inf"))


def test_slabs_report_tensor_positions():
    """check_rows on rows 2.. of a tensor (a slab) reports the tensor-wide block and row."""
    raw = plant(tensor_bytes(T.Q8_0), T.Q8_0, 16 * 2 + 3, "d", "nan")
    with pytest.raises(QcpuError, match=r"^t has invalid data: block 99 \(row 6\) has scale d = NaN$"):
        check_rows(raw[2:], T.Q8_0, "t", first_row=6)  # slab row 0 (the planted row 2) = tensor row 6


def test_unsupported_type_and_partial_block_are_one_line_errors():
    with pytest.raises(QcpuError, match="cannot check tensors of type IQ4_NL"):
        find_invalid(np.zeros(18, np.uint8), T.IQ4_NL)
    with pytest.raises(QcpuError, match="not a whole number of Q8_0 blocks"):
        find_invalid(np.zeros(35, np.uint8), T.Q8_0)


# --- check_tensors on files ---------------------------------------------------------------------------


def _tensor_offset(path: Path, name: str) -> int:
    """Absolute file offset of a tensor's data, by gguf-py's reader (independent of qcpu's parser)."""
    r = gguf.GGUFReader(path)
    return next(int(t.data_offset) for t in r.tensors if t.name == name)


def _poke(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.F16])
def test_check_tensors_on_a_file(tmp_path, t):
    """A tiny model with one bad scale (value) in blk.1.ffn_down.weight: GGUFFile, Qwen2Model and Engine
    are all accepted; the clean file passes."""
    from qcpu.generate import Engine
    from qcpu.model import Qwen2Model

    path = tmp_path / "m.gguf"
    write_tiny_qwen2(path, weight_type=t)
    check_tensors(GGUFFile(path))
    name = "blk.1.ffn_down.weight"  # [64 rows, 96 cols]: 3 legacy blocks a row
    per_row = 96 // 32 if t != T.F16 else 96
    index = 5 * per_row + 2  # row 5
    at = _tensor_offset(path, name) + (index * 2 if t == T.F16 else index * BLOCKS[t][0])
    _poke(path, at, struct.pack("<H", 0x7E00))
    where = f"value {index} (row 5, column 2) is NaN" if t == T.F16 else f"block {index} (row 5) has scale d = NaN"
    for opened in (GGUFFile(path), Qwen2Model.load(path), Engine.load(path, ctx=32)):
        with pytest.raises(QcpuError) as e:
            check_tensors(opened)
        assert str(e.value) == f"{path}: tensor {name} has invalid data: {where}"
    with pytest.raises(QcpuError, match="blk.1.ffn_down"):
        check_tensors(GGUFFile(path), names=["blk.0.ffn_down.weight", name])
    check_tensors(GGUFFile(path), names=["blk.0.ffn_down.weight"])


@pytest.mark.model
def test_default_model_is_clean(real_model_path):
    check_tensors(GGUFFile(real_model_path))  # ~0.05 s warm (closing note of issue 9); speed is not asserted


# --- qcpu quantize / qcpu convert refuse broken numbers ------------------------------------------------


def qcpu(*args):
    return subprocess.run([sys.executable, "-m", "qcpu.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_line_error(proc, contains):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("qcpu: ") and "Traceback" not in proc.stderr, proc.stderr
    assert contains in lines[0], lines[0]


@pytest.mark.parametrize("qtype", ["Q8_0", "F32"])
def test_cli_quantize_refuses_a_nan_weight(tmp_path, qtype):
    """An F32 tiny model with one NaN in blk.0.attn_k.weight (row 3, column 10): quantized (Q8_0) or
    copied (F32), one line naming it, nothing written."""
    src = tmp_path / "src" / "f32.gguf"
    src.parent.mkdir()
    write_tiny_qwen2(src)
    name, row, col = "blk.0.attn_k.weight", 3, 10  # [32 rows, 64 cols]
    _poke(src, _tensor_offset(src, name) + 4 * (row * 64 + col), struct.pack("<f", float("nan")))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = qcpu("quantize", src, out_dir / "o.gguf", qtype)
    one_line_error(proc, f"{src}: tensor {name} has invalid data: value {row * 64 + col} (row {row}, column {col}) is NaN")
    assert list(out_dir.iterdir()) == []


def test_quantize_refuses_a_bad_scale_in_a_copied_tensor(tmp_path):
    """Q4_0 -> Q4_0 --pure only copies, but llama-quantize validates what it loads all the same."""
    from quant.requantize import requantize

    src = tmp_path / "q4.gguf"
    write_tiny_qwen2(src, weight_type=T.Q4_0)
    _poke(src, _tensor_offset(src, "blk.1.attn_v.weight") + 3 * 18, struct.pack("<H", 0x7C00))
    with pytest.raises(QcpuError, match=r"tensor blk\.1\.attn_v\.weight has invalid data: block 3 \(row 1\) "
                                        r"has scale d = \+Inf"):
        requantize(src, tmp_path / "o.gguf", "Q4_0", pure=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4.gguf"]


def test_quantize_refuses_output_that_overflows(tmp_path):
    """Finite F32 weights beyond fp16's range (65504) become Inf in F16: llama-quantize validates its
    output rows too, and so do we."""
    from quant.requantize import requantize

    src = tmp_path / "f32.gguf"
    write_tiny_qwen2(src)
    _poke(src, _tensor_offset(src, "blk.0.ffn_gate.weight") + 4 * 70, struct.pack("<f", 1e6))
    with pytest.raises(QcpuError, match=r"^tensor blk\.0\.ffn_gate\.weight: quantized data validation failed "
                                        r"\(value 70 \(row 1, column 6\) is \+Inf\): its values are too large for F16$"):
        requantize(src, tmp_path / "o.gguf", "F16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32.gguf"]


@pytest.mark.model
def test_cli_convert_refuses_an_inf_weight(real_model_path, tmp_path):
    """A tiny HF checkpoint (Qwen's real tokenizer, random f16 weights) with one Inf: one line naming the
    safetensors tensor, its row and column, for a plain and a quantizing conversion; no OUT, no temporary
    file. The same checkpoint without the Inf converts."""
    from tests import hf_export as export

    meta = GGUFFile(real_model_path).metadata
    tj = export.tokenizer_json(meta)
    vocab = len(meta["tokenizer.ggml.tokens"])

    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps(export.tokenizer_config(meta, tj, 64), ensure_ascii=False))
    (d / "config.json").write_text(json.dumps(export.tiny_config(vocab)))
    t = export.tiny_tensors(vocab)
    t["model.layers.0.mlp.up_proj.weight"][40, 17] = np.inf
    export.write_arrays(d / "model.safetensors", t)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for qtype in ("f16", "q4_k_m"):
        proc = qcpu("convert", d, out_dir / "o.gguf", "--type", qtype)
        one_line_error(proc, f"{d / 'model.safetensors'}: tensor model.layers.0.mlp.up_proj.weight has invalid "
                             f"data: value {40 * 32 + 17} (row 40, column 17) is +Inf")
        assert list(out_dir.iterdir()) == []
    t["model.layers.0.mlp.up_proj.weight"][40, 17] = 0.5  # the same checkpoint, clean, converts
    export.write_arrays(d / "model.safetensors", t)
    proc = qcpu("convert", d, out_dir / "o.gguf", "--type", "f16", "--quiet")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", [["generate", "hi", "-n", "2"], ["chat"], ["perplexity", "text.txt", "--ctx", "16"]])
def test_runtime_check_tensors_flag(tmp_path, command):
    """--check-tensors (llama.cpp's flag) refuses a file with a NaN scale before anything runs; without it
    the file loads, as in llama.cpp."""
    path = tmp_path / "m.gguf"
    write_tiny_qwen2(path, weight_type=T.Q8_0)
    (tmp_path / "text.txt").write_text("ab " * 100)
    _poke(path, _tensor_offset(path, "blk.0.attn_q.weight"), struct.pack("<H", 0x7C00))
    cmd, *rest = command
    rest = [str(tmp_path / r) if r.endswith(".txt") else r for r in rest]
    proc = subprocess.run([sys.executable, "-m", "qcpu.cli", cmd, str(path), *rest, "--check-tensors"],
                          capture_output=True, text=True, input="hi\n", timeout=600)
    one_line_error(proc, "tensor blk.0.attn_q.weight has invalid data: block 0 (row 0) has scale d = +Inf")
    assert proc.stdout == ""
    proc = subprocess.run([sys.executable, "-m", "qcpu.cli", cmd, str(path), *rest], capture_output=True,
                          text=True, input="hi\n", timeout=600)
    assert "invalid data" not in proc.stderr and "Traceback" not in proc.stderr
