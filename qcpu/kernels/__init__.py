"""The one table of quant types: GGML type -> block layout + Numba kernels.

Every weight the model multiplies goes through `matmul` below; the transformer never learns which quant
type it holds. A quant family lives in its own module and registers its types here by importing
`register` (gguf-py's `quants.py` habit: one class of facts per type, one table keyed by the GGML id).

Kernel contract (all arrays C-contiguous):
  dequantize(w, out)   w: uint8[rows, row_bytes] raw blocks; out: float32[rows, cols]
  matvec(w, x, out)    w: uint8[rows, row_bytes]; x: float32[cols]; out: float32[rows]
                       (the decode hot path: x is quantized once to the type's activation format and
                        multiplied with integer dot products, as llama.cpp's vec_dot does)
  matvec_many(ws, x, outs)   the same for a few tokens (x float32[n, cols], outs float32[n, rows] each) and
                       a tuple of weights of this type that read the same x (Q/K/V, gate/up): x quantized
                       once, one parallel region over all their rows, each weight row read from memory once
                       for all n tokens, each token's output bit for bit its n = 1 output (a server's batch,
                       speculative verification). Where a family has it, its matvec is matvec_many of one
                       weight and one token.
  gemm(w, x, out)      x: float32[n, cols]; out: float32[n, rows] (batched products: gemm.py)

A type may also have a packed variant (PACKED, repack.py): the same entry points over weights repacked at
load into groups of 8 interleaved rows, w uint8[rows/8, 8 * row_bytes] (group_rows = 8), with `pack` to
make that layout from the file's rows and `unpack` to undo it.

A family writes each entry point once, as a factory over its layout constants, and `specialise` jits one
copy per type (Numba needs one compiled function per specialisation; see its docstring for the cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, types

from qcpu import jit_cache  # noqa: F401  (first: stamps every cached kernel with the package's sources)
from qcpu.errors import QcpuError


def _plain(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, tuple) and all(map(_plain, v)))


def specialise(py_func, name: str, **jit_options):
    """njit(cache=True) a factory's closure as its own function `name`.

    The closure may capture only plain values (ints, bools, strings, tuples of them), and that is checked:
    Numba's cache key hashes the pickled closure cells, and plain values pickle the same in every process,
    whereas an intrinsic or a jitted function pickles with a per-process uuid, so closing over one would
    recompile at every start. Per-type code is reached through module-level generic intrinsics that read
    those constants as literals (Numba types a captured value as a literal and prunes branches on it), so
    the result is as fast as a hand-written copy. The own name gives each specialisation its own cache
    index and symbol names, so specialisations compiled by different processes never share a symbol.
    """
    cells = [c.cell_contents for c in py_func.__closure__ or ()]
    if not all(map(_plain, cells)):
        raise TypeError(f"{name}: a specialisation may only capture plain constants, not {cells!r}")
    py_func.__name__ = py_func.__qualname__ = name
    return njit(cache=True, nogil=True, **jit_options)(py_func)


def literal_values(ty):
    """Inside an intrinsic's typer: the Python values of a tuple type of literals (a specialisation's
    layout constants), else None (Numba then retries with the literal types)."""
    if isinstance(ty, types.BaseTuple) and all(isinstance(t, types.Literal) for t in ty):
        return tuple(t.literal_value for t in ty)
    return None


@njit(cache=True, inline="always")
def check_rows(w, rows, cols, block, type_size, what):
    """Raise ValueError(what) unless w is uint8[rows, cols/block*type_size] with contiguous rows."""
    if cols % block or w.shape[1] != cols // block * type_size or w.shape[0] != rows:
        raise ValueError(what)
    if w.shape[0] and w.strides[1] != 1:
        raise ValueError(what)


@njit(cache=True, inline="always")
def total_rows(ws):
    """Rows of all the weights in the tuple ws."""
    n = 0
    for m in range(len(ws)):
        n += ws[m].shape[0]
    return n


@njit(cache=True)  # not inlined at Numba's level: its loop would count as writing the prange index
def locate_row(ws, r):
    """(m, i): row r of the weights in the tuple ws, counted across them in order, is row i of ws[m]."""
    m, i = 0, np.int64(r)  # a prange index may be unsigned: int64 keeps i - shape an integer
    while i >= ws[m].shape[0]:
        i -= ws[m].shape[0]
        m += 1
    return m, i


@dataclass(frozen=True)
class QuantKernel:
    ggml_type: GGMLQuantizationType
    dequantize: Callable[[np.ndarray, np.ndarray], None]
    matvec: Callable[[np.ndarray, np.ndarray, np.ndarray], None]
    gemm: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
    gemm_min_tokens: int = 2  # the batched path from this many tokens; below, the matvec (packing a tile costs)
    matvec_many: Callable[[tuple, np.ndarray, tuple], None] | None = None
    group_rows: int = 1  # weight rows per row of w: 8 in a packed layout
    pack: Callable[..., np.ndarray] | None = None  # pack(w, out=None): file rows -> this layout (packed variants)
    unpack: Callable[[np.ndarray], np.ndarray] | None = None  # this layout -> file rows
    many_for_one: bool = True  # one token goes through matvec_many too (False: its own matvec is faster)

    @property
    def block_size(self) -> int:
        """Weights per block."""
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.ggml_type][1]


REGISTRY: dict[GGMLQuantizationType, QuantKernel] = {}
PACKED: dict[GGMLQuantizationType, QuantKernel] = {}  # the types with a packed variant (repack.py)


def register(ggml_type: GGMLQuantizationType, dequantize, matvec=None, gemm=None, gemm_min_tokens=2,
             matvec_many=None) -> QuantKernel:
    """Enter a type in the table; a family that has matvec_many may leave matvec to it (a family that
    gives both keeps its matvec for one token)."""
    many_for_one = matvec is None
    if matvec is None:
        def matvec(w, x, out, _many=matvec_many):
            _many((w,), x.reshape(1, -1), (out.reshape(1, -1),))
    kernel = QuantKernel(ggml_type, dequantize, matvec, gemm, gemm_min_tokens, matvec_many,
                         many_for_one=many_for_one)
    REGISTRY[ggml_type] = kernel
    return kernel


def register_packed(ggml_type: GGMLQuantizationType, pack, unpack, matvec_many, gemm, gemm_min_tokens=2) -> QuantKernel:
    """Enter a type's packed variant (see the module docstring)."""
    def matvec(w, x, out, _many=matvec_many):
        _many((w,), x.reshape(1, -1), (out.reshape(1, -1),))

    def dequantize(w, out, _unpack=unpack, _rows=REGISTRY[ggml_type].dequantize):
        _rows(_unpack(w), out)

    kernel = QuantKernel(ggml_type, dequantize, matvec, gemm, gemm_min_tokens, matvec_many, 8, pack, unpack)
    PACKED[ggml_type] = kernel
    return kernel


