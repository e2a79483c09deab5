"""Open and validate a GGUF file; metadata as plain Python values, tensors as zero-copy views of an mmap.

A GGUF file is input from strangers, so every count, length, offset, size and type id is checked against
the file size and sane limits before anything is allocated or mapped, and every violation is a one-line
`QcpuError` (`model.gguf: tensor blk.3.attn_q.weight extends past end of file`). We parse the header
ourselves (with the `gguf` package's constants and block-size table) because `gguf.GGUFReader` builds a
Python object per array element: ~35 s and ~500 MB to open the default model's 151k-entry vocabulary,
where this parser takes ~0.15 s (string arrays are decoded by one tight loop over the mapped bytes).

Layout (GGUF v2/v3, little-endian):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x     (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset
  string = u64 length + utf-8 bytes; array = u32 elem_type + u64 count + elements

What is checked (each failure names the key or tensor):
  * header: magic, version 2/3 (big-endian files recognised and refused), counts within limits;
  * metadata: keys valid UTF-8, non-empty, unique; value type ids known; string lengths and array counts
    within limits and inside the file; bools 0 or 1; arrays nested at most one level; a budget on the
    total number of array elements (so a small file cannot make us build a huge Python list);
    well-known keys (`general.*`, `tokenizer.*`, `<arch>.block_count`, ...) have the type llama.cpp
    expects, and float hyper-parameters are finite;
  * tensors: names valid UTF-8, shorter than 64 bytes, unique; 1-4 dimensions, none zero; element count
    within limits; type id known and the row a whole number of blocks; data offset aligned, range inside
    the file and not overlapping another tensor.
String *values* that are not valid UTF-8 are decoded with U+FFFD replacement (the file still loads);
keys and tensor names must be valid.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
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
MAX_KEY = 1 << 16          # bytes in a metadata key
MAX_NAME = 64              # a tensor name must be shorter (llama.cpp's GGML_MAX_NAME)
MAX_STRING = 1 << 24       # 16 MiB in one string: chat templates are a few KiB, but be generous
MAX_STRING_TOTAL = 1 << 26  # 64 MiB of string bytes over all metadata (the default model has ~5 MiB)
MAX_ARRAY = 1 << 21        # 2M elements in one array: vocabularies are ~150k-260k
MAX_ARRAY_TOTAL = 1 << 22  # 4M elements over all arrays of one file (the default model has ~455k)
MAX_NESTED = 1 << 16       # inner arrays over all arrays of arrays of one file
MAX_ELEMENTS = 1 << 40     # elements in one tensor
MAX_ALIGNMENT = 1 << 16

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

V = GGUFValueType
_INTS = frozenset({V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64})
_UINTS = frozenset({V.UINT8, V.UINT16, V.UINT32, V.UINT64})
_FLOATS = frozenset({V.FLOAT32, V.FLOAT64})

# Well-known keys and the types llama.cpp accepts for them: (kinds allowed for a scalar, element kinds
# allowed for an array). A mistyped known key would otherwise surface later as a confusing error (or
# none at all: a bool where a count belongs is an int to Python).
_SCALAR_RULE = {"int": _INTS, "uint": _UINTS, "float": _FLOATS, "str": {V.STRING}, "bool": {V.BOOL}}
_RULE_TEXT = {"int": "integer", "uint": "unsigned integer", "float": "float", "str": "string", "bool": "bool"}
_KNOWN: dict[str, tuple[str | None, str | None]] = {
    "general.architecture": ("str", None), "general.name": ("str", None),
    "general.alignment": ("uint", None), "general.file_type": ("uint", None),
    "general.quantization_version": ("uint", None),
    "tokenizer.ggml.model": ("str", None), "tokenizer.ggml.pre": ("str", None),
    "tokenizer.ggml.tokens": (None, "str"), "tokenizer.ggml.merges": (None, "str"),
    "tokenizer.ggml.token_type": (None, "int"), "tokenizer.ggml.scores": (None, "float"),
    "tokenizer.ggml.add_bos_token": ("bool", None), "tokenizer.ggml.add_eos_token": ("bool", None),
    "tokenizer.ggml.add_space_prefix": ("bool", None), "tokenizer.chat_template": ("str", None),
}
_SHORT_NAMES = {"general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre"}  # identifiers
_KNOWN_ARCH = {  # "<general.architecture>.<suffix>"
    "block_count": ("uint", None), "context_length": ("uint", None), "embedding_length": ("uint", None),
    "feed_forward_length": ("uint", "uint"), "attention.head_count": ("uint", "uint"),
    "attention.head_count_kv": ("uint", "uint"), "rope.freq_base": ("float", None),
    "attention.layer_norm_rms_epsilon": ("float", None), "rope.dimension_count": ("uint", None),
}


def _show(name: str, limit: int = 80) -> str:
    """A key or tensor name as it can appear inside a one-line message."""
    if name.isprintable() and " " not in name and len(name) <= limit:
        return name
    r = repr(name)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (column) dimension
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[0]


class _Reader:
    """Bounds-checked reads over the mapped bytes (the mmap itself: no buffer exports left behind)."""

    def __init__(self, data: mmap.mmap, size: int):
        self.data, self.size, self.pos = data, size, 0
        self.array_budget = MAX_ARRAY_TOTAL
        self.string_budget = MAX_STRING_TOTAL
        self.nested_budget = MAX_NESTED

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise QcpuError(f"truncated file: {what} at byte {self.pos} runs past end of file")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.data, self.take(8, what))[0]

    def name(self, what: str, limit: int) -> str:
        """A key or tensor name: valid UTF-8, at most limit-1 bytes (counted in the string budget)."""
        n = self.u64(what)
        if n >= limit:
            raise QcpuError(f"{what}: name of {n} bytes is too long (limit {limit - 1})")
        start = self.take(n, what)
        self._spend_string_bytes(n, what)
        try:
            return self.data[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise QcpuError(f"{what}: name is not valid UTF-8") from None

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > MAX_STRING:
            raise QcpuError(f"{what}: string length {n} is not sane")
        start = self.take(n, what)
        self._spend_string_bytes(n, what)
        return self.data[start:start + n].decode("utf-8", "replace")

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise QcpuError(f"{what}: unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, nested: bool = False) -> tuple[Any, GGUFValueType | None]:
        """(value, element type if an array)."""
        if vtype == V.STRING:
            return self.string(what), None
        if vtype == V.BOOL:
            raw = self.data[self.take(1, what)]
            if raw > 1:
                raise QcpuError(f"{what}: bool value {raw} is not 0 or 1")
            return bool(raw), None
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0], None
        # An array.
        etype = self.value_type(what)
        count = self.u64(what)
        if count > MAX_ARRAY:
            raise QcpuError(f"{what}: array of {count} elements is not sane")
        self.array_budget -= count
        if self.array_budget < 0:
            raise QcpuError(f"{what}: more than {MAX_ARRAY_TOTAL} array elements in the metadata, not sane")
        if etype in _NUMPY:
            itemsize = np.dtype(_NUMPY[etype]).itemsize
            start = self.take(count * itemsize, what)
            arr = np.frombuffer(self.data, dtype=_NUMPY[etype], count=count, offset=start)
            if etype == V.BOOL:
                if count and int(arr.max()) > 1:
                    raise QcpuError(f"{what}: bool array holds a value that is not 0 or 1")
                arr = arr.astype(bool)
            values = arr.tolist()
            del arr  # release the buffer export on the mmap
            return values, etype
        if etype == V.STRING:
            return self._strings(count, what), etype
        # An array of arrays: one level allowed (element arrays may not hold arrays).
        if nested:
            raise QcpuError(f"{what}: arrays nested too deeply")
        self.nested_budget -= count
        if self.nested_budget < 0:
            raise QcpuError(f"{what}: more than {MAX_NESTED} nested arrays in the metadata, not sane")
        if count * 12 > self.size - self.pos:  # each element needs a u32 type + u64 count
            raise QcpuError(f"truncated file: {what} array runs past end of file")
        return [self.value(etype, what, nested=True)[0] for _ in range(count)], etype

    def _spend_string_bytes(self, n: int, what: str) -> None:
        self.string_budget -= n
        if self.string_budget < 0:
            raise QcpuError(f"{what}: more than {MAX_STRING_TOTAL >> 20} MiB of strings in the metadata, not sane")

    def _strings(self, count: int, what: str) -> list[str]:
        """An array of `count` strings: one tight loop, every length checked before its bytes are read.
        Strict UTF-8 decoding is the fast path; an element that is not valid UTF-8 is redone with
        U+FFFD replacement and the loop carries on after it."""
        data, size, pos = self.data, self.size, self.pos
        if count * 8 > size - pos:  # each element needs at least its u64 length
            raise QcpuError(f"truncated file: {what} array runs past end of file")
        # The array's string bytes count against the metadata's string budget: so no element may end
        # past `limit`, whichever of the file's end and the budget comes first (one comparison each).
        limit = min(size, pos + 8 * count + self.string_budget)
        start_pos = pos
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        k = 0
        while True:
            try:
                for k in range(k, count):
                    n = unpack(data, pos)[0]
                    end = pos + 8 + n
                    if end > limit:
                        if end > size:
                            raise QcpuError(f"truncated file: {what} element #{k} runs past end of file")
                        self._spend_string_bytes(self.string_budget + 1, what)  # over budget: raises
                    out[k] = data[pos + 8:end].decode()
                    pos = end
                self._spend_string_bytes(pos - start_pos - 8 * count, what)
                self.pos = pos
                return out
            except UnicodeDecodeError:
                out[k] = data[pos + 8:end].decode("utf-8", "replace")
                pos = end
                k += 1
            except struct.error:  # the length itself runs past the end
                raise QcpuError(f"truncated file: {what} element #{k} runs past end of file") from None


class GGUFFile:
    """A validated, memory-mapped GGUF file. Tensors are views of the page cache, never copies.

    Attributes: `path`, `size`, `version`, `metadata` (key -> str/int/float/bool or a list of them),
    `value_types` (key -> (GGUFValueType, element type or None)), `alignment`, `data_start`, `tensors`
    (name -> TensorInfo, in file order)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mmap = None
        self._fd = None  # kept open for read_rows
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block us
        except FileNotFoundError:
            raise QcpuError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise QcpuError(f"{self.path}: is a directory, not a GGUF file") from None
        except OSError as e:
            raise QcpuError(f"{self.path}: cannot read: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise QcpuError(f"{self.path}: is a directory, not a GGUF file")
            if not stat.S_ISREG(st.st_mode):
                raise QcpuError(f"{self.path}: not a regular file")
            size = st.st_size
            if size < 24:
                raise QcpuError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            os.close(fd)
            raise QcpuError(f"{self.path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.size = size
        try:
            self._parse()
        except QcpuError as e:
            self.close()
            raise QcpuError(f"{self.path}: {e}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unmap the file. Arrays from `raw()` must be gone first (else the mapping stays until they are)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views still alive: the mapping is released with the last of them
                return
            self._mmap = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _parse(self) -> None:
        r = _Reader(self._mmap, self.size)
        magic = self._mmap[0:4]
        if magic != MAGIC:
            raise QcpuError("not a GGUF file (bad magic)")
        r.take(4, "magic")
        self.version = r.u32("version")
        if self.version not in (2, 3):
            if self.version in (2 << 24, 3 << 24):
                raise QcpuError("big-endian GGUF files are not supported")
            raise QcpuError(f"unsupported GGUF version {self.version} (expected 2 or 3)")
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        if n_tensors > MAX_TENSORS:
            raise QcpuError(f"tensor count {n_tensors} is not sane")
        if n_kv > MAX_KV:
            raise QcpuError(f"metadata count {n_kv} is not sane")

        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for i in range(n_kv):
            key = r.name(f"metadata key #{i}", MAX_KEY)
            what = f"metadata {_show(key)}"
            if not key:
                raise QcpuError(f"metadata key #{i} is empty")
            if key in self.metadata:
                raise QcpuError(f"{what} appears twice")
            vtype = r.value_type(what)
            self.metadata[key], etype = r.value(vtype, what)
            self.value_types[key] = (vtype, etype)
        self._check_known_keys()

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise QcpuError(f"general.alignment {alignment!r} is not a sane power of two")
        self.alignment = alignment

        infos = []
        for i in range(n_tensors):
            name = r.name(f"tensor name #{i}", MAX_NAME)
            what = f"tensor {_show(name)}"
            n_dims = r.u32(what)
            if not 1 <= n_dims <= MAX_DIMS:
                raise QcpuError(f"{what} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            shape = tuple(r.u64(what) for _ in range(n_dims))
            raw_type = r.u32(what)
            offset = r.u64(what)
            infos.append((name, what, shape, raw_type, offset))

        self.data_start = data_start = -(-r.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, what, shape, raw_type, offset in infos:
            if name in self.tensors:
                raise QcpuError(f"{what} appears twice")
            if any(d == 0 or d > MAX_ELEMENTS for d in shape):
                raise QcpuError(f"{what} has a bad shape {list(shape)}")
            n_elements = math.prod(shape)
            if n_elements > MAX_ELEMENTS:
                raise QcpuError(f"{what} has {n_elements} elements, not sane")
            try:
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
            except (ValueError, KeyError):
                raise QcpuError(f"{what} has unknown type id {raw_type}") from None
            if shape[0] % block_size:
                raise QcpuError(f"{what}: row of {shape[0]} is not a whole number of blocks of {block_size}")
            if offset % alignment:
                raise QcpuError(f"{what} data offset {offset} is not aligned to {alignment}")
            nbytes = n_elements // block_size * type_size
            start = data_start + offset
            if start + nbytes > self.size:
                raise QcpuError(f"{what} extends past end of file")
            self.tensors[name] = TensorInfo(name, shape, raw_type, start, nbytes)

        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise QcpuError(f"tensors {_show(name_a)} and {_show(name_b)} overlap")

    def _check_known_keys(self) -> None:
        arch = self.metadata.get("general.architecture")
        rules = dict(_KNOWN)
        if isinstance(arch, str) and arch:
            rules.update({f"{arch}.{suffix}": rule for suffix, rule in _KNOWN_ARCH.items()})
        rules.update({k: ("uint", None) for k in self.metadata
                      if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")})
        for key, (scalar, element) in rules.items():
            if key not in self.value_types:
                continue
            vtype, etype = self.value_types[key]
            if vtype == V.ARRAY:
                ok = element is not None and etype in _SCALAR_RULE[element]
                kind = f"ARRAY of {etype.name}"
            else:
                ok = scalar is not None and vtype in _SCALAR_RULE[scalar]
                kind = vtype.name
            if not ok:
                want = " or ".join(w for w in (scalar and f"a {_RULE_TEXT[scalar]}",
                                               element and f"an array of {_RULE_TEXT[element]}s") if w)
                raise QcpuError(f"metadata {_show(key)} has type {kind}, expected {want}")
            value = self.metadata[key]
            if key in _SHORT_NAMES and not (len(value) <= 128 and value.isprintable()):
                raise QcpuError(f"metadata {key} is not a sane name ({_show(value, 40)})")
            if scalar == "float" and vtype in _FLOATS and not math.isfinite(value):
                raise QcpuError(f"metadata {_show(key)} is {value}, not a finite number")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.metadata.get(key)
        if value is None:
            raise QcpuError(f"{self.path}: metadata {key} is missing")
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise QcpuError(f"{self.path}: metadata {key} has the wrong type")
        return value

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Copy rows start..stop-1 of a tensor's bytes into out (uint8, at least that many bytes) with
        pread, not through the mapping: for a tensor copied elsewhere at load (repacked), whose mapped
        pages need never be faulted in or held. Returns out's first bytes as uint8[stop - start, row_bytes].
        Raises QcpuError if the file ends early (changed since it was opened)."""
        info = self.tensors[name]
        row_bytes = info.nbytes // info.rows
        view = out.reshape(-1)[: (stop - start) * row_bytes]
        done, at = 0, info.offset + start * row_bytes
        while done < view.size:
            n = os.preadv(self._fd, [memoryview(view[done:])], at + done)
            if n <= 0:
                raise QcpuError(f"{self.path}: file ended while reading {name} (changed on disk?)")
            done += n
        return view.reshape(stop - start, row_bytes)

    def raw(self, name: str) -> np.ndarray:
        """A tensor's bytes as uint8[rows, row_bytes], a read-only view of the mapped file."""
        info = self.tensors[name]
        data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(info.rows, info.nbytes // info.rows)
