"""GGUF -> GGUF requantization (`qcpu quantize`), the way llama-quantize does it, streaming.

For each tensor, in llama.cpp's order: if its target type (quant/recipes.py) is its current type the
bytes are copied; otherwise slabs of rows are read with plain reads (no mmap, so resident memory stays
at one slab however big the model), dequantized to float32 with qcpu's kernels, quantized with
quant/quantizers.py and appended to the output. Metadata is copied with its value types;
general.quantization_version and general.file_type are set as llama.cpp sets them.

Like llama-quantize (llama_model_quantize_impl in src/llama-quant.cpp), it refuses to requantize a tensor
that is already quantized (any type but F32/F16/BF16: ggml_is_quantized) unless allow_requantize is
given, and validates the data (ggml_validate_row_data, qcpu/validate.py): every input slab as it is read
(llama-quantize opens its model loader with check_tensors=true) and every quantized output slab.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType

from qcpu.errors import QcpuError
from qcpu.gguf_file import GGUFFile
from qcpu.validate import check_rows, describe, find_invalid
from quant import recipes
from quant.quantizers import quantizer_for
from quant.writer import StreamingGGUFWriter, check_output_path, tensor_nbytes

# Values per slab: 16M float32 = 64 MiB of dequantized rows at a time.
SLAB_VALUES = 1 << 24
GGML_QNT_VERSION = 2
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

Progress = Callable[[str, int], None]  # (tensor name, bytes of input consumed since the last call)


def dequantize_rows(raw: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """uint8[rows, row_bytes] of any type qcpu reads -> float32[rows, cols]."""
    if ggml_type == T.F32:
        return raw.view(np.float32).reshape(raw.shape[0], cols)
    from qcpu.kernels import dequantize

    return dequantize(np.ascontiguousarray(raw), ggml_type, cols)


class TensorReader:
    """Rows of a tensor read into a fresh buffer (pread), never mapped."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def rows(self, info, first: int, count: int) -> np.ndarray:
        row_bytes = info.nbytes // info.rows
        buf = np.empty((count, row_bytes), dtype=np.uint8)
        view = memoryview(buf).cast("B")
        pos, want = info.offset + first * row_bytes, count * row_bytes
        got = 0
        while got < want:
            n = os.preadv(self.fd, [view[got:]], pos + got)
            if n <= 0:
                raise QcpuError(f"{self.path}: file ended while reading {info.name}")
            got += n
        return buf

    def close(self) -> None:
        os.close(self.fd)


def output_metadata(src: GGUFFile, ftype: int) -> list[tuple[str, object, GGUFValueType, Optional[GGUFValueType]]]:
    """The input's metadata, in order, with llama-quantize's edits."""
    items = [(k, v, *src.value_types[k]) for k, v in src.metadata.items()
             if k not in _SPLIT_KEYS and k not in ("general.quantization_version", "general.file_type")]
    items.append(("general.quantization_version", GGML_QNT_VERSION, GGUFValueType.UINT32, None))
    items.append(("general.file_type", int(ftype), GGUFValueType.UINT32, None))
    return items


# ggml_is_quantized() is false for these (type_traits in ggml.c); every other type qcpu reads is quantized.
UNQUANTIZED = frozenset({T.F32, T.F16, T.BF16})


def check_requantize(plan: list[tuple[str, T]], current: dict[str, T]) -> None:
    """Refuse, as llama-quantize does without --allow-requantize, to change the type of a tensor that is
    already quantized (llama_model_quantize_impl: "requantizing from type %s is disabled"). A tensor
    whose target is its own type is copied and is fine. Raises QcpuError naming the first such tensor
    in write order (the one llama-quantize would stop at)."""
    for name, new in plan:
        cur = current[name]
        if new != cur and cur not in UNQUANTIZED:
            why = (f"requantizing it to {new.name} loses quality" if new not in UNQUANTIZED else
                   f"converting it to {new.name} cannot restore what quantizing lost")
            raise QcpuError(f"{name} is already {cur.name}: {why}; pass --allow-requantize to do it anyway")


