"""Dense operations of the transformer: RMSNorm and the SwiGLU gate (RoPE: rope.py; attention: attention.py).

Arithmetic follows llama.cpp's CPU backend where it is cheap to do so (float64 sum in RMSNorm, ggml's own
vectorized expf in SiLU), so that our logits track the reference closely.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels.llvm_ir import _F32, _I32, _I64, _call, _splat, _vec


@njit(cache=True, inline="always")
def _rms_norm_row(x, weight, eps, out, r):
    # ggml_compute_forward_rms_norm_f32, then ggml_mul by the weight: squares in float32 summed in double
    # in order, mean and scale in float32
    total = 0.0
    for i in range(x.shape[1]):
        total += np.float64(x[r, i] * x[r, i])
    scale = np.float32(1.0) / np.sqrt(np.float32(total / x.shape[1]) + eps)
    for i in range(x.shape[1]):
        out[r, i] = (x[r, i] * scale) * weight[i]


@njit(parallel=True, cache=True)
def _rms_norm(x, weight, eps, out):
    for r in prange(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, r)


@njit(cache=True)
def _rms_norm_serial(x, weight, eps, out):
    for r in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, r)


# Values below which the row-wise ops run on the calling thread: a decode step's row, or a server's batch
# of a few, costs a microsecond or so per 1000 values, and waking the sleeping workers ~50-80 us.
SERIAL_VALUES = 1 << 15


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x float32[n, dim] / rms(x) * weight float32[dim] -> float32[n, dim], as ggml's rms_norm then mul
    (ggml_compute_forward_rms_norm_f32: x*x in float32 summed in double, 1/sqrtf(mean + eps) in float32)."""
    out = np.empty(x.shape, np.float32)
    run = _rms_norm_serial if x.size <= SERIAL_VALUES else _rms_norm
    run(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)
    return out


