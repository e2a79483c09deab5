"""Record golden quantized blocks from llama.cpp itself, for tests/test_quant_blocks.py.

    /work/venv/bin/python tools/record_quant_goldens.py [MODEL.gguf]

Input rows: real weights of the default model (dequantized to float32) plus a few edge-case rows (all
zero, constant, tiny values whose scales are float16 subnormals, huge values, one spike, one sign).
Each is quantized by llama.cpp's `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, NULL)` —
without an importance matrix that is quantize_row_*_ref, what `llama-quantize` writes — and stored with
the inputs in tests/golden/quant_blocks.npz, so the test needs neither the model nor llama.cpp.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
OUT = ROOT / "tests" / "golden" / "quant_blocks.npz"


def ggml_lib() -> ctypes.CDLL:
    """libggml-base from the installed llama-cpp-python (the reference build)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype: T) -> np.ndarray:
    """float32[rows, cols] -> llama.cpp's blocks, uint8[rows, row_bytes] (no importance matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((x.shape[0], x.shape[1] // block * type_size), dtype=np.uint8)
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert n == out.nbytes, (n, out.nbytes)
    return out


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


def main() -> None:
    from qcpu.models import default_model_path

    model = sys.argv[1] if len(sys.argv) > 1 else str(default_model_path())
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
