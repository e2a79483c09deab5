"""The one home of binary16 (fp16) and bfloat16 conversions: the kernels, attention and the quantizers use these.

    fp16:    s eeeee mmmmmmmmmm            (bias 15)
    bf16:    s eeeeeeee mmmmmmm            (the top half of a float32)
    float32: s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm   (bias 127)

Widening is exact (every half is a float32); narrowing rounds to nearest even, as ggml's
GGML_FP32_TO_FP16 / ggml_compute_fp32_to_bf16, F16C's vcvtps2ph and numpy do. Numba has no float16 type on
the CPU, so scalars are bit arithmetic; in emitted LLVM IR a half is widened with F16C's vcvtph2ps when the
CPU has it, else with the same integer arithmetic (`ir_half_to_f32`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels.cpu import F16C
from qcpu.kernels.llvm_ir import _F32, _I16, _I32, _load


@njit(cache=True)
def f16_to_f32(h):
    """Exact binary16 bits (any int type) -> float32, including subnormals, inf and NaN (payload kept).

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
    """float32 -> binary16 bits (uint16), round-to-nearest-even; overflow -> inf, NaN -> quiet 0x7E00."""
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
    # Normal: drop 13 mantissa bits with round-half-even, then rebias the exponent 127 -> 15; a carry
    # out of the mantissa correctly bumps the exponent.
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
def f16_at(row, o):
    """The little-endian half at row[o:o+2] (uint8) as float32, exactly."""
    return f16_to_f32(np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8)))


@njit(cache=True, inline="always")
def put_f16(y, o, h):
    """Store half bits h little-endian at y[o:o+2] (uint8)."""
    y[o] = h & 0xFF
    y[o + 1] = (h >> 8) & 0xFF


@njit(cache=True)
def rounded(x, bf16):
    """float32[n] rounded to fp16 (bf16 if `bf16`) and widened back: llama.cpp converts the activation to
    the weight's float format before the dot."""
    y = np.empty_like(x)
    for i in range(x.shape[0]):
        y[i] = bf16_to_f32(f32_to_bf16(x[i])) if bf16 else f16_to_f32(f32_to_f16(x[i]))
    return y


@njit(cache=True)
def bf16_bits(x):
    """float32[n] -> uint16[n] bfloat16 bits (f32_to_bf16 on each)."""
    out = np.empty(x.shape[0], np.uint16)
    for i in range(x.shape[0]):
        out[i] = f32_to_bf16(x[i])
    return out


# ---- whole rows: dst float32[n] <- src uint16[n] half bits -----------------------------------------


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
        half = ir.HalfType()
        sp, dp = b.bitcast(s_.data, half.as_pointer()), b.bitcast(d_.data, _F32.as_pointer())
        vs, vd = ir.VectorType(half, 8).as_pointer(), ir.VectorType(_F32, 8).as_pointer()
        n8 = b.lshr(n, ir.Constant(n.type, 3))
        with cgutils.for_range(b, n8) as loop:
            at = b.shl(loop.index, ir.Constant(n.type, 3))
            v = b.load(b.bitcast(b.gep(sp, [at]), vs), align=2)
            b.store(b.fpext(v, ir.VectorType(_F32, 8)), b.bitcast(b.gep(dp, [at]), vd), align=4)
        with cgutils.for_range(b, n, start=b.shl(n8, ir.Constant(n.type, 3))) as loop:
            b.store(b.fpext(b.load(b.gep(sp, [loop.index])), _F32), b.gep(dp, [loop.index]))
        return context.get_dummy_value()

    return sig, codegen


halves_to_f32 = _halves_to_f32_f16c if F16C else _halves_to_f32_portable


# ---- LLVM IR ----------------------------------------------------------------------------------------


def ir_half_to_f32(b, h16, f16c):
    """IR: i16 half bits -> float, or lane-wise <n x i16> -> <n x float>. With F16C one vcvtph2ps (LLVM
    only emits it inline when the target has F16C); else f16_to_f32's arithmetic, branch-free: exact, and
    no denormal float32 operands."""
    n = h16.type.count if isinstance(h16.type, ir.VectorType) else 0

    def ty(t):
        return ir.VectorType(t, n) if n else t

    def c(t, v):
        return ir.Constant(ty(t), [v] * n if n else v)

    if f16c:
        return b.fpext(b.bitcast(h16, ty(ir.HalfType())), ty(_F32))
    h = b.zext(h16, ty(_I32))
    em = b.and_(h, c(_I32, 0x7FFF))
    shifted = b.shl(em, c(_I32, 13))
    normal = b.add(shifted, c(_I32, 112 << 23))
    special = b.or_(shifted, c(_I32, 0x7F800000))
    sub = b.bitcast(b.fmul(b.sitofp(em, ty(_F32)), c(_F32, 2.0**-24)), ty(_I32))
    mag = b.select(b.icmp_unsigned("<", em, c(_I32, 0x0400)), sub,
                   b.select(b.icmp_unsigned(">=", em, c(_I32, 0x7C00)), special, normal))
    sign = b.shl(b.and_(h, c(_I32, 0x8000)), c(_I32, 16))
    return b.bitcast(b.or_(mag, sign), ty(_F32))


def ir_half_at(b, base, offset, f16c):
    """IR: the little-endian half at byte pointer base + offset, as float.

    With F16C through inline asm (vmovd then vcvtph2ps): LLVM lowers a scalar half load to `vpinsrw $0,
    mem, %xmmN, ...`, which merges into whatever register N holds, often an accumulator of the loop
    around it; the false dependency then chains every iteration to that FMA's latency (3x slower
    decode attention over Q8_0 values)."""
    h16 = _load(b, base, offset, _I16)
    if not f16c:
        return ir_half_to_f32(b, h16, f16c)
    llvm.initialize_native_asmparser()  # numba does not: without it LLVM aborts on any inline asm
    fn = ir.FunctionType(ir.FloatType(), [ir.IntType(32)])
    return b.call(ir.InlineAsm(fn, "vmovd $1, $0\n\tvcvtph2ps $0, $0", "=x,r"), [b.zext(h16, ir.IntType(32))])
