"""Write a copy of a GGUF with rope scaling keys added (for the YaRN tests and tools/record_rope_goldens.py).

The copy keeps every tensor byte: the header is re-rendered with the extra keys (tests/gguf_mutations.py's
independent GGUF walker), and the tensor data, whose offsets are relative to the data section, is copied
after it unchanged. With `data=False` the tail is left sparse (zeros, no disk): enough to read the config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from tests.gguf_mutations import KV, TensorRec, enc_scalar, enc_str, read_doc, render

YARN_4X = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
           "rope.scaling.original_context_length": 32768}  # Qwen2.5's 128K recipe


def _encode(value) -> tuple[int, bytes]:
    if isinstance(value, str):
        return V.STRING, enc_str(value)
    if isinstance(value, float):
        return V.FLOAT32, enc_scalar(V.FLOAT32, value)
    if isinstance(value, int) and not isinstance(value, bool):
        return V.UINT32, enc_scalar(V.UINT32, value)
    raise TypeError(f"cannot encode {value!r}")


def write_with_metadata(src: str | Path, dst: str | Path, arch_keys: dict, data: bool = True,
                        tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Copy `src` to `dst` with `arch_keys` ({"rope.scaling.type": "yarn", ...}, prefixed with the file's
    architecture) added or replaced; floats are written as FLOAT32, ints as UINT32, strings as STRING.
    `tensors`: float32 tensors appended (a small file only: its data is then rewritten in memory)."""
    src, dst = Path(src), Path(dst)
    doc = read_doc(src, keep_data=bool(tensors), max_header=None if tensors else 32 << 20)
    arch = doc.arch()
    for suffix, value in arch_keys.items():
        key = f"{arch}.{suffix}".encode()
        vtype, body = _encode(value)
        doc.kvs = [kv for kv in doc.kvs if kv.key != key] + [KV(key, vtype, body)]
    if tensors:
        blob = bytearray(doc.data)
        for name, array in tensors.items():
            blob += b"\0" * ((-len(blob)) % doc.alignment)
            array = np.ascontiguousarray(array, dtype="<f4")
            doc.tensors.append(TensorRec(name.encode(), list(array.shape[::-1]), int(T.F32), len(blob)))
            blob += array.tobytes()
        header, _ = render(doc)
        dst.write_bytes(header + bytes(blob))
        return dst
    header, _ = render(doc)
    data_start = src.stat().st_size - doc.data_len
    with open(dst, "wb") as out:
        out.write(header)
        if data:
            with open(src, "rb") as f:
                f.seek(data_start)
                shutil.copyfileobj(f, out, 16 << 20)
        else:
            out.truncate(len(header) + doc.data_len)
    return dst
