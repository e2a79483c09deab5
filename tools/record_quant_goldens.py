"""Record golden quantized blocks and whole-file quantizations from llama.cpp itself, for the tests.

    /work/venv/bin/python tools/record_quant_goldens.py [MODEL.gguf]          # blocks
    /work/venv/bin/python tools/record_quant_goldens.py --files               # tiny-model files

Blocks (tests/golden/quant_blocks.npz, for tests/test_quant_blocks.py):
Input rows: real weights of the default model (dequantized to float32) plus a few edge-case rows (all
zero, constant, tiny values whose scales are float16 subnormals, huge values, one spike, one sign).
Each is quantized by llama.cpp's `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, NULL)` —
without an importance matrix that is quantize_row_*_ref, what `llama-quantize` writes — and stored with
the inputs in tests/golden/quant_blocks.npz, so the test needs neither the model nor llama.cpp.

Files (tests/golden/quant_tiny_llama.json, for tests/test_quant_requantize.py): three tiny random qwen2
F16 models from tests/tiny_model.py (one with 256-wide rows and GQA 4, one tied, one with rows that are
not whole 256-blocks) quantized by llama-cpp-python's llama_model_quantize to every file type we write:
each output's per-tensor types (llama.cpp order) and the SHA-256 of its tensor data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

# Shared with the tests, which must not import tools/.
from tests.quant_goldens import (FILE_TYPES, TINY_MODELS, TYPE_CODES, file_digest, ggml_lib,  # noqa: E402,F401
                                 ggml_quantize, write_tiny_f16)

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
OUT = ROOT / "tests" / "golden" / "quant_blocks.npz"
FILES_OUT = ROOT / "tests" / "golden" / "quant_tiny_llama.json"


def real_rows(model_path: str) -> dict[str, np.ndarray]:
    from qcpu.gguf_file import GGUFFile

    g = GGUFFile(model_path)

    def rows(name: str, first: int, count: int) -> np.ndarray:
        t = g.tensors[name]
        raw = np.array(g.raw(name)[first:first + count])
        return gguf.quants.dequantize(raw, T(t.ggml_type)).reshape(count, t.shape[0]).astype(np.float32)

    return {
        # Q6_K and Q4_K source rows, 4864 = 19 super-blocks
        "ffn_down_q6k": rows("blk.0.ffn_down.weight", 7, 1),
        "ffn_down_q4k": rows("blk.2.ffn_down.weight", 100, 1),
        # 896-wide rows, four joined into a 3584 row (14 super-blocks)
        "token_embd": rows("token_embd.weight", 9000, 4).reshape(1, -1),
    }


def edge_rows() -> np.ndarray:
    """8 rows of 256 that walk the corner cases of the block arithmetic."""
    rng = np.random.default_rng(3)
    r = np.zeros((8, 256), dtype=np.float32)
    r[1] = 0.5  # constant
    r[2] = rng.standard_normal(256) * 1e-6  # scales become float16 subnormals
    r[3] = rng.standard_normal(256) * 3e4  # near the float16 range
    r[4, 77] = -2.0  # a single spike in zeros
    r[5] = np.abs(rng.standard_normal(256))  # one sign only (mins = 0)
    r[6] = -np.abs(rng.standard_normal(256)) - 1.0  # negative, away from zero
    r[7] = rng.standard_normal(256).astype(np.float32)
    r[7, ::16] = 0  # zero sub-block starts, otherwise normal
    r[7, 32:64] = 0  # a whole zero 32-block inside a normal super-block
    return r


def record_files() -> None:
    import json
    import tempfile

    import llama_cpp

    from quant.recipes import file_type

    out: dict = {"type_codes": {t.name: c for t, c in TYPE_CODES.items()}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in TINY_MODELS:
            src = Path(tmp) / f"{name}.gguf"
            write_tiny_f16(src, name)
            entry = {"source_sha256": file_digest(src)[1], "files": {}}
            for ft_name in FILE_TYPES:
                dst = Path(tmp) / f"{name}.{ft_name}.gguf"
                p = llama_cpp.llama_model_quantize_default_params()
                p.ftype = int(file_type(ft_name).ftype)
                p.nthread = 2
                assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p) == 0
                codes, digest = file_digest(dst)
                entry["files"][ft_name] = {"types": codes, "sha256": digest}
                dst.unlink()
            out["models"][name] = entry
    FILES_OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {FILES_OUT} ({FILES_OUT.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    from qcpu.models import fetch_default_model

    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if sys.argv[1:] == ["--files"]:
        record_files()
        return
    model = sys.argv[1] if len(sys.argv) > 1 else str(fetch_default_model())
    lib = ggml_lib()
    inputs = real_rows(model)
    inputs["edge"] = edge_rows()
    arrays: dict[str, np.ndarray] = {f"in/{k}": v for k, v in inputs.items()}
    for qtype in TYPES:
        for name, x in inputs.items():
            arrays[f"{qtype.name}/{name}"] = ggml_quantize(lib, x, qtype)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
