"""Unquantized weights: F32, F16, BF16 (raw little-endian bytes in, one uint8 row per weight row).

The matvecs follow llama.cpp's CPU backend (type_traits_cpu in ggml-cpu.c): the activation is first
converted to the weight's own format (vec_dot_type F32/F16/BF16 -- so x is rounded to fp16 or bf16
before the dot, like llama.cpp), then products are summed in float32.

The conversions themselves live in halves.py (F16 rows are widened with F16C's vcvtph2ps where the CPU
has it). `dot_f32` is also attention's dot product.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels import check_rows, locate_row, register, total_rows
from qcpu.kernels.halves import bf16_to_f32, halves_to_f32, rounded


# ---- F32 --------------------------------------------------------------------------------------------

_DEQ_SHAPE = "dequantize: weight row bytes do not match the output shape"
_MV_SHAPE = "matvec: weight row bytes do not match the activation length"


@njit(cache=True, parallel=True)
def dequantize_f32(w, out):
    check_rows(w, out.shape[0], out.shape[1], 1, 4, _DEQ_SHAPE)
    wf = w.view(np.float32)
    for r in prange(w.shape[0]):
        out[r, :] = wf[r, :]


def _make_dot(bf16, tokens=1):
    """Intrinsic dot(a, b) -> float32: sum(a * b) over a[n] (float32, or bfloat16 bits if bf16) and float32
    b[n], both contiguous, in one order on every CPU: ggml's AVX2 f32/f16 one (four <8 x float>
    accumulators over steps of 32 with FMA; then acc0+acc2, acc1+acc3, their sum, and the 8 lanes
    pairwise; the tail last). A fastmath loop would instead be split at the host's own vector width and
    interleave, so an AVX-512 host would round differently from an AVX2 one.

    tokens > 1: dot(a, b) with b[tokens, n] -> UniTuple(float32, tokens), each exactly dot(a, b[t]) (its
    own accumulators, the same order), a's vectors loaded once for all: a few tokens against one weight
    row (the multi-token matvec)."""
    a_dtype = types.uint16 if bf16 else types.float32

    @intrinsic
    def dot(typingctx, a, b):
        if not (isinstance(a, types.Array) and isinstance(b, types.Array) and a.dtype == a_dtype
                and b.dtype == types.float32 and a.ndim == 1 and b.ndim == (1 if tokens == 1 else 2)
                and a.layout == b.layout == "C"):
            return None
        sig = (types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens))(a, b)

        def codegen(context, bld, signature, args):
            aa, bb = (context.make_array(t)(context, bld, v) for t, v in zip(signature.args, args))
            n = bld.extract_value(aa.shape, 0)
            f32, i32 = ir.FloatType(), ir.IntType(32)
            pa = bld.bitcast(aa.data, (ir.IntType(16) if bf16 else f32).as_pointer())
            pb0 = bld.bitcast(bb.data, f32.as_pointer())
            pbs = [bld.gep(pb0, [bld.mul(n, ir.Constant(n.type, t))]) for t in range(tokens)]

            def load_a(at, width):
                if width == 1:
                    v = bld.load(bld.gep(pa, [at]))
                else:
                    v = bld.load(bld.bitcast(bld.gep(pa, [at]), ir.VectorType(pa.type.pointee, width).as_pointer()), align=2)
                if not bf16:
                    return v
                wide = i32 if width == 1 else ir.VectorType(i32, width)
                bits = bld.shl(bld.zext(v, wide), ir.Constant(wide, 16) if width == 1 else ir.Constant(wide, [16] * width))
                return bld.bitcast(bits, f32 if width == 1 else ir.VectorType(f32, width))

            def contract(instr):  # FMA, as ggml's _mm256_fmadd_ps, where the target has it
                instr.flags.append("contract")
                return instr

            def lanes(idx):
                return ir.Constant(ir.VectorType(i32, len(idx)), idx)

            v8 = ir.VectorType(f32, 8)
            accs = [[cgutils.alloca_once_value(bld, ir.Constant(v8, [0.0] * 8)) for _ in range(4)]
                    for _ in range(tokens)]
            n32 = bld.lshr(n, ir.Constant(n.type, 5))
            with cgutils.for_range(bld, n32) as loop:
                base = bld.shl(loop.index, ir.Constant(n.type, 5))
                for j in range(4):
                    at = bld.add(base, ir.Constant(n.type, 8 * j))
                    x = load_a(at, 8)
                    for pb, acc in zip(pbs, (row[j] for row in accs)):
                        y = bld.load(bld.bitcast(bld.gep(pb, [at]), v8.as_pointer()), align=4)
                        bld.store(contract(bld.fadd(contract(bld.fmul(x, y)), bld.load(acc))), acc)
            totals = []
            for pb, row in zip(pbs, accs):
                s = [bld.load(acc) for acc in row]
                v = bld.fadd(bld.fadd(s[0], s[2]), bld.fadd(s[1], s[3]))
                v = bld.fadd(bld.shuffle_vector(v, v, lanes([0, 1, 2, 3])), bld.shuffle_vector(v, v, lanes([4, 5, 6, 7])))
                v = bld.fadd(bld.shuffle_vector(v, v, lanes([0, 2])), bld.shuffle_vector(v, v, lanes([1, 3])))
                total = cgutils.alloca_once_value(
                    bld, bld.fadd(bld.extract_element(v, ir.Constant(i32, 0)), bld.extract_element(v, ir.Constant(i32, 1))))
                with cgutils.for_range(bld, n, start=bld.shl(n32, ir.Constant(n.type, 5))) as loop:
                    y = bld.load(bld.gep(pb, [loop.index]))
                    bld.store(contract(bld.fadd(bld.load(total), contract(bld.fmul(load_a(loop.index, 1), y)))), total)
                totals.append(bld.load(total))
            if tokens == 1:
                return totals[0]
            return context.make_tuple(bld, signature.return_type, totals)

        return sig, codegen

    return dot


dot_f32, dot_bf16 = _make_dot(False), _make_dot(True)
dot2_f32 = _make_dot(False, tokens=2)  # two tokens against one row, each exactly dot_f32


# No fastmath in the matvecs: their sums are _make_dot's, in its fixed order.
@njit(cache=True, parallel=True)
def matvec_f32(w, x, out):
    check_rows(w, out.shape[0], x.shape[0], 1, 4, _MV_SHAPE)
    wf = w.view(np.float32)
    for r in prange(w.shape[0]):
        out[r] = dot_f32(wf[r], x)


# ---- F16 --------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def dequantize_f16(w, out):
    check_rows(w, out.shape[0], out.shape[1], 1, 2, _DEQ_SHAPE)
    wh = w.view(np.uint16)
    for r in prange(w.shape[0]):
        halves_to_f32(wh[r], out[r])


_ROWS_PER_CHUNK = 16


@njit(cache=True, parallel=True)
def matvec_f16(w, x, out):
    """Each row is widened into a per-chunk float32 scratch row (preallocated, stays in L1/L2), then
    dotted with x (dot_f32)."""
    check_rows(w, out.shape[0], x.shape[0], 1, 2, _MV_SHAPE)
    wh = w.view(np.uint16)
    xh = rounded(x, False)
    rows, n = wh.shape
    chunks = (rows + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    scratch = np.empty((chunks, n), np.float32)
    for c in prange(chunks):
        buf = scratch[c]
        for r in range(c * _ROWS_PER_CHUNK, min(rows, (c + 1) * _ROWS_PER_CHUNK)):
            halves_to_f32(wh[r], buf)
            out[r] = dot_f32(buf, xh)


def matvec_many_f16(ws, x, outs):
    """A few tokens x float32[n, cols] through the F16 weights of the tuple ws (outs: float32[n, rows] each),
    in one parallel region: each row is widened once and dotted with every token, so the weights are read
    once for all of them, and each token's output is bit for bit matvec_f16's (the same widening and
    dot_f32). Speculative checking and exact multi-row passes use it."""
    _many_f16(ws, x, outs, numba.get_num_threads())


@njit(cache=True, parallel=True)
def _many_f16(ws, x, outs, threads):
    n, cols = x.shape
    for m in range(len(ws)):
        if outs[m].shape[0] != n:
            raise ValueError("matvec: outputs are not [tokens, rows]")
        check_rows(ws[m], outs[m].shape[1], cols, 1, 2, _MV_SHAPE)
    xh = np.empty_like(x)
    for t in range(n):
        xh[t] = rounded(x[t], False)
    rows = total_rows(ws)
    chunks = (rows + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    workers = min(threads, chunks)
    scratch = np.empty((workers, cols), np.float32)  # one widened row per worker, in L1
    for k in prange(workers):
        buf = scratch[k]
        for c in range(k, chunks, workers):
            for r in range(c * _ROWS_PER_CHUNK, min(rows, (c + 1) * _ROWS_PER_CHUNK)):
                m, i = locate_row(ws, r)
                halves_to_f32(ws[m][i].view(np.uint16), buf)
                for t in range(0, n - 1, 2):
                    outs[m][t, i], outs[m][t + 1, i] = dot2_f32(buf, xh[t:t + 2])
                if n % 2:
                    outs[m][n - 1, i] = dot_f32(buf, xh[n - 1])


# ---- BF16 -------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def dequantize_bf16(w, out):
    check_rows(w, out.shape[0], out.shape[1], 1, 2, _DEQ_SHAPE)
    wh = w.view(np.uint16)
    for r in prange(w.shape[0]):
        for i in range(wh.shape[1]):
            out[r, i] = bf16_to_f32(wh[r, i])


@njit(cache=True, parallel=True)
def matvec_bf16(w, x, out):
    check_rows(w, out.shape[0], x.shape[0], 1, 2, _MV_SHAPE)
    wh = w.view(np.uint16)
    xb = rounded(x, True)
    for r in prange(w.shape[0]):
        out[r] = dot_bf16(wh[r], xb)


register(GGMLQuantizationType.F32, dequantize_f32, matvec_f32)
register(GGMLQuantizationType.F16, dequantize_f16, matvec_f16, matvec_many=matvec_many_f16)
register(GGMLQuantizationType.BF16, dequantize_bf16, matvec_bf16)