_FOUND: dict[tuple[int, bool], QuantKernel] = {}  # kernel_for's answers: it runs several times per layer and token


def kernel_for(ggml_type: int, packed: bool = False) -> QuantKernel:
    """The kernels of a GGML type (of its packed variant with `packed`). Raises QcpuError for a type
    without kernels, KeyError for a packed variant that does not exist."""
    found = _FOUND.get((ggml_type, packed))
    if found is None:
        found = _FOUND[(int(ggml_type), bool(packed))] = _lookup(ggml_type, packed)
    return found


def _lookup(ggml_type: int, packed: bool) -> QuantKernel:
    if packed:
        return PACKED[GGMLQuantizationType(ggml_type)]
    try:
        return REGISTRY[GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError):
        name = getattr(GGMLQuantizationType, "_value2member_map_", {}).get(ggml_type)
        label = name.name if name is not None else f"type id {ggml_type}"
        supported = ", ".join(sorted(t.name for t in REGISTRY))
        raise QcpuError(f"unsupported tensor type {label} (supported: {supported})") from None


def dequantize(w: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """uint8[rows, row_bytes] raw blocks -> float32[rows, cols]."""
    out = np.empty((w.shape[0], cols), dtype=np.float32)
    kernel_for(ggml_type).dequantize(w, out)
    return out


# Rows dequantized at a time for batched products: a tile of ~1-4 MB stays in cache while BLAS reuses
# it for the whole batch. (The tile height changes OpenBLAS's edge kernels and so the last bits of the
# sums; on this model family that is enough to move near-tie greedy tokens, so keep it fixed.)
_TILE_ROWS = 512


def matmul(w: np.ndarray, ggml_type: int, x: np.ndarray, packed: bool = False, exact: bool = False) -> np.ndarray:
    """y = x @ W.T for raw weight blocks W (uint8[rows, row_bytes], or the packed variant's layout with
    `packed`) and float32 x[n, cols] -> [n, rows]. `exact`: every row through the matvec path, whatever
    n, so each output row is bit for bit its one-token matvec (speculative verification).

    Fewer tokens than the type's gemm_min_tokens: the type's fused dequant-dot matvec (each weight row read
    once for all of them, where the type has matvec_many; else one matvec per token).
    Several tokens (prefill): the type's integer GEMM (gemm.py) where it has one, else (float types)
    dequantize a tile of rows once and hand it to BLAS with the whole batch, the activations first rounded
    as the matvec (and llama.cpp) would convert them. Either way the weights are read once per batch.
    """
    kernel = kernel_for(ggml_type, packed)
    n, cols = x.shape
    rows = w.shape[0] * kernel.group_rows
    out = np.empty((n, rows), dtype=np.float32)
    if exact or n < kernel.gemm_min_tokens:
        if kernel.matvec_many is not None and (n > 1 or kernel.many_for_one):
            kernel.matvec_many((w,), np.ascontiguousarray(x, dtype=np.float32), (out,))
        else:
            for i in range(n):
                kernel.matvec(w, np.ascontiguousarray(x[i], dtype=np.float32), out[i])
        return out
    if kernel.gemm is not None:
        kernel.gemm(w, np.ascontiguousarray(x, dtype=np.float32), out)
        return out
    round_activations = ACTIVATION_ROUNDING.get(kernel.ggml_type)
    if round_activations is not None:
        x = round_activations(x)
    tile_rows = _TILE_ROWS
    tile = np.empty((min(tile_rows, rows), cols), dtype=np.float32)
    out_t = np.empty((rows, n), dtype=np.float32)  # W @ x.T, tile rows land contiguous for BLAS
    x_t = x.T
    for r0 in range(0, rows, tile_rows):
        r1 = min(r0 + tile_rows, rows)
        t = tile[: r1 - r0]
        kernel.dequantize(w[r0:r1], t)
        np.matmul(t, x_t, out=out_t[r0:r1])
    out[:] = out_t.T
    return out


def matmul_many(pairs, x: np.ndarray, exact: bool = False) -> list[np.ndarray]:
    """[x @ W.T for each (W, ggml_type) or (W, ggml_type, packed) in pairs]: several weights that read the
    same x float32[n, cols] (Q/K/V, gate/up), float32[n, rows_W] each. Fewer tokens than a type's
    gemm_min_tokens (decode, a server's batch): the weights of each type (and layout) go through its
    matvec_many together (x quantized once per type, one parallel region, each weight row read once for
    all n tokens); else as `matmul` one by one. `exact`: as `matmul`'s."""
    pairs = [(w, t, bool(more and more[0])) for w, t, *more in pairs]
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    outs: list = [None] * len(pairs)
    for kernel, idx in _groups(pairs, n, exact):
        if kernel is None:  # the batched path, or a type without matvec_many
            w, t, packed = pairs[idx[0]]
            outs[idx[0]] = matmul(w, t, x, packed, exact)
            continue
        ws = tuple(pairs[i][0] for i in idx)
        group = tuple(np.empty((n, pairs[i][0].shape[0] * kernel.group_rows), dtype=np.float32) for i in idx)
        kernel.matvec_many(ws, x, group)
        for i, out in zip(idx, group):
            outs[i] = out
    return outs


_GROUPINGS: dict[tuple, list] = {}


def _groups(pairs, n: int, exact: bool = False) -> list[tuple[QuantKernel | None, list[int]]]:
    """How matmul_many runs `pairs` for n tokens: (kernel, indices) per matvec pass (weights of one type
    and layout, and one array type, since Numba indexes a tuple at run time only if its arrays share
    one), (None, [i]) per weight that takes the batched path. It depends only on the weights' shapes,
    types and flags and on n, so it is worked out once for each (a decode step asks the same several
    times per layer)."""
    key = (n, exact, *((w.shape, w.flags.c_contiguous, w.flags.writeable, t, p) for w, t, p in pairs))
    plan = _GROUPINGS.get(key)
    if plan is None:
        by_type: dict[tuple, list[int]] = {}
        plan = []
        for i, (w, t, packed) in enumerate(pairs):
            kernel = kernel_for(t, packed)
            if (exact or n < kernel.gemm_min_tokens) and kernel.matvec_many is not None and (
                    n > 1 or kernel.many_for_one):
                by_type.setdefault((int(t), packed, w.flags.c_contiguous, w.flags.writeable), []).append(i)
            else:
                plan.append((None, [i]))
        plan += [(kernel_for(t, packed), idx) for (t, packed, _, _), idx in by_type.items()]
        if len(_GROUPINGS) > 4096:  # many batch sizes seen: start again
            _GROUPINGS.clear()
        _GROUPINGS[key] = plan
    return plan


# Importing a family module registers its types.
from qcpu.kernels import floats, k_quants, legacy, repack  # noqa: F401
from qcpu.kernels.activations import ACTIVATION_ROUNDING
