"""Open and validate a GGUF file; metadata as plain Python values, tensors as zero-copy views of an mmap.

A GGUF file is input from strangers, so every count, length, offset and size is checked against the file
size and sane limits before anything is allocated or mapped, and every violation is a one-line
`QcpuError`. We parse the header ourselves (with the `gguf` package's constants and block-size table)
because `gguf.GGUFReader` builds a Python object per array element: ~35 s and ~500 MB to open the default
model's 151k-entry vocabulary, where this parser takes well under a second.

Layout (GGUF v2/v3, little-endian):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x     (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset
  string = u64 length + utf-8 bytes; array = u32 elem_type + u64 count + elements
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from qcpu.errors import QcpuError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Sane limits: far above any real model, far below what would exhaust memory.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_DIMS = 4
MAX_STRING = 1 << 26  # 64 MiB: chat templates are a few KiB, but be generous
MAX_ARRAY = 1 << 24  # 16M elements: vocabularies are ~150k-260k
MAX_ELEMENTS = 1 << 40

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (column) dimension
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[0]


class _Cursor:
    """Bounds-checked reads over the mapped bytes."""

    def __init__(self, buf: memoryview, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise QcpuError(f"truncated file: {what} at byte {self.pos} runs past end of file")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > MAX_STRING:
            raise QcpuError(f"{what}: string length {n} is not sane")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar("<I", what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise QcpuError(f"{what}: unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], what)
        if depth > 1:
            raise QcpuError(f"{what}: arrays nested too deeply")
        etype = self.value_type(what)
        count = self.scalar("<Q", what)
        if count > MAX_ARRAY:
            raise QcpuError(f"{what}: array of {count} elements is not sane")
        if etype in _NUMPY:
            itemsize = np.dtype(_NUMPY[etype]).itemsize
            start = self.take(count * itemsize, what)
            return np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=start).tolist()
        # Each element needs at least 8 bytes (a string's length): reject impossible counts up front.
        if count * 8 > self.size - self.pos:
            raise QcpuError(f"truncated file: {what} array runs past end of file")
        return [self.value(etype, what, depth + 1) for _ in range(count)]


class GGUFFile:
    """A validated, memory-mapped GGUF file. Tensors are views of the page cache, never copies."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise QcpuError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise QcpuError(f"{self.path}: is a directory, not a GGUF file")
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise QcpuError(f"{self.path}: not a GGUF file (only {size} bytes)")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise QcpuError(f"{self.path}: cannot read: {e.strerror}") from None
        self.size = size
        try:
            self._parse()
        except QcpuError as e:
            raise QcpuError(f"{self.path}: {e}") from None

    def _parse(self) -> None:
        cur = _Cursor(memoryview(self._mmap), self.size)
        if bytes(cur.buf[0:4]) != MAGIC:
            raise QcpuError("not a GGUF file (bad magic)")
        cur.take(4, "magic")
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise QcpuError(f"unsupported GGUF version {self.version} (expected 2 or 3)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_tensors > MAX_TENSORS:
            raise QcpuError(f"tensor count {n_tensors} is not sane")
        if n_kv > MAX_KV:
            raise QcpuError(f"metadata count {n_kv} is not sane")

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.value_type(f"metadata {key!r}")
            self.metadata[key] = cur.value(vtype, f"metadata {key!r}")

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 16:
            raise QcpuError(f"general.alignment {alignment!r} is not a sane power of two")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("<I", f"tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise QcpuError(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(cur.scalar("<Q", f"tensor {name}") for _ in range(n_dims))
            raw_type = cur.scalar("<I", f"tensor {name}")
            offset = cur.scalar("<Q", f"tensor {name}")
            infos.append((name, shape, raw_type, offset))

        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, raw_type, offset in infos:
            if name in self.tensors:
                raise QcpuError(f"tensor {name} appears twice")
            if any(d == 0 or d > MAX_ELEMENTS for d in shape):
                raise QcpuError(f"tensor {name} has a bad shape {list(shape)}")
            n_elements = int(np.prod(shape, dtype=object))
            if n_elements > MAX_ELEMENTS:
                raise QcpuError(f"tensor {name} has {n_elements} elements, not sane")
            try:
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
            except (ValueError, KeyError):
                raise QcpuError(f"tensor {name} has unknown type id {raw_type}") from None
            if shape[0] % block_size:
                raise QcpuError(f"tensor {name}: row of {shape[0]} is not a whole number of blocks")
            if offset % alignment:
                raise QcpuError(f"tensor {name} data offset {offset} is not aligned to {alignment}")
            nbytes = n_elements // block_size * type_size
            start = data_start + offset
            if start + nbytes > self.size:
                raise QcpuError(f"tensor {name} extends past end of file")
            self.tensors[name] = TensorInfo(name, shape, raw_type, start, nbytes)

        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise QcpuError(f"tensors {name_a} and {name_b} overlap")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.metadata.get(key)
        if value is None:
            raise QcpuError(f"{self.path}: metadata {key} is missing")
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise QcpuError(f"{self.path}: metadata {key} has the wrong type")
        return value

    def raw(self, name: str) -> np.ndarray:
        """A tensor's bytes as uint8[rows, row_bytes], a read-only view of the mapped file."""
        info = self.tensors[name]
        data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(info.rows, info.nbytes // info.rows)
