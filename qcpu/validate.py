"""Find NaN and Inf in tensor data: llama.cpp's `--check-tensors` (ggml_validate_row_data).

A GGUF file can hold a block whose fp16 scale is NaN or Inf; it loads and runs, and the model's output
silently changes. llama.cpp validates the data when asked (`--check-tensors`) and always in
llama-quantize (its model loader is opened with check_tensors=true, so every input range it loads is
validated, and every quantized output chunk is validated again). The rule, from ggml-quants.c
ggml_validate_row_data of the llama.cpp vendored by llama-cpp-python 0.3.36:

  F32 / F16 / BF16    every value: an all-ones exponent (Inf when the mantissa is 0, NaN otherwise)
  Q4_0 Q5_0 Q8_0      the fp16 block scale d
  Q4_1 Q5_1           d and the fp16 block minimum m
  Q3_K Q6_K           the fp16 super-block scale d
  Q2_K Q4_K Q5_K      d and dmin
  (the quants themselves are small integers: any bit pattern is a valid number)

It reports the first bad block (for the float types the "block" is the value's index), checking d before
m within a block. Here every check is a NumPy comparison of the exponent bits over a strided uint16 (or
uint32) view of the raw bytes: no decoding, no Numba, a fraction of a second for a 0.5B model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from qcpu.errors import QcpuError
from qcpu.kernels import k_quants, legacy

# Scale fields of each block type: (field name, byte offset in the block), in the order llama.cpp checks
# them. The offsets are the kernels' own layout constants (legacy: d first, then m for the *_1 types;
# k_quants._TYPES: the d and dmin offsets its matvec reads).
_LEGACY_FIELDS = {t: (("d", 0), ("m", 2)) if layout[1] else (("d", 0),) for t, layout in legacy.LAYOUTS.items()}
_K_FIELDS = {T[kind.upper()]: (("d", d), ("dmin", dmin)) if dmin is not None else (("d", d),)
             for kind, (_, _, d, dmin) in k_quants._TYPES.items()}
SCALE_FIELDS: dict[T, tuple[tuple[str, int], ...]] = {**_LEGACY_FIELDS, **_K_FIELDS}

# Float types: (unsigned view dtype, exponent mask). A value is NaN or Inf iff its exponent is all ones.
_FLOAT_BITS = {T.F32: (np.dtype("<u4"), 0x7F800000), T.F16: (np.dtype("<u2"), 0x7C00),
               T.BF16: (np.dtype("<u2"), 0x7F80)}
_HALF_EXP = 0x7C00

SUPPORTED = frozenset(SCALE_FIELDS) | frozenset(_FLOAT_BITS)

_CHUNK = 1 << 22  # items compared at a time: bounds the temporaries (a few MiB) whatever the tensor size


@dataclass(frozen=True)
class Invalid:
    """The first NaN/Inf found: `index` is the block (float types: value) index from the start of the
    data given; `field` is "d", "m", "dmin" or "value"; `value` the float32 it decodes to (nan/±inf)."""

    index: int
    field: str
    value: float

    @property
    def kind(self) -> str:
        return "NaN" if np.isnan(self.value) else ("+Inf" if self.value > 0 else "-Inf")


def _first_exponent_all_ones(items: np.ndarray, mask: int) -> int:
    """Index of the first item (unsigned ints) whose bits under `mask` are all set; -1 if none."""
    tmp = np.empty(min(_CHUNK, items.size), dtype=items.dtype)
    hit = np.empty(tmp.size, dtype=bool)
    for i0 in range(0, items.size, _CHUNK):
        part = items[i0:i0 + _CHUNK]
        n = part.size
        np.bitwise_and(part, items.dtype.type(mask), out=tmp[:n])
        np.equal(tmp[:n], items.dtype.type(mask), out=hit[:n])
        if hit[:n].any():
            return i0 + int(np.argmax(hit[:n]))
    return -1


def _as_bytes(data: np.ndarray) -> np.ndarray:
    """Any array's bytes as a flat C-contiguous uint8 array (a view when it already is contiguous)."""
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _decode(bits: int, ggml_type: T) -> float:
    if ggml_type == T.F32:
        return float(np.array([bits], dtype="<u4").view(np.float32)[0])
    if ggml_type == T.BF16:
        return float(np.array([bits << 16], dtype="<u4").view(np.float32)[0])
    return float(np.array([bits], dtype="<u2").view(np.float16)[0])


