"""A mutation corpus for qcpu's GGUF loader, and a runner that checks the loader's contract on it.

Contract: every mutated file either loads (`GGUFFile` + `ModelConfig.from_gguf` + `ModelWeights.from_gguf`)
or raises `QcpuError` with a one-line message; never another exception, never a hang, never a memory
blow-up.

Base files (each valid, each loads):
  * "tiny": tests/tiny_model.py's toy qwen2 (F32 and Q8_0 weights), a few hundred KB, mutated whole;
  * "real": the default model's header (its first ~6 MB: 26 keys, the 151k-token vocabulary and merges,
    291 tensor infos) followed by a *sparse* zero tail up to the original size, so every tensor's range
    is inside the file but the file costs ~6 MB of disk.

The base is read by an independent little GGUF walker below (not qcpu's parser) into a `Doc` (raw KV
bodies + tensor infos), which re-renders to bytes and records where every structural field lies. Cases
are deterministic in (base, seed, index): operator `OPS[index % len(OPS)]` with `random.Random(seed,
index)` parameters. Operators: truncations, flipped bytes/bits, structural fields set to interesting
values (0, 2**63, 2**64-1, file size +-1, NaN bit patterns, ...), inserted/deleted bytes, duplicated or
dropped keys/tensors, known keys re-typed, NaN/inf/negative hyper-parameters, unknown value/element
types, nested arrays, alignment changes, bad tensor dims/types/offsets, overlapping tensors, bad UTF-8,
over-long/empty/control-character names, bad magic/version, huge strings/arrays, stacked mutations.

Runner: `run_corpus(...)` feeds case files to a worker subprocess (`python -m tests.gguf_mutations
--worker`), one at a time, with a wall-clock limit per case (the worker is killed and restarted on a
hang) and the worker's peak RSS per case (VmHWM, reset through /proc/self/clear_refs) compared with its
RSS before the case, less the weights the loader repacks into memory (the file's own bytes).
"""

from __future__ import annotations

import json
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

REPO = Path(__file__).resolve().parent.parent

_SCALAR_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
               V.FLOAT32: "<f", V.BOOL: "<B", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


# -- an independent GGUF model: raw KV bodies + tensor infos ------------------------------------------------

@dataclass
class KV:
    key: bytes
    vtype: int
    body: bytes  # the encoded value, exactly as it follows the u32 type in the file


@dataclass
class TensorRec:
    name: bytes
    dims: list[int]
    ttype: int
    offset: int
    n_dims: int | None = None  # written instead of len(dims) when set


@dataclass
class Doc:
    kvs: list[KV]
    tensors: list[TensorRec]
    data: bytes  # the tensor data written after the header (may be shorter than data_len)
    data_len: int  # bytes of tensor data; the file is extended with (sparse) zeros up to it
    version: int = 3
    magic: bytes = b"GGUF"
    n_kv: int | None = None  # header counts written instead of the real ones when set
    n_tensors: int | None = None
    alignment: int = 32  # padding used when rendering (not the metadata value)

    def copy(self) -> "Doc":
        return replace(self, kvs=[replace(k) for k in self.kvs],
                       tensors=[replace(t, dims=list(t.dims)) for t in self.tensors])

    def kv(self, key: str) -> KV | None:
        return next((k for k in self.kvs if k.key == key.encode()), None)

    def arch(self) -> str:
        kv = self.kv("general.architecture")
        return decode_value(kv.vtype, kv.body)[0] if kv else "qwen2"


def _skip(buf: bytes, pos: int, vtype: int, depth: int = 0) -> int:
    if vtype == V.STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == V.ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR_FMT:
            return pos + count * struct.calcsize(_SCALAR_FMT[etype])
        for _ in range(count):
            pos = _skip(buf, pos, etype, depth + 1)
        return pos
    return pos + struct.calcsize(_SCALAR_FMT[vtype])


