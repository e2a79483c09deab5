"""What the quantization goldens are made of, shared by the tests and tools/record_quant_goldens.py (which
records them): llama.cpp's block quantizer reached through ctypes, and the tiny models and file types of the
whole-file goldens with the digest the tests compare.

Golden files: tests/golden/quant_blocks.npz (tests/test_quant_blocks.py) and
tests/golden/quant_tiny_llama.json (tests/test_quant_requantize.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T


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


# The tiny models of the file goldens: tests/tiny_model.write_tiny_qwen2 arguments.
TINY_MODELS = {
    "gqa4": dict(seed=1, dim=256, ffn_dim=512, n_layers=16, n_heads=4, n_kv_heads=1),
    "tied": dict(seed=2, dim=256, ffn_dim=768, n_layers=8, n_heads=4, n_kv_heads=2, tied=True),
    "odd_rows": dict(seed=3, dim=320, ffn_dim=640, n_layers=8, n_heads=5, n_kv_heads=1),
}
FILE_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M",
              "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
TYPE_CODES = {T.F32: "f", T.F16: "h", T.BF16: "b", T.Q4_0: "4", T.Q4_1: "5", T.Q5_0: "6", T.Q5_1: "7",
              T.Q8_0: "8", T.Q2_K: "B", T.Q3_K: "C", T.Q4_K: "D", T.Q5_K: "E", T.Q6_K: "F"}


def write_tiny_f16(path: Path, name: str) -> None:
    from tests.tiny_model import write_tiny_qwen2

    write_tiny_qwen2(path, weight_type=T.F16, **TINY_MODELS[name])


def file_digest(path: Path) -> tuple[str, str]:
    """(type codes in llama.cpp order, SHA-256 over the tensor bytes in that order)."""
    import hashlib

    from qcpu.gguf_file import GGUFFile
    from quant.recipes import llama_order

    g = GGUFFile(path)
    h = hashlib.sha256()
    codes = []
    for name in llama_order(g.tensors):
        codes.append(TYPE_CODES[T(g.tensors[name].ggml_type)])
        h.update(name.encode() + b"\0")
        h.update(g.raw(name).tobytes())
    return "".join(codes), h.hexdigest()