@intrinsic
def _fma(typingctx, a, b, c):
    """float32 a*b + c rounded once (llvm.fma: one instruction where the CPU has FMA)."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return _call(builder, "llvm.fma.f32", _F32, *args)

    return types.float32(a, b, c), codegen


def _h(s):
    return np.float32(float.fromhex(s))


_R, _LOG2E, _LN2_HI, _LN2_LO = _h("0x1.8p23"), _h("0x1.715476p+0"), _h("0x1.62e4p-1"), _h("0x1.7f7d1cp-20")
_P0, _P1, _P2, _P3, _P4 = _h("0x1.0e4020p-7"), _h("0x1.573e2ep-5"), _h("0x1.555e66p-3"), _h("0x1.fffdb6p-2"), _h("0x1.ffffecp-1")


@njit(cache=True, inline="always")
def _expf(x):
    """exp(x) for float32 as ggml_v_expf (ggml-cpu/vec.h, after ARM's optimized-routines expf): x = n ln2
    + b with |b| <= ln2/2, a degree-5 polynomial for e^b, 2^n put in the exponent bits, and the range
    ends (|n| > 126) scaled in two steps. The same IEEE operations as its AVX2+FMA code, lane by lane."""
    z = _fma(x, _LOG2E, _R)
    n = z - _R
    b = _fma(-n, _LN2_LO, _fma(-n, _LN2_HI, x))
    e = np.uint32(np.float32(z).view(np.uint32) << np.uint32(23))  # integer ops wrap in 32 bits, as the SIMD lanes do
    k = np.uint32(e + np.uint32(0x3F800000)).view(np.float32)  # 2**n: e plus the bits of 1.0
    u = b * b
    j = _fma(_fma(_fma(_P0, b, _P1), u, _fma(_P2, b, _P3)), u, _P4 * b)
    if abs(n) <= np.float32(126.0):
        return _fma(j, k, k)
    g = np.uint32(0x82000000) if n <= np.float32(0.0) else np.uint32(0)
    s1 = np.uint32(g + np.uint32(0x7F000000)).view(np.float32)
    if abs(n) > np.float32(192.0):
        return s1 * s1
    s2 = np.uint32(e - g).view(np.float32)
    return _fma(s2, j, s2) * s1


def _ir_expf(b, x):
    """IR: _expf on <8 x float>, ggml_v_expf's AVX2 code: both range ends computed and blended by
    selects, the same operations (llvm.fma: one rounding, as _fma) as the scalar version, lane by lane."""
    f8, i8 = _vec(8, _F32), _vec(8, _I32)

    def fma(a, b_, c):
        return _call(b, "llvm.fma.v8f32", f8, a, b_, c)

    def c(v):
        return _splat(_F32, 8, float(v))

    def bits(v):
        return b.bitcast(v, i8)

    def flt(v):
        return b.bitcast(v, f8)

    def ci(v):
        return ir.Constant(i8, [v] * 8)

    z = fma(x, c(_LOG2E), c(_R))
    n = b.fsub(z, c(_R))
    bb = fma(b.fneg(n), c(_LN2_LO), fma(b.fneg(n), c(_LN2_HI), x))
    e = b.shl(bits(z), ci(23))
    k = flt(b.add(e, ci(0x3F800000)))
    u = b.fmul(bb, bb)
    j = fma(fma(fma(c(_P0), bb, c(_P1)), u, fma(c(_P2), bb, c(_P3))), u, b.fmul(c(_P4), bb))
    an = _call(b, "llvm.fabs.v8f32", f8, n)
    g = b.select(b.fcmp_ordered("<=", n, c(0.0)), ci(0x82000000 - (1 << 32)), ci(0))
    s1 = flt(b.add(g, ci(0x7F000000)))
    s2 = flt(b.sub(e, g))
    mid = b.select(b.fcmp_ordered(">", an, c(126.0)), b.fmul(fma(s2, j, s2), s1), fma(j, k, k))
    return b.select(b.fcmp_ordered(">", an, c(192.0)), b.fmul(s1, s1), mid)


@intrinsic
def _swiglu_vectors(typingctx, gate, up, out, start, count):
    """out.flat[start:start + 8 * count] = silu(gate) * up, 8 values at a time in vector IR (gate, up, out
    float32 C-contiguous arrays of one shape): x / (1 + expf(-x)) * up with _ir_expf, the scalar loop's
    operations, so its bits. The scalar loop does not vectorize (expf's range-end branches)."""
    arrays = (gate, up, out)
    if not all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in arrays):
        return None
    sig = types.void(gate, up, out, start, count)

    def codegen(context, b, signature, args):
        ta = signature.args
        ptrs = [b.bitcast(context.make_array(ta[i])(context, b, args[i]).data, _F32.as_pointer()) for i in range(3)]
        at0 = context.cast(b, args[3], ta[3], types.int64)
        n = context.cast(b, args[4], ta[4], types.int64)
        f8 = _vec(8, _F32)
        with cgutils.for_range(b, n) as loop:
            at = b.add(at0, b.shl(loop.index, ir.Constant(_I64, 3)))
            gp, up_, op = (b.bitcast(b.gep(p_, [at]), f8.as_pointer()) for p_ in ptrs)
            x = b.load(gp, align=4)
            silu = b.fdiv(x, b.fadd(_splat(_F32, 8, 1.0), _ir_expf(b, b.fneg(x))))
            b.store(b.fmul(silu, b.load(up_, align=4)), op, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _swiglu_row(gate, up, out, r):
    cols = gate.shape[1]
    whole = cols // 8
    _swiglu_vectors(gate, up, out, r * cols, whole)
    for i in range(whole * 8, cols):
        x = gate[r, i]
        out[r, i] = x / (np.float32(1.0) + _expf(-x)) * up[r, i]


@njit(parallel=True, cache=True)
def _swiglu(gate, up, out):
    for r in prange(gate.shape[0]):
        _swiglu_row(gate, up, out, r)


@njit(cache=True)
def _swiglu_serial(gate, up, out):
    for r in range(gate.shape[0]):
        _swiglu_row(gate, up, out, r)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, float32[n, ffn_dim] each -> float32[n, ffn_dim]; silu(x) = x / (1 + exp(-x)) with
    ggml's expf, as ggml_vec_swiglu_f32 (the FFN of llama.cpp's graph: ggml_swiglu_split)."""
    out = np.empty_like(gate)
    run = _swiglu_serial if gate.size <= SERIAL_VALUES else _swiglu
    run(np.ascontiguousarray(gate, dtype=np.float32), np.ascontiguousarray(up, dtype=np.float32), out)
    return out
