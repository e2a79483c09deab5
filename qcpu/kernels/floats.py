"""Unquantized weights: F32, F16, BF16 (raw little-endian bytes in, one uint8 row per weight row).

The matvecs follow llama.cpp's CPU backend (type_traits_cpu in ggml-cpu.c): the activation is first
converted to the weight's own format (vec_dot_type F32/F16/BF16 -- so x is rounded to fp16 or bf16
before the dot, like llama.cpp), then products are summed in float32.

The binary16 helpers here also decode the scales of the block-quantized families (legacy.py imports
them): Numba has no float16 type on the CPU, so scalar conversions are bit arithmetic; whole F16 rows
are widened with F16C's vcvtph2ps through a small LLVM IR intrinsic when the CPU has it.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels import register
from qcpu.kernels.cpu import F16C


@njit(cache=True)
def f16_to_f32(h):
    """Exact binary16 bits (any int type) -> float32, including subnormals, inf and NaN.

    half:   s eeeee mmmmmmmmmm
    single: s eeeeeeee mmmmmmmmmm0000000000000
    Normal: shift e and m into place and rebias the exponent (+127-15). Subnormal (e == 0): the value
    is m * 2**-24, computed from the integer so no denormal float32 is ever an operand (a CPU in
    flush-to-zero/denormals-are-zero mode would zero it). Inf/NaN (e == 31): all-ones exponent.
    """
    h32 = np.uint32(h) & np.uint32(0xFFFF)
    em = h32 & np.uint32(0x7FFF)
    sign = (h32 & np.uint32(0x8000)) << np.uint32(16)
    if em < np.uint32(0x0400):
        mag = np.float32(np.float32(em) * np.float32(2.0**-24)).view(np.uint32)
    elif em >= np.uint32(0x7C00):
        mag = np.uint32((em << np.uint32(13)) | np.uint32(0x7F800000))
    else:
        mag = np.uint32((em << np.uint32(13)) + np.uint32(112 << 23))
    return np.uint32(mag | sign).view(np.float32)


@njit(cache=True)
def f32_to_f16(f):
    """float32 -> binary16 bits (uint16), round-to-nearest-even: what F16C's vcvtps2ph and numpy do."""
    bits = np.float32(f).view(np.uint32)
    sign = np.uint32((bits >> np.uint32(16)) & np.uint32(0x8000))
    a = bits & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # NaN: keep it quiet
        return np.uint16(sign | np.uint32(0x7E00))
    if a >= np.uint32(0x477FF000):  # >= 65520 rounds past the largest half (65504)
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below 2**-14: half subnormal, a multiple of 2**-24
        # |f| * 2**24 is exact (power of two); rint is round-half-even. 1024 is the smallest normal,
        # whose encoding 0x0400 is the same integer, so rounding up into the normals needs no case.
        m = np.rint(np.float32(np.abs(np.float32(f))) * np.float32(16777216.0))
        return np.uint16(sign | np.uint32(m))
    # Normal: drop 13 mantissa bits with round-half-even, then rebias the exponent 127 -> 15.
    r = (a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    return np.uint16(sign | (r - np.uint32(112 << 10)))


@njit(cache=True)
def f32_to_bf16(f):
    """float32 -> bfloat16 bits, as ggml_compute_fp32_to_bf16: round-half-even, NaN forced quiet."""
    u = np.float32(f).view(np.uint32)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16((np.uint64(u) + np.uint64(0x7FFF) + np.uint64((u >> np.uint32(16)) & np.uint32(1))) >> np.uint64(16))


@njit(cache=True, inline="always")
def bf16_to_f32(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@njit(cache=True, inline="always")
def _check(w, n, rows, itemsize, what):
    if w.shape[1] != n * itemsize or w.shape[0] != rows:
        raise ValueError(what)


# ---- F32 --------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def dequantize_f32(w, out):
    _check(w, out.shape[1], out.shape[0], 4, "dequantize: weight row bytes do not match the output shape")
    wf = w.view(np.float32)
    for r in prange(w.shape[0]):
        out[r, :] = wf[r, :]


def _make_dot(bf16):
    """Intrinsic dot(a, b) -> float32: sum(a * b) over a[n] (float32, or bfloat16 bits if bf16) and float32
    b[n], both contiguous, in one order on every CPU: ggml's AVX2 f32/f16 one (four <8 x float>
    accumulators over steps of 32 with FMA; then acc0+acc2, acc1+acc3, their sum, and the 8 lanes
    pairwise; the tail last). A fastmath loop would instead be split at the host's own vector width and
    interleave, so an AVX-512 host would round differently from an AVX2 one."""
    a_dtype = types.uint16 if bf16 else types.float32

    @intrinsic
    def dot(typingctx, a, b):
        if not (isinstance(a, types.Array) and isinstance(b, types.Array) and a.dtype == a_dtype
                and b.dtype == types.float32 and a.ndim == b.ndim == 1 and a.layout == b.layout == "C"):
            return None
        sig = types.float32(a, b)

        def codegen(context, bld, signature, args):
            aa, bb = (context.make_array(t)(context, bld, v) for t, v in zip(signature.args, args))
            n = bld.extract_value(aa.shape, 0)
            f32, i32 = ir.FloatType(), ir.IntType(32)
            pa = bld.bitcast(aa.data, (ir.IntType(16) if bf16 else f32).as_pointer())
            pb = bld.bitcast(bb.data, f32.as_pointer())

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
            accs = [cgutils.alloca_once_value(bld, ir.Constant(v8, [0.0] * 8)) for _ in range(4)]
            n32 = bld.lshr(n, ir.Constant(n.type, 5))
            with cgutils.for_range(bld, n32) as loop:
                base = bld.shl(loop.index, ir.Constant(n.type, 5))
                for j, acc in enumerate(accs):
                    at = bld.add(base, ir.Constant(n.type, 8 * j))
                    y = bld.load(bld.bitcast(bld.gep(pb, [at]), v8.as_pointer()), align=4)
                    bld.store(contract(bld.fadd(contract(bld.fmul(load_a(at, 8), y)), bld.load(acc))), acc)
            s = [bld.load(acc) for acc in accs]
            v = bld.fadd(bld.fadd(s[0], s[2]), bld.fadd(s[1], s[3]))
            v = bld.fadd(bld.shuffle_vector(v, v, lanes([0, 1, 2, 3])), bld.shuffle_vector(v, v, lanes([4, 5, 6, 7])))
            v = bld.fadd(bld.shuffle_vector(v, v, lanes([0, 2])), bld.shuffle_vector(v, v, lanes([1, 3])))
            total = cgutils.alloca_once_value(
                bld, bld.fadd(bld.extract_element(v, ir.Constant(i32, 0)), bld.extract_element(v, ir.Constant(i32, 1))))
            with cgutils.for_range(bld, n, start=bld.shl(n32, ir.Constant(n.type, 5))) as loop:
                y = bld.load(bld.gep(pb, [loop.index]))
                bld.store(contract(bld.fadd(bld.load(total), contract(bld.fmul(load_a(loop.index, 1), y)))), total)
            return bld.load(total)

        return sig, codegen

    return dot


dot_f32, dot_bf16 = _make_dot(False), _make_dot(True)


# No fastmath in the matvecs: their sums are _make_dot's, in its fixed order.
@njit(cache=True, parallel=True)
def matvec_f32(w, x, out):
    _check(w, x.shape[0], out.shape[0], 4, "matvec: weight row bytes do not match the activation length")
    wf = w.view(np.float32)
    for r in prange(w.shape[0]):
        out[r] = dot_f32(wf[r], x)


# ---- F16 --------------------------------------------------------------------------------------------


@njit(cache=True)
def _halves_to_f32_portable(src, dst):
    for i in range(src.shape[0]):
        dst[i] = f16_to_f32(src[i])


@intrinsic
def _halves_to_f32_f16c(typingctx, src, dst):
    """dst[:] = src (binary16 bits) as float32, eight at a time with vcvtph2ps (LLVM's fpext from
    half, which it only emits inline when the CPU has F16C)."""
    sig = types.void(src, dst)

    def codegen(context, b, signature, args):
        s_, d_ = (context.make_array(t)(context, b, a) for t, a in zip(signature.args, args))
        n = b.extract_value(s_.shape, 0)
        half, f32 = ir.HalfType(), ir.FloatType()
        sp, dp = b.bitcast(s_.data, half.as_pointer()), b.bitcast(d_.data, f32.as_pointer())
        vs, vd = ir.VectorType(half, 8).as_pointer(), ir.VectorType(f32, 8).as_pointer()
        n8 = b.lshr(n, ir.Constant(n.type, 3))
        with cgutils.for_range(b, n8) as loop:
            at = b.shl(loop.index, ir.Constant(n.type, 3))
            v = b.load(b.bitcast(b.gep(sp, [at]), vs), align=2)
            b.store(b.fpext(v, ir.VectorType(f32, 8)), b.bitcast(b.gep(dp, [at]), vd), align=4)
        with cgutils.for_range(b, n, start=b.shl(n8, ir.Constant(n.type, 3))) as loop:
            b.store(b.fpext(b.load(b.gep(sp, [loop.index])), f32), b.gep(dp, [loop.index]))
        return context.get_dummy_value()

    return sig, codegen


_halves_to_f32 = _halves_to_f32_f16c if F16C else _halves_to_f32_portable


@njit(cache=True, parallel=True)
def dequantize_f16(w, out):
    _check(w, out.shape[1], out.shape[0], 2, "dequantize: weight row bytes do not match the output shape")
    wh = w.view(np.uint16)
    for r in prange(w.shape[0]):
        _halves_to_f32(wh[r], out[r])


@njit(cache=True)
def round_to_f16(x):
    """x rounded to binary16 and widened back: llama.cpp converts the activation to F16 first."""
    y = np.empty_like(x)
    for i in range(x.shape[0]):
        y[i] = f16_to_f32(f32_to_f16(x[i]))
    return y


_ROWS_PER_CHUNK = 16


@njit(cache=True, parallel=True)
def matvec_f16(w, x, out):
    """Each row is widened into a per-chunk float32 scratch row (preallocated, stays in L1/L2), then
    dotted with x (dot_f32)."""
    _check(w, x.shape[0], out.shape[0], 2, "matvec: weight row bytes do not match the activation length")
    wh = w.view(np.uint16)
    xh = round_to_f16(x)
    rows, n = wh.shape
    chunks = (rows + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    scratch = np.empty((chunks, n), np.float32)
    for c in prange(chunks):
        buf = scratch[c]
        for r in range(c * _ROWS_PER_CHUNK, min(rows, (c + 1) * _ROWS_PER_CHUNK)):
            _halves_to_f32(wh[r], buf)
            out[r] = dot_f32(buf, xh)


# ---- BF16 -------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def dequantize_bf16(w, out):
    _check(w, out.shape[1], out.shape[0], 2, "dequantize: weight row bytes do not match the output shape")
    wh = w.view(np.uint16)
    for r in prange(w.shape[0]):
        for i in range(wh.shape[1]):
            out[r, i] = bf16_to_f32(wh[r, i])


@njit(cache=True)
def round_to_bf16(x):
    y = np.empty_like(x)
    for i in range(x.shape[0]):
        y[i] = bf16_to_f32(f32_to_bf16(x[i]))
    return y


@njit(cache=True, parallel=True)
def matvec_bf16(w, x, out):
    _check(w, x.shape[0], out.shape[0], 2, "matvec: weight row bytes do not match the activation length")
    wh = w.view(np.uint16)
    xb = round_to_bf16(x)
    for r in prange(w.shape[0]):
        out[r] = dot_bf16(wh[r], xb)


register(GGMLQuantizationType.F32, dequantize_f32, matvec_f32)
register(GGMLQuantizationType.F16, dequantize_f16, matvec_f16)
register(GGMLQuantizationType.BF16, dequantize_bf16, matvec_bf16)