def decode_value(vtype: int, body: bytes, pos: int = 0):
    """(value, end) for a *valid* body (used on base files and by tests as an independent reference)."""
    if vtype == V.STRING:
        (n,) = struct.unpack_from("<Q", body, pos)
        return body[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n
    if vtype == V.ARRAY:
        etype, count = struct.unpack_from("<IQ", body, pos)
        pos += 12
        out = []
        for _ in range(count):
            v, pos = decode_value(etype, body, pos)
            out.append(v)
        return out, pos
    fmt = _SCALAR_FMT[vtype]
    v = struct.unpack_from(fmt, body, pos)[0]
    return (bool(v) if vtype == V.BOOL else v), pos + struct.calcsize(fmt)


def read_doc(path: Path, keep_data: bool = True, max_header: int | None = None) -> Doc:
    """Parse a valid GGUF into a Doc. keep_data=False: keep only the header (the tail becomes sparse)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = f.read(max_header or size)
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24
    kvs = []
    alignment = 32
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8:pos + 8 + n]
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        end = _skip(buf, pos, vtype)
        kvs.append(KV(key, vtype, buf[pos:end]))
        if key == b"general.alignment":
            v = decode_value(vtype, buf[pos:end])[0]
            if type(v) is int and 0 < v <= 4096 and not v & (v - 1):  # else: pad as a writer would, to 32
                alignment = v
        pos = end
    tensors = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8:pos + 8 + n]
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", buf, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", buf, pos + 4))
        pos += 4 + 8 * nd
        ttype, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        tensors.append(TensorRec(name, dims, ttype, offset))
    data_start = -(-pos // alignment) * alignment
    data = buf[data_start:] if keep_data else b""
    return Doc(kvs, tensors, data, size - data_start, version=version, alignment=alignment)


# -- encoding -------------------------------------------------------------------------------------------

def enc_str(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_scalar(vtype: int, value) -> bytes:
    return struct.pack(_SCALAR_FMT[vtype], value)


def enc_array(etype: int, items: list[bytes]) -> bytes:
    """items: already-encoded element bodies."""
    return struct.pack("<IQ", etype, len(items)) + b"".join(items)


@dataclass(frozen=True)
class Field:
    kind: str  # magic, version, n_tensors, n_kv, key_len, key, vtype, scalar, str_len, str, arr_type,
    #            arr_count, elem, name_len, name, n_dims, dim, ttype, offset
    offset: int
    width: int
    label: str


def _body_fields(vtype: int, body: bytes, base: int, label: str, fields: list[Field]) -> None:
    try:
        if vtype == V.STRING:
            (n,) = struct.unpack_from("<Q", body, 0)
            fields += [Field("str_len", base, 8, label), Field("str", base + 8, min(n, 1 << 20), label)]
        elif vtype == V.ARRAY:
            etype, count = struct.unpack_from("<IQ", body, 0)
            fields += [Field("arr_type", base, 4, label), Field("arr_count", base + 4, 8, label)]
            pos = 12
            for i in range(min(count, 3)):
                if etype == V.STRING:
                    (n,) = struct.unpack_from("<Q", body, pos)
                    fields += [Field("str_len", base + pos, 8, f"{label}[{i}]"),
                               Field("str", base + pos + 8, n, f"{label}[{i}]")]
                    pos += 8 + n
                elif etype in _SCALAR_FMT:
                    w = struct.calcsize(_SCALAR_FMT[etype])
                    fields.append(Field("elem", base + pos, w, f"{label}[{i}]"))
                    pos += w
                else:
                    break
        elif vtype in _SCALAR_FMT:
            fields.append(Field("scalar", base, struct.calcsize(_SCALAR_FMT[vtype]), label))
    except struct.error:
        pass


def render(doc: Doc) -> tuple[bytes, list[Field]]:
    """The header (padded to doc.alignment) and where its fields are."""
    out = bytearray()
    fields: list[Field] = []

    def put(kind: str, fmt: str, value: int, label: str) -> None:
        w = struct.calcsize(fmt)
        fields.append(Field(kind, len(out), w, label))
        out.extend(struct.pack(fmt, value & ((1 << (8 * w)) - 1)))

    fields.append(Field("magic", 0, 4, "magic"))
    out += doc.magic
    put("version", "<I", doc.version, "version")
    put("n_tensors", "<Q", len(doc.tensors) if doc.n_tensors is None else doc.n_tensors, "tensor count")
    put("n_kv", "<Q", len(doc.kvs) if doc.n_kv is None else doc.n_kv, "kv count")
    for kv in doc.kvs:
        label = kv.key[:60].decode("utf-8", "replace")
        put("key_len", "<Q", len(kv.key), label)
        fields.append(Field("key", len(out), len(kv.key), label))
        out += kv.key
        put("vtype", "<I", kv.vtype, label)
        _body_fields(kv.vtype, kv.body, len(out), label, fields)
        out += kv.body
    for t in doc.tensors:
        label = t.name[:60].decode("utf-8", "replace")
        put("name_len", "<Q", len(t.name), label)
        fields.append(Field("name", len(out), len(t.name), label))
        out += t.name
        put("n_dims", "<I", len(t.dims) if t.n_dims is None else t.n_dims, label)
        for d in t.dims:
            put("dim", "<Q", d, label)
        put("ttype", "<I", t.ttype, label)
        put("offset", "<Q", t.offset, label)
    if doc.alignment > 0:
        out += b"\0" * ((-len(out)) % doc.alignment)
    return bytes(out), fields


# -- cases ----------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    header: bytes
    data: bytes
    size: int  # final file size: the tail past header+data is sparse zeros; smaller = truncated
    must_load: bool = False  # a valid file (benign change): refusing it breaks the contract

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            body = self.header[: self.size]
            f.write(body)
            rest = self.size - len(body)
            if rest > 0:
                f.write(self.data[:rest])
            f.truncate(self.size)


def case_from_doc(name: str, doc: Doc) -> Case:
    header, _ = render(doc)
    return Case(name, header, doc.data, len(header) + doc.data_len)


@dataclass
class Base:
    """A valid file to mutate: its Doc, rendered header and field map (computed once)."""

    name: str
    doc: Doc
    header: bytes = b""
    fields: list[Field] = field(default_factory=list)

    def __post_init__(self):
        self.header, self.fields = render(self.doc)

    @property
    def size(self) -> int:
        return len(self.header) + self.doc.data_len

    def case(self, name: str) -> Case:
        return Case(name, self.header, self.doc.data, self.size)


def tiny_base(tmp_dir: Path, weight_type: T = T.F32) -> Base:
    from tests.tiny_model import write_tiny_qwen2

    path = tmp_dir / f"tiny-{weight_type.name}.gguf"
    write_tiny_qwen2(path, weight_type=weight_type)
    return Base(f"tiny-{weight_type.name}", read_doc(path))


def real_base(path: Path) -> Base:
    """The default model's header; `path` from the tests' real_model_path fixture or, in tools/fuzz_gguf.py,
    from qcpu.models (no hard-coded location: the cache directory is configurable)."""
    return Base("real", read_doc(path, keep_data=False, max_header=16 << 20))


U64 = (1 << 64) - 1


def interesting(width: int, current: int, size: int, rng: random.Random) -> int:
    vals = [0, 1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 255, 256, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF,
            2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, U64, U64 - 7,
            size, size - 1, size + 1, size // 2, current + 1, current - 1, current * 2, current + 2**32,
            current + 4096, 1 << 22, (1 << 22) + 1, 1 << 26, (1 << 26) + 1, 1 << 16, (1 << 16) + 1,
            0x7FC00000, 0xFF800000, 0x7F800000, 0x7FF8000000000000, 0xFFF0000000000000, 13, 9, 8, 12]
    return rng.choice(vals) & ((1 << (8 * width)) - 1)


def _patch(buf: bytes, offset: int, width: int, value: int) -> bytes:
    b = bytearray(buf)
    b[offset:offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(b)


def _struct_fields(base: Base, kinds: tuple[str, ...] | None = None) -> list[Field]:
    return [f for f in base.fields if kinds is None or f.kind in kinds]


# Byte-level operators: (base, rng) -> Case


def op_truncate(base: Base, rng: random.Random) -> Case:
    total = len(base.header) + len(base.doc.data)
    if rng.random() < 0.6:
        f = rng.choice(base.fields)
        cut = f.offset + rng.choice([-1, 0, 1, f.width - 1, f.width, f.width // 2])
    elif rng.random() < 0.5:
        cut = rng.randrange(0, len(base.header))
    else:
        cut = rng.randrange(0, max(1, total))
    cut = max(0, min(cut, base.size - 1))
    return Case(f"truncate@{cut}", base.header, base.doc.data, cut)


def op_flip_bytes(base: Base, rng: random.Random) -> Case:
    b = bytearray(base.header)
    spots = []
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        if rng.random() < 0.5:
            f = rng.choice(base.fields)
            i = f.offset + rng.randrange(max(1, f.width))
        else:
            i = rng.randrange(len(b))
        i = min(i, len(b) - 1)
        b[i] = rng.randrange(256)
        spots.append(i)
    return Case(f"flip_bytes@{spots[:4]}", bytes(b), base.doc.data, base.size)


def op_flip_bit(base: Base, rng: random.Random) -> Case:
    f = rng.choice(_struct_fields(base, ("n_tensors", "n_kv", "key_len", "vtype", "str_len", "arr_type",
                                         "arr_count", "name_len", "n_dims", "dim", "ttype", "offset",
                                         "scalar", "elem")))
    bit = rng.randrange(8 * f.width)
    b = bytearray(base.header)
    b[f.offset + bit // 8] ^= 1 << (bit % 8)
    return Case(f"flip_bit:{f.kind}:{f.label}:bit{bit}", bytes(b), base.doc.data, base.size)


def op_field_value(base: Base, rng: random.Random) -> Case:
    f = rng.choice(_struct_fields(base, ("n_tensors", "n_kv", "key_len", "vtype", "str_len", "arr_type",
                                         "arr_count", "name_len", "n_dims", "dim", "ttype", "offset",
                                         "scalar", "elem", "version")))
    cur = int.from_bytes(base.header[f.offset:f.offset + f.width], "little")
    v = interesting(f.width, cur, base.size, rng)
    return Case(f"field:{f.kind}:{f.label}={v}", _patch(base.header, f.offset, f.width, v), base.doc.data, base.size)


def op_splice(base: Base, rng: random.Random) -> Case:
    f = rng.choice(base.fields)
    at = f.offset + rng.choice([0, f.width, 1])
    n = rng.choice([1, 3, 4, 8, 12])
    if rng.random() < 0.5:
        junk = bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.5 else b"\0" * n
        h = base.header[:at] + junk + base.header[at:]
        return Case(f"insert{n}@{f.kind}:{f.label}", h, base.doc.data, base.size + n)
    h = base.header[:at] + base.header[at + n:]
    return Case(f"delete{n}@{f.kind}:{f.label}", h, base.doc.data, base.size - n)


def op_fill(base: Base, rng: random.Random) -> Case:
    at = rng.randrange(len(base.header))
    n = rng.choice([8, 64, 512, 4096])
    byte = rng.choice([0x00, 0xFF, 0x41])
    b = bytearray(base.header)
    b[at:at + n] = bytes([byte]) * len(b[at:at + n])
    return Case(f"fill{n}x{byte:02x}@{at}", bytes(b), base.doc.data, base.size)


def op_swap_fields(base: Base, rng: random.Random) -> Case:
    fs = _struct_fields(base, ("dim", "offset", "ttype", "n_dims", "str_len", "arr_count", "key_len", "name_len"))
    a, b_ = rng.sample(fs, 2)
    w = min(a.width, b_.width)
    h = bytearray(base.header)
    h[a.offset:a.offset + w], h[b_.offset:b_.offset + w] = h[b_.offset:b_.offset + w], h[a.offset:a.offset + w]
    return Case(f"swap:{a.kind}:{a.label}<->{b_.kind}:{b_.label}", bytes(h), base.doc.data, base.size)


# Structural operators: (base, rng) -> Case, built on a copy of the Doc


def _known_kvs(doc: Doc) -> list[KV]:
    return [k for k in doc.kvs if k.key.startswith((b"general.", b"tokenizer.", doc.arch().encode()))]


def op_dup_kv(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    kv = rng.choice(doc.kvs)
    doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), replace(kv))
    return case_from_doc(f"dup_kv:{kv.key.decode()}", doc)


def op_drop(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    if rng.random() < 0.5:
        kv = doc.kvs.pop(rng.randrange(len(doc.kvs)))
        return case_from_doc(f"drop_kv:{kv.key.decode()}", doc)
    t = doc.tensors.pop(rng.randrange(len(doc.tensors)))
    return case_from_doc(f"drop_tensor:{t.name.decode()}", doc)


def op_dup_tensor(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    t = rng.choice(doc.tensors)
    doc.tensors.append(replace(t, dims=list(t.dims)))
    return case_from_doc(f"dup_tensor:{t.name.decode()}", doc)


def op_counts(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    which = rng.choice(["n_kv", "n_tensors"])
    cur = len(doc.kvs) if which == "n_kv" else len(doc.tensors)
    v = rng.choice([0, cur - 1, cur + 1, cur + 1000, 2**16, 2**16 + 1, 2**32, 2**63, U64])
    setattr(doc, which, max(0, v))
    return case_from_doc(f"count:{which}={v}", doc)


def _retype_candidates(doc: Doc, kv: KV) -> list[tuple[str, int, bytes]]:
    value = decode_value(kv.vtype, kv.body)[0]
    num = value if isinstance(value, (int, float)) and not isinstance(value, bool) else 24
    iv = int(num) if num == num and abs(num) < 2**62 else 1
    return [
        ("string", V.STRING, enc_str(str(value)[:100])),
        ("float32", V.FLOAT32, enc_scalar(V.FLOAT32, float(iv))),
        ("float64", V.FLOAT64, enc_scalar(V.FLOAT64, float(iv))),
        ("bool", V.BOOL, enc_scalar(V.BOOL, 1)),
        ("int32-neg", V.INT32, enc_scalar(V.INT32, -abs(iv) or -1)),
        ("uint64-huge", V.UINT64, enc_scalar(V.UINT64, 2**40)),
        ("uint8", V.UINT8, enc_scalar(V.UINT8, iv & 0xFF)),
        ("int64", V.INT64, enc_scalar(V.INT64, iv)),
        ("array-u32", V.ARRAY, enc_array(V.UINT32, [enc_scalar(V.UINT32, iv & 0xFFFFFFFF)] * 2)),
        ("array-empty", V.ARRAY, enc_array(V.STRING, [])),
        ("array-str", V.ARRAY, enc_array(V.STRING, [enc_str("x")])),
        ("array-f32", V.ARRAY, enc_array(V.FLOAT32, [enc_scalar(V.FLOAT32, 1.5)])),
    ]


def op_retype_kv(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    kv = rng.choice(_known_kvs(doc))
    label, vtype, body = rng.choice(_retype_candidates(doc, kv))
    kv.vtype, kv.body = vtype, body
    return case_from_doc(f"retype:{kv.key.decode()}->{label}", doc)


def op_special_numbers(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    arch = doc.arch()
    key = rng.choice([f"{arch}.rope.freq_base", f"{arch}.attention.layer_norm_rms_epsilon",
                      f"{arch}.block_count", f"{arch}.embedding_length", f"{arch}.attention.head_count",
                      f"{arch}.attention.head_count_kv", f"{arch}.feed_forward_length", f"{arch}.context_length",
                      "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "general.alignment"])
    kv = doc.kv(key)
    if kv is None:
        kv = KV(key.encode(), V.UINT32, enc_scalar(V.UINT32, 0))
        doc.kvs.append(kv)
    if kv.vtype in (V.FLOAT32, V.FLOAT64):
        v = rng.choice([float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-45, 1e38, 5e-324])
        kv.body = enc_scalar(kv.vtype, v)
    else:
        vtype = rng.choice([V.UINT32, V.INT32, V.UINT64, V.INT64, V.UINT8])
        v = rng.choice([0, 1, 3, 7, 13, 2**31 - 1, 2**32 - 1, 2**63 - 1, -1, -(2**31), 10**6, 65, 1 << 20])
        lo, hi = {V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1), V.UINT64: (0, U64),
                  V.INT64: (-(2**63), 2**63 - 1), V.UINT8: (0, 255)}[vtype]
        v = min(max(v, lo), hi)
        kv.vtype, kv.body = vtype, enc_scalar(vtype, v)
    return case_from_doc(f"special:{key}={v!r}/{V(kv.vtype).name}", doc)


def op_unknown_type(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    bad = rng.choice([13, 14, 255, 2**31, 2**32 - 1, 9])
    arrays = [k for k in doc.kvs if k.vtype == V.ARRAY]
    if arrays and rng.random() < 0.5:
        kv = rng.choice(arrays)
        kv.body = struct.pack("<I", bad) + kv.body[4:]
        return case_from_doc(f"unknown_elem_type:{kv.key.decode()}={bad}", doc)
    kv = rng.choice(doc.kvs)
    kv.vtype = bad if bad != 9 else 13
    return case_from_doc(f"unknown_value_type:{kv.key.decode()}={kv.vtype}", doc)


def op_nested_arrays(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    kind = rng.choice(["one_level", "two_levels", "deep", "tokens_nested", "empty_inner", "many_inner"])
    inner = enc_array(V.UINT32, [enc_scalar(V.UINT32, 1), enc_scalar(V.UINT32, 2)])
    if kind == "one_level":
        body = enc_array(V.ARRAY, [inner, enc_array(V.STRING, [enc_str("a")])])
    elif kind == "two_levels":
        body = enc_array(V.ARRAY, [enc_array(V.ARRAY, [inner])])
    elif kind == "deep":
        body = inner
        for _ in range(rng.choice([3, 50, 500])):
            body = enc_array(V.ARRAY, [body])
    elif kind == "tokens_nested":
        body = enc_array(V.ARRAY, [enc_array(V.STRING, [enc_str("a"), enc_str("b")])] * 3)
        kv = doc.kv("tokenizer.ggml.tokens")
        kv.body = body
        return case_from_doc(f"nested:{kind}", doc)
    elif kind == "empty_inner":
        body = enc_array(V.ARRAY, [enc_array(V.UINT8, [])] * 100)
    else:  # many inner arrays: over the nested budget
        body = struct.pack("<IQ", V.ARRAY, 70000) + enc_array(V.UINT8, []) * 70000
    doc.kvs.append(KV(b"fuzz.nested", V.ARRAY, body))
    return case_from_doc(f"nested:{kind}", doc)


def op_alignment(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    choice = rng.choice(["u32", "u32", "u32", "string", "bool", "u8", "f32", "i32", "u64"])
    v = rng.choice([0, 1, 2, 3, 8, 16, 24, 32, 64, 4096, 1 << 16, 1 << 17, 1 << 20, 2**31, 2**32 - 1])
    doc.kvs = [k for k in doc.kvs if k.key != b"general.alignment"]
    if choice == "string":
        vt, body = V.STRING, enc_str(str(v))
    elif choice == "bool":
        vt, body = V.BOOL, enc_scalar(V.BOOL, 1)
    elif choice == "f32":
        vt, body = V.FLOAT32, enc_scalar(V.FLOAT32, float(v))
    else:
        vt = {"u32": V.UINT32, "u8": V.UINT8, "i32": V.INT32, "u64": V.UINT64}[choice]
        vv = {"u8": v & 0xFF, "i32": -v if v < 2**31 else -1}.get(choice, v)
        body = enc_scalar(vt, vv)
    doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), KV(b"general.alignment", vt, body))
    # Pad as a writer would for a valid alignment (<= 4096); else keep the old padding.
    if vt in (V.UINT32, V.UINT64) and 0 < v <= 4096 and not v & (v - 1):
        doc.alignment = v
        if v > 32 and doc.data and rng.random() < 0.7:  # re-lay the tensor data out for it: must load
            relayout(doc, v)
    return case_from_doc(f"alignment:{choice}={v}", doc)


def tensor_nbytes(t: TensorRec) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[T(t.ttype)]
    n = 1
    for d in t.dims:
        n *= d
    return n // block * size


def relayout(doc: Doc, alignment: int) -> None:
    """Copy each tensor's bytes to offsets aligned to `alignment` (for a Doc that holds its data)."""
    new = bytearray()
    for t in doc.tensors:
        new += b"\0" * ((-len(new)) % alignment)
        n = tensor_nbytes(t)
        chunk = doc.data[t.offset:t.offset + n]
        t.offset = len(new)
        new += chunk
    doc.data, doc.data_len = bytes(new), len(new)


def op_tensor_dims(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    t = rng.choice(doc.tensors)
    kind = rng.choice(["zero", "huge", "u64max", "2^32", "not_block", "transpose", "extra1", "n_dims0",
                       "n_dims5", "n_dims_huge", "five_dims", "nan_bits", "half"])
    if kind == "zero":
        t.dims[rng.randrange(len(t.dims))] = 0
    elif kind == "huge":
        t.dims[-1] = 2**40 + 1
    elif kind == "u64max":
        t.dims[rng.randrange(len(t.dims))] = U64
    elif kind == "2^32":
        t.dims[-1] = 2**32
    elif kind == "not_block":
        t.dims[0] += 1
    elif kind == "transpose":
        t.dims.reverse()
    elif kind == "extra1":
        t.dims.append(1)
    elif kind == "n_dims0":
        t.dims = []
    elif kind == "n_dims5":
        t.dims = t.dims + [1] * (5 - len(t.dims))
    elif kind == "n_dims_huge":
        t.n_dims = rng.choice([2**32 - 1, 2**31, 1000])
    elif kind == "five_dims":
        t.n_dims = 5
    elif kind == "nan_bits":
        t.dims[0] = 0x7FC00000
    else:
        t.dims[-1] = max(1, t.dims[-1] // 2)
    return case_from_doc(f"dims:{t.name.decode()}:{kind}={t.dims}", doc)


def op_tensor_type(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    t = rng.choice(doc.tensors)
    t.ttype = rng.choice([4, 5, 31, 32, 33, 36, 39, 40, 41, 100, 2**31, 2**32 - 1,
                          int(T.F16), int(T.Q8_0), int(T.Q4_0), int(T.Q4_K), int(T.Q6_K), int(T.I8),
                          int(T.IQ2_XXS), int(T.TQ1_0), int(T.F64), int(T.I32), int(T.BF16)])
    return case_from_doc(f"ttype:{t.name.decode()}={t.ttype}", doc)


def op_tensor_offset(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    i = rng.randrange(len(doc.tensors))
    t = doc.tensors[i]
    other = doc.tensors[rng.randrange(len(doc.tensors))]
    kind = rng.choice(["unaligned1", "unaligned16", "past_end", "u64max", "2^63", "overlap_same",
                       "overlap_partial", "end_exact", "zero", "swap"])
    if kind == "unaligned1":
        t.offset += 1
    elif kind == "unaligned16":
        t.offset += 16
    elif kind == "past_end":
        t.offset = -(-doc.data_len // 32) * 32
    elif kind == "u64max":
        t.offset = U64 - 31
    elif kind == "2^63":
        t.offset = 2**63
    elif kind == "overlap_same":
        t.offset = other.offset
    elif kind == "overlap_partial":
        t.offset = other.offset + 32
    elif kind == "end_exact":
        t.offset = doc.data_len - doc.data_len % 32
    elif kind == "zero":
        t.offset = 0
    else:  # swap two tensors' offsets: loads when sizes match, overlaps/past-end otherwise
        t.offset, other.offset = other.offset, t.offset
    return case_from_doc(f"offset:{t.name.decode()}:{kind}={t.offset}", doc)


_BAD_UTF8 = [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80abc", b"ok\xe2\x82"]


def op_bad_utf8(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    junk = rng.choice(_BAD_UTF8)
    where = rng.choice(["key", "tensor_name", "name_value", "template", "arch", "token", "merge"])
    if where == "key":
        kv = rng.choice(doc.kvs)
        kv.key = kv.key + junk
    elif where == "tensor_name":
        t = rng.choice(doc.tensors)
        t.name = t.name[:40] + junk
    elif where in ("name_value", "template", "arch"):
        key = {"name_value": "general.name", "template": "tokenizer.chat_template",
               "arch": "general.architecture"}[where]
        kv = doc.kv(key)
        if kv is None:
            kv = KV(key.encode(), V.STRING, enc_str(""))
            doc.kvs.append(kv)
        old = decode_value(kv.vtype, kv.body)[0].encode()
        kv.vtype, kv.body = V.STRING, enc_str(old[:50] + junk + old[50:])
    else:
        key = "tokenizer.ggml.tokens" if where == "token" else "tokenizer.ggml.merges"
        kv = doc.kv(key)
        etype, count = struct.unpack_from("<IQ", kv.body, 0)
        k = rng.randrange(min(count, 1000))
        pos = 12
        for _ in range(k):
            pos += 8 + struct.unpack_from("<Q", kv.body, pos)[0]
        (n,) = struct.unpack_from("<Q", kv.body, pos)
        s = kv.body[pos + 8:pos + 8 + n]
        kv.body = kv.body[:pos] + enc_str(s + junk) + kv.body[pos + 8 + n:]
    return case_from_doc(f"bad_utf8:{where}:{junk!r}", doc)


def op_names(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    kind = rng.choice(["tensor63", "tensor64", "tensor1000", "tensor_empty", "tensor_newline", "key_empty",
                       "key_huge", "key_newline", "key_nul", "tensor_ansi"])
    if kind.startswith("tensor"):
        t = rng.choice(doc.tensors)
        t.name = {"tensor63": b"t" * 63, "tensor64": b"t" * 64, "tensor1000": b"t" * 1000, "tensor_empty": b"",
                  "tensor_newline": b"blk.0.attn\nq.weight", "tensor_ansi": b"\x1b[31mred"}[kind]
    else:
        kv = rng.choice(doc.kvs)
        kv.key = {"key_empty": b"", "key_huge": b"k" * 70000, "key_newline": b"general.na\nme",
                  "key_nul": b"general.name\x00"}[kind]
    return case_from_doc(f"names:{kind}", doc)


def op_magic_version(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    if rng.random() < 0.4:
        doc.magic = rng.choice([b"GGUG", b"gguf", b"GGML", b"GGJT", b"\0\0\0\0", b"FUGG"])
        return case_from_doc(f"magic:{doc.magic!r}", doc)
    doc.version = rng.choice([0, 1, 2, 4, 3 << 24, 2 << 24, 2**32 - 1])
    return case_from_doc(f"version:{doc.version}", doc)


def op_huge_values(base: Base, rng: random.Random) -> Case:
    doc = base.doc.copy()
    kind = rng.choice(["string_len", "array_count", "array_over_budget", "long_template", "many_keys",
                       "bool2", "bool_array2", "big_u8_array", "long_arch", "arch_newline"])
    if kind == "string_len":
        kv = next(k for k in doc.kvs if k.vtype == V.STRING)
        kv.body = struct.pack("<Q", rng.choice([2**26 + 1, 2**63, U64, len(kv.body) + 100])) + kv.body[8:]
    elif kind == "array_count":
        kv = next(k for k in doc.kvs if k.vtype == V.ARRAY)
        n = rng.choice([(1 << 22) + 1, 2**40, U64, struct.unpack_from("<Q", kv.body, 4)[0] + 1])
        kv.body = kv.body[:4] + struct.pack("<Q", n) + kv.body[12:]
    elif kind == "array_over_budget":
        n = 1 << 21
        for i in range(5):  # 5 x 2M u8 = 10M elements > the 8M budget, in a 10 MB file
            doc.kvs.append(KV(f"fuzz.big{i}".encode(), V.ARRAY, struct.pack("<IQ", V.UINT8, n) + bytes(n)))
    elif kind == "long_template":
        doc.kvs = [k for k in doc.kvs if k.key != b"tokenizer.chat_template"]
        doc.kvs.append(KV(b"tokenizer.chat_template", V.STRING, enc_str("{{ x }}" * 200_000)))
    elif kind == "many_keys":
        for i in range(rng.choice([1000, 20000])):
            doc.kvs.append(KV(f"fuzz.k{i}".encode(), V.UINT8, b"\x01"))
    elif kind == "bool2":
        kv = doc.kv("tokenizer.ggml.add_bos_token") or KV(b"tokenizer.ggml.add_bos_token", V.BOOL, b"\0")
        if kv not in doc.kvs:
            doc.kvs.append(kv)
        kv.vtype, kv.body = V.BOOL, bytes([rng.choice([2, 0x80, 0xFF])])
    elif kind in ("long_arch", "arch_newline"):
        kv = doc.kv("general.architecture")
        kv.body = enc_str("qwen2" * 60_000 if kind == "long_arch" else "qwen\n2")
    elif kind == "bool_array2":
        doc.kvs.append(KV(b"fuzz.bools", V.ARRAY, struct.pack("<IQ", V.BOOL, 3) + b"\x00\x01\x07"))
    else:
        doc.kvs.append(KV(b"fuzz.u8s", V.ARRAY, struct.pack("<IQ", V.UINT8, 1 << 20) + bytes(1 << 20)))
    return case_from_doc(f"huge:{kind}", doc)


def op_benign(base: Base, rng: random.Random) -> Case:
    """Changes that keep the file valid: the loader must accept them."""
    doc = base.doc.copy()
    kind = rng.choice(["shuffle_kvs", "shuffle_tensors", "extra_keys", "odd_strings", "version2",
                       "swap_same_shape", "trailing_bytes", "bad_utf8_value"])
    if kind == "shuffle_kvs":
        rng.shuffle(doc.kvs)
    elif kind == "shuffle_tensors":
        rng.shuffle(doc.tensors)
    elif kind == "extra_keys":
        extra = [(V.UINT8, enc_scalar(V.UINT8, 255)), (V.INT8, enc_scalar(V.INT8, -128)),
                 (V.UINT16, enc_scalar(V.UINT16, 65535)), (V.INT16, enc_scalar(V.INT16, -1)),
                 (V.UINT32, enc_scalar(V.UINT32, 2**32 - 1)), (V.INT32, enc_scalar(V.INT32, -(2**31))),
                 (V.FLOAT32, enc_scalar(V.FLOAT32, float("nan"))), (V.BOOL, b"\x01"),
                 (V.STRING, enc_str("")), (V.STRING, enc_str("héllo 🦀\n\t\0")),
                 (V.UINT64, enc_scalar(V.UINT64, U64)), (V.INT64, enc_scalar(V.INT64, -(2**63))),
                 (V.FLOAT64, enc_scalar(V.FLOAT64, float("-inf"))),
                 (V.ARRAY, enc_array(V.FLOAT64, [])), (V.ARRAY, enc_array(V.STRING, [enc_str(""), enc_str("🦀")])),
                 (V.ARRAY, enc_array(V.BOOL, [b"\x00", b"\x01"])),
                 (V.ARRAY, enc_array(V.ARRAY, [enc_array(V.INT16, [enc_scalar(V.INT16, 5)]), enc_array(V.STRING, [])]))]
        for i, (vt, body) in enumerate(rng.sample(extra, rng.randrange(1, len(extra) + 1))):
            doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), KV(f"fuzz.extra{i}".encode(), vt, body))
    elif kind == "odd_strings":
        kv = doc.kv("general.name")
        kv.body = enc_str(rng.choice(["", "a\nb\r\n", "名前 🦀", "x" * 100_000, "\0\0"]))
    elif kind == "version2":
        doc.version = 2
    elif kind == "swap_same_shape":
        groups: dict = {}
        for t in doc.tensors:
            groups.setdefault((tuple(t.dims), t.ttype), []).append(t)
        pairs = [g for g in groups.values() if len(g) > 1]
        if pairs:
            a, b = rng.sample(rng.choice(pairs), 2)
            a.offset, b.offset = b.offset, a.offset
    elif kind == "trailing_bytes":
        doc.data_len += rng.choice([1, 31, 4096])
    else:
        kv = doc.kv("general.name")
        kv.body = enc_str(b"broken \xff\xfe utf-8 \xc3")
    case = case_from_doc(f"benign:{kind}", doc)
    case.must_load = True
    return case


def op_stack(base: Base, rng: random.Random) -> Case:
    """A structural mutation, then one or two byte-level ones on its result."""
    first = rng.choice(STRUCTURAL)(base, rng)
    cur = first
    names = [first.name]
    for _ in range(rng.choice([1, 2])):
        try:
            doc = read_doc_bytes(cur.header)
        except Exception:
            doc = None
        if doc is None or cur.size < len(cur.header):
            break
        b = Base("stacked", replace(doc, data=cur.data, data_len=cur.size - len(cur.header)))
        cur = rng.choice(BYTE_LEVEL)(b, rng)
        names.append(cur.name)
    return replace(cur, name="stack[" + " + ".join(names) + "]", must_load=False)


def read_doc_bytes(header: bytes) -> Doc | None:
    with tempfile.NamedTemporaryFile(suffix=".gguf") as tmp:
        tmp.write(header)
        tmp.flush()
        try:
            return read_doc(Path(tmp.name), keep_data=False)
        except (struct.error, ValueError, UnicodeDecodeError, KeyError, MemoryError, OverflowError):
            return None


BYTE_LEVEL: list[Callable[[Base, random.Random], Case]] = [
    op_truncate, op_flip_bytes, op_flip_bit, op_field_value, op_splice, op_fill, op_swap_fields]
STRUCTURAL: list[Callable[[Base, random.Random], Case]] = [
    op_dup_kv, op_drop, op_dup_tensor, op_counts, op_retype_kv, op_special_numbers, op_unknown_type,
    op_nested_arrays, op_alignment, op_tensor_dims, op_tensor_type, op_tensor_offset, op_bad_utf8,
    op_names, op_magic_version, op_huge_values]
OPS = BYTE_LEVEL + STRUCTURAL + [op_benign, op_stack]
# Weight the cheap, broad byte-level operators a little more.
SCHEDULE = OPS + BYTE_LEVEL


def generate(base: Base, n: int, seed: int = 0, start: int = 0) -> Iterator[Case]:
    """n deterministic cases: case i applies SCHEDULE[i % len(SCHEDULE)] with rng seeded by (seed, i)."""
    for i in range(start, start + n):
        op = SCHEDULE[i % len(SCHEDULE)]
        rng = random.Random(f"{base.name}:{seed}:{i}")
        case = op(base, rng)
        case.name = f"{base.name}#{i}:{case.name}"
        yield case


# -- the worker: load one file, report -----------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_model_parts(path: str) -> tuple[str, int]:
    """What the fuzz contract loads; returns a short summary on success, and the bytes of weights the
    loader copied into memory (repacked matrices: the file's own bytes, so not counted as growth)."""
    from qcpu.config import ModelConfig
    from qcpu.gguf_file import GGUFFile
    from qcpu.weights import ModelWeights

    f = GGUFFile(path)
    cfg = ModelConfig.from_gguf(f)
    w = ModelWeights.from_gguf(f, cfg)
    matrices = {id(t): t for lw in w.layers for t in vars(lw).values() if hasattr(t, "packed")}
    matrices.update({id(t): t for t in (w.token_embd, w.output)})
    held = sum(t.raw.nbytes for t in matrices.values() if t.packed)
    return f"{len(f.tensors)} tensors, {cfg.n_layers} layers, vocab {cfg.vocab_size}, {len(w.layers)} layer weights", held


def worker_main() -> None:
    import resource
    import traceback

    from qcpu.errors import QcpuError

    limit_gb = float(os.environ.get("QCPU_FUZZ_AS_GB", "0") or 0)
    first = True
    for line in sys.stdin:
        path = line.rstrip("\n")
        if not path:
            continue
        if first and limit_gb:  # after the warm-up case: kernels are compiled, address space settled
            vm = _status_kb("VmSize:") * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + int(limit_gb * (1 << 30)), resource.RLIM_INFINITY))
        first = False
        can_peak = _reset_peak()
        rss0 = _status_kb("VmRSS:")
        t0 = time.perf_counter()
        held = 0
        try:
            status, (msg, held) = "ok", load_model_parts(path)
        except QcpuError as e:
            status, msg = "error", str(e)
        except BaseException as e:  # noqa: BLE001 -- the point is to catch anything
            status, msg = "other", f"{type(e).__name__}: {e}\n" + traceback.format_exc()[-3000:]
        elapsed = time.perf_counter() - t0
        peak = _status_kb("VmHWM:") if can_peak else 0
        rss1 = _status_kb("VmRSS:")
        sys.stdout.write(json.dumps({"status": status, "msg": msg, "seconds": elapsed, "rss0_kb": rss0,
                                     "peak_kb": peak, "rss1_kb": rss1, "held_kb": held // 1024}) + "\n")
        sys.stdout.flush()


# -- the runner -----------------------------------------------------------------------------------------

@dataclass
class Result:
    case: str
    status: str  # ok | error | other | timeout | crash
    msg: str
    seconds: float
    peak_growth_mb: float
    problem: str = ""  # why this result breaks the contract ("" = fine)
    must_load: bool = False


class _Worker:
    def __init__(self, stderr_path: Path, as_limit_gb: float):
        # One Numba thread: this checks the loader, not speed, and parallel launches of tiny kernels only
        # cost time on a shared machine.
        env = dict(os.environ, QCPU_FUZZ_AS_GB=str(as_limit_gb), NUMBA_NUM_THREADS="1")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.stderr = open(stderr_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.gguf_mutations", "--worker"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, env=env)

    def ask(self, path: Path, timeout: float) -> dict | None:
        """The worker's report, or None on timeout/crash (the worker is then dead)."""
        try:
            self.proc.stdin.write(str(path) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


@dataclass
class Report:
    results: list[Result]
    seconds: float
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.problem]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def summary(self) -> str:
        c = self.counts()
        worst = max(self.results, key=lambda r: r.seconds, default=None)
        peak = max((r.peak_growth_mb for r in self.results), default=0.0)
        return (f"{len(self.results)} cases in {self.seconds:.1f} s: {c.get('ok', 0)} loaded, "
                f"{c.get('error', 0)} refused with QcpuError, {len(self.failures)} contract failures; "
                f"slowest case {worst.seconds if worst else 0:.2f} s, largest peak-RSS growth {peak:.1f} MB, "
                f"worker RSS {self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} MB")


def check(status: str, msg: str, seconds: float, peak_growth_mb: float, time_limit: float,
          rss_limit_mb: float, must_load: bool = False) -> str:
    if must_load and status != "ok":
        return f"a valid file was refused: {msg.splitlines()[0] if msg else status}"
    if status == "error":
        if not msg.strip():
            return "empty error message"
        if "\n" in msg or "\r" in msg:
            return "multi-line error message"
        if len(msg) > 1000:
            return f"error message of {len(msg)} characters"
        if "Traceback" in msg:
            return "traceback in message"
    elif status != "ok":
        return f"{status}: {msg.splitlines()[0] if msg else ''}"
    if seconds > time_limit:
        return f"took {seconds:.1f} s (limit {time_limit} s)"
    if peak_growth_mb > rss_limit_mb:
        return f"peak RSS grew {peak_growth_mb:.0f} MB (limit {rss_limit_mb} MB)"
    return ""


def run_corpus(cases: Iterator[Case], workdir: Path, warmup: Case, time_limit: float = 10.0,
               rss_limit_mb: float = 256.0, as_limit_gb: float = 6.0,
               progress: Callable[[int, Result], None] | None = None) -> Report:
    """Run every case through a worker process; returns the per-case results (see `check`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "case.gguf"
    stderr_path = workdir / "worker.stderr"
    t_start = time.perf_counter()
    results: list[Result] = []
    worker = None
    rss_start = rss_end = 0.0

    def fresh_worker() -> _Worker:
        w = _Worker(stderr_path, as_limit_gb)
        warmup.write(path)
        rep = w.ask(path, 300.0)  # first load pays imports and Numba cache loading
        if rep is None or rep["status"] != "ok":
            w.stop()
            raise RuntimeError(f"worker warm-up failed: {rep}")
        return w

    try:
        worker = fresh_worker()
        for i, case in enumerate(cases):
            case.write(path)
            rep = worker.ask(path, time_limit)
            if rep is None:
                rc = worker.proc.poll()
                status = "timeout" if rc is None else "crash"
                msg = f"no answer within {time_limit} s" if rc is None else f"worker exited with {rc}"
                worker.stop()
                worker = fresh_worker()
                r = Result(case.name, status, msg, time_limit, 0.0, must_load=case.must_load)
            else:
                growth = max(0, rep["peak_kb"] - rep["rss0_kb"] - rep["held_kb"]) / 1024
                if not rss_start:
                    rss_start = rep["rss0_kb"] / 1024
                rss_end = rep["rss1_kb"] / 1024
                r = Result(case.name, rep["status"], rep["msg"], rep["seconds"], growth, must_load=case.must_load)
            r.problem = check(r.status, r.msg, r.seconds, r.peak_growth_mb, time_limit, rss_limit_mb, r.must_load)
            results.append(r)
            if progress:
                progress(i, r)
    finally:
        if worker is not None:
            worker.stop()
        path.unlink(missing_ok=True)
    return Report(results, time.perf_counter() - t_start, rss_start, rss_end)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        print("usage: python -m tests.gguf_mutations --worker   (see tools/fuzz_gguf.py)", file=sys.stderr)
        sys.exit(2)