def check_output(data: np.ndarray, ggml_type: T, name: str, first_row: int) -> None:
    """Validate quantized rows uint8[rows, row_bytes] of tensor `name` starting at row `first_row`, as
    llama_tensor_quantize_impl does after each chunk ("quantized data validation failed"). Finite input
    can still overflow an fp16 field (a weight beyond 65504 in F16, a block scale beyond it in Q8_0)."""
    bad = find_invalid(data, ggml_type)
    if bad is not None:
        per_row = data.shape[1] // GGML_QUANT_SIZES[ggml_type][1]
        raise QcpuError(f"tensor {name}: quantized data validation failed ({describe(bad, per_row, first_row)}): "
                        f"its values are too large for {ggml_type.name}")


def requantize(src_path: str | os.PathLike, out_path: str | os.PathLike, type_name: str, force: bool = False,
               pure: bool = False, progress: Optional[Callable[[list], Progress]] = None,
               allow_requantize: bool = False) -> dict:
    """Write OUT with the tensors of SRC in the file type `type_name`. Returns a summary dict.

    `progress`, if given, is called once with the plan [(name, input bytes, old type, new type)] and
    returns a callback fed as input bytes are consumed. Raises QcpuError (OUT untouched, no temporary
    file left) for bad arguments or input, for an already-quantized tensor whose type would change
    unless `allow_requantize` (llama-quantize --allow-requantize), and for NaN/Inf in the input data or
    in the quantized output (llama-quantize's ggml_validate_row_data checks)."""
    src_path, out_path = Path(src_path), Path(out_path)
    ft = recipes.file_type(type_name)
    check_output_path(out_path, force)
    if out_path.exists() and out_path.resolve() == src_path.resolve():
        raise QcpuError(f"{out_path}: output would overwrite the input")
    src = GGUFFile(src_path)
    try:
        arch = src.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise QcpuError(f"{src_path}: metadata general.architecture is missing")
        facts = recipes.ModelFacts.from_metadata(src.metadata)
        tensors = {name: (info.shape, info.ggml_type) for name, info in src.tensors.items()}
        plan = recipes.plan(tensors, facts, ft, pure=pure)
        if not allow_requantize:  # before any work: llama-quantize only finds out halfway through writing
            check_requantize(plan, {name: T(info.ggml_type) for name, info in src.tensors.items()})
        from qcpu.kernels import kernel_for

        for name, new in plan:
            # Can we read it (and so validate it, copied or not)? One-line error before any work.
            kernel_for(src.tensors[name].ggml_type)
            if new != T(src.tensors[name].ggml_type):
                quantizer_for(new)

        need = sum(tensor_nbytes(src.tensors[n].shape, t) for n, t in plan)
        free = shutil.disk_usage(out_path.parent).free
        if need > free:
            raise QcpuError(f"{out_path.parent}: needs {need / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB free")
    except BaseException:
        src.close()
        raise

    tick = progress([(n, src.tensors[n].nbytes, T(src.tensors[n].ggml_type), t) for n, t in plan]) \
        if progress else (lambda name, n: None)
    reader = TensorReader(src_path)
    in_bytes = out_bytes = 0
    try:
        with StreamingGGUFWriter(out_path, arch, force) as w:
            for key, value, vtype, etype in output_metadata(src, ft.ftype):
                w.add_kv(key, value, vtype, etype)
            for name, new in plan:
                w.add_tensor(name, src.tensors[name].shape, new)
            w.begin()
            for name, new in plan:
                info = src.tensors[name]
                cur = T(info.ggml_type)
                slab = max(1, SLAB_VALUES // info.cols)
                for r0 in range(0, info.rows, slab):
                    n = min(slab, info.rows - r0)
                    raw = reader.rows(info, r0, n)
                    check_rows(raw, cur, f"{src_path}: tensor {name}", first_row=r0)
                    if new == cur:
                        w.write(raw)
                        out_bytes += raw.nbytes
                    else:
                        with np.errstate(over="ignore"):  # overflow to Inf is caught, in one line, next
                            q = quantizer_for(new).quantize_rows(dequantize_rows(raw, cur, info.cols))
                        check_output(q, new, name, r0)
                        w.write(q)
                        out_bytes += q.nbytes
                    tick(name, raw.nbytes)
                    in_bytes += raw.nbytes
                w.end_tensor()
    finally:
        reader.close()
        src.close()
    return {"tensors": len(plan), "input_bytes": in_bytes, "output_bytes": out_bytes,
            "types": {name: t.name for name, t in plan}, "file_type": ft.name}
