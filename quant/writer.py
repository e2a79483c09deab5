"""Write a GGUF file tensor by tensor, atomically.

The header, metadata and tensor table are encoded by `gguf.GGUFWriter` (so every value type is written
the way llama.cpp and gguf-py read it); tensor data is then appended in whatever chunks the caller
produces, so no tensor — let alone the model — is ever whole in memory. Everything goes to a temporary
file beside OUT that is renamed over OUT only when the last byte is written; on any error (a full disk
included) the temporary file is removed and OUT is left as it was.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from qcpu.errors import QcpuError

logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf-py logs its write plan at INFO


def check_output_path(out: Path, force: bool) -> None:
    """Refuse to clobber OUT without --force; fail early when its directory is missing."""
    if out.exists() and not force:
        raise QcpuError(f"{out}: already exists (use --force to overwrite)")
    if out.is_dir():
        raise QcpuError(f"{out}: is a directory")
    if not out.parent.is_dir():
        raise QcpuError(f"{out.parent}: no such directory")


def _io_error(out: Path, e: OSError) -> QcpuError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return QcpuError(f"{out}: no space left on device (nothing written)")
    return QcpuError(f"{out}: cannot write: {e.strerror or e}")


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


class StreamingGGUFWriter:
    """Usage:

        with StreamingGGUFWriter(out, arch, force) as w:
            w.add_kv(key, value, vtype, etype) ...
            w.add_tensor(name, shape, ggml_type) ...     # shape in GGUF order (ne0 = row length first)
            w.begin()
            for each tensor, in the order added: w.write(chunk) ...; w.end_tensor()
        # OUT exists only if the block finished without an exception
    """

    def __init__(self, out: str | os.PathLike, arch: str, force: bool = False):
        self.out = Path(out)
        check_output_path(self.out, force)
        self.force = force
        self.tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.partial")
        self._w = GGUFWriter(None, arch)
        self._tensors: list[tuple[str, int]] = []  # (name, nbytes) in write order
        self._fout = None
        self._index = 0
        self._written = 0

    # -- plan ----------------------------------------------------------------------------------------

    @property
    def gguf_writer(self) -> GGUFWriter:
        """The underlying gguf-py writer, for its typed add_* metadata helpers (before begin())."""
        return self._w

    def add_kv(self, key: str, value: Any, vtype: GGUFValueType, etype: GGUFValueType | None = None) -> None:
        if key == "general.architecture":
            return  # GGUFWriter writes it first, from `arch`
        if key == "general.alignment":
            self._w.data_alignment = int(value)
        if vtype == GGUFValueType.ARRAY and len(value) == 0:
            return  # gguf-py cannot encode an empty array; an empty list carries nothing anyway
        self._w.add_key_value(key, value, vtype, sub_type=etype)

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
        nbytes = tensor_nbytes(shape, ggml_type)
        # GGUFWriter takes numpy order (reversed) and, given a non-uint8 dtype, the element shape.
        self._w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes,
                                raw_dtype=GGMLQuantizationType(ggml_type))
        self._tensors.append((name, nbytes))
        return nbytes

    # -- write ---------------------------------------------------------------------------------------

    def begin(self) -> None:
        try:
            self._w.write_header_to_file(self.tmp)
            self._w.write_kv_data_to_file()
            self._w.write_ti_data_to_file()
            self._fout = self._w.fout[0]
            self._pad()
        except OSError as e:
            raise _io_error(self.out, e) from None

    def _pad(self) -> None:
        align = self._w.data_alignment
        pos = self._fout.tell()
        if pos % align:
            self._fout.write(b"\0" * (align - pos % align))

    def write(self, data) -> None:
        """Append bytes (any buffer: bytes, memoryview, numpy array) to the current tensor."""
        name, nbytes = self._tensors[self._index]
        n = memoryview(data).nbytes
        if self._written + n > nbytes:
            raise QcpuError(f"internal error: {name} gets more than its {nbytes} bytes")
        try:
            self._fout.write(data)
        except OSError as e:
            raise _io_error(self.out, e) from None
        self._written += n

    def end_tensor(self) -> None:
        name, nbytes = self._tensors[self._index]
        if self._written != nbytes:
            raise QcpuError(f"internal error: {name} got {self._written} of its {nbytes} bytes")
        try:
            self._pad()
        except OSError as e:
            raise _io_error(self.out, e) from None
        self._index += 1
        self._written = 0

    def finish(self) -> None:
        if self._index != len(self._tensors):
            raise QcpuError(f"internal error: {len(self._tensors) - self._index} tensors were not written")
        try:
            self._fout.flush()
            os.fsync(self._fout.fileno())
            self._w.close()
            self._fout = None
            if self.out.exists() and not self.force:  # appeared while we worked
                raise QcpuError(f"{self.out}: already exists (use --force to overwrite)")
            os.replace(self.tmp, self.out)
        except OSError as e:
            raise _io_error(self.out, e) from None

    def abort(self) -> None:
        try:
            self._w.close()
        except OSError:
            pass
        self._fout = None
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "StreamingGGUFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finish()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