def find_invalid(data: np.ndarray, ggml_type: int) -> Optional[Invalid]:
    """The first NaN/Inf in raw tensor data, or None when it is clean (ggml_validate_row_data).

    data: the tensor's bytes, any C-contiguous array (uint8[rows, row_bytes] from GGUFFile.raw, or the
    float32/float16 values themselves for the float types); its size must be a whole number of blocks.
    ggml_type: one of the 13 types qcpu runs (F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K).
    Raises QcpuError for another type or a size that is not whole blocks."""
    try:
        t = T(ggml_type)
    except ValueError:
        t = None
    if t not in SUPPORTED:
        label = t.name if t is not None else f"type id {ggml_type}"
        raise QcpuError(f"cannot check tensors of type {label} (qcpu checks {', '.join(sorted(x.name for x in SUPPORTED))})")
    raw = _as_bytes(data)
    type_size = GGML_QUANT_SIZES[t][1]
    if raw.size % type_size:
        raise QcpuError(f"{raw.size} bytes is not a whole number of {t.name} blocks ({type_size} bytes each)")
    if t in _FLOAT_BITS:
        dtype, mask = _FLOAT_BITS[t]
        values = raw.view(dtype)
        i = _first_exponent_all_ones(values, mask)
        return None if i < 0 else Invalid(i, "value", _decode(int(values[i]), t))
    nb = raw.size // type_size
    if nb == 0:
        return None
    best: Optional[Invalid] = None
    for field, offset in SCALE_FIELDS[t]:
        # The field of every block: a strided uint16 view straight over the bytes (no copy).
        halves = np.ndarray((nb,), dtype="<u2", buffer=raw, offset=offset, strides=(type_size,))
        end = best.index if best is not None else nb  # d is checked first: m only wins if strictly earlier
        i = _first_exponent_all_ones(halves[:end], _HALF_EXP)
        if i >= 0:
            best = Invalid(i, field, _decode(int(halves[i]), T.F16))
    return best


def describe(bad: Invalid, row_items: int, first_row: int = 0) -> str:
    """`bad` as words: 'block 7 (row 0) has scale d = NaN' or 'value 5 (row 1, column 3) is +Inf'.

    row_items: blocks per row (values per row for the float types) of the data `bad` was found in;
    first_row: the row that data starts at, so slabs report tensor-wide positions."""
    index = first_row * row_items + bad.index
    row, col = divmod(index, row_items)
    if bad.field == "value":
        return f"value {index} (row {row}, column {col}) is {bad.kind}"
    return f"block {index} (row {row}) has scale {bad.field} = {bad.kind}"


def check_rows(data: np.ndarray, ggml_type: int, what: str, first_row: int = 0) -> None:
    """Raise QcpuError('WHAT has invalid data: block 7 (row 3) has scale d = NaN') if `data` holds a NaN
    or Inf where ggml_validate_row_data looks (see find_invalid).

    data: rows of one tensor, [rows, row_bytes] uint8 or [rows, cols] float32 (a 1-D array is one row);
    what: how to name the tensor in the message; first_row: the tensor row data[0] is (for slabs)."""
    bad = find_invalid(data, ggml_type)
    if bad is None:
        return
    t = T(ggml_type)
    row_bytes = data.shape[-1] * data.dtype.itemsize
    per_row = row_bytes // GGML_QUANT_SIZES[t][1]  # blocks (float types: values) per row
    raise QcpuError(f"{what} has invalid data: {describe(bad, per_row, first_row)}")


def _gguf_of(model):
    """GGUFFile from a GGUFFile, a Qwen2Model (.file) or an Engine (.model.file)."""
    from qcpu.gguf_file import GGUFFile

    for candidate in (model, getattr(model, "file", None), getattr(getattr(model, "model", None), "file", None)):
        if isinstance(candidate, GGUFFile):
            return candidate
    raise TypeError(f"check_tensors wants a GGUFFile, Qwen2Model or Engine, not {type(model).__name__}")


def check_tensors(model, names: Optional[Iterable[str]] = None) -> None:
    """Validate every tensor of an opened model, as llama.cpp's `--check-tensors` does.

    model: a qcpu.gguf_file.GGUFFile, a qcpu.model.Qwen2Model or a qcpu.generate.Engine (its file is
    read through the existing memory map; nothing is copied or kept). names: only these tensors
    (default: all of the file's, in file order, like llama_model_loader::load_all_data).
    Raises QcpuError with one line naming the file, the first bad tensor, the block (or value) index,
    its row and the field, e.g.
        model.gguf: tensor blk.0.attn_q.weight has invalid data: block 12 (row 0) has scale d = NaN
    Follows ggml_validate_row_data (ggml-quants.c) over each tensor's whole data, as the loader calls it."""
    f = _gguf_of(model)
    for name in (f.tensors if names is None else names):
        info = f.tensors[name]
        check_rows(f.raw(name), info.ggml_type, f"{f.path}: tensor {name}")
