"""The LLVM IR vocabulary the hand-written block kernels share (legacy.py, k_quants.py, halves.py)."""

from contextlib import contextmanager

from llvmlite import ir
from numba.core import cgutils

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32, _F64 = ir.FloatType(), ir.DoubleType()


def _vec(n, t):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vec(n, t), [v] * n)


def _lanes(idx):
    idx = list(idx)
    return ir.Constant(_vec(len(idx), _I32), idx)


def _load(b, base, offset, ty):
    """Unaligned load of `ty` at byte pointer base + offset (blocks are 18..210 bytes, so fields are not
    aligned). Multi-byte fields are read as little-endian, as GGUF stores them, so this assumes a
    little-endian CPU (x86, ARM in its usual mode)."""
    p = b.gep(base, [offset if isinstance(offset, ir.Value) else ir.Constant(_I64, offset)])
    return b.load(b.bitcast(p, ty.as_pointer()), align=1)


# Software prefetch distance of the matvec weight streams. The hardware prefetcher alone kept them at ~11-14
# GB/s per core here; 4 KiB ahead (better than 0.5-2 KiB) lifted them, in three interleaved A/B rounds on
# 4B-shape matrices, 2 threads: packed Q4_0 22.6 -> 24.7 GB/s, Q4_K 19.7 -> 25.7, Q6_K 22.3 -> 26.5
# (tools/membw.py: 17.8 / 28.6 GB/s on 1 / 2 threads); 4B Q4_K_M decode on one thread 4.1 -> 5.6 tok/s.
PREFETCH_BYTES = 4096


def _prefetch(b, base, offset, span):
    """Prefetch (read, to all cache levels) the `span` bytes PREFETCH_BYTES past byte pointer base + offset
    (offset an IR i64), one instruction per 64-byte line; past the end of the data it is harmless (a
    prefetch never faults)."""
    if not PREFETCH_BYTES:
        return
    for line in range(0, span, 64):
        at = b.add(offset, ir.Constant(_I64, PREFETCH_BYTES + line))
        _call(b, "llvm.prefetch.p0i8", ir.VoidType(), b.gep(base, [at]), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
              ir.Constant(_I32, 1))


def _call(b, name, ret, *args):
    """Call the LLVM intrinsic `name` (declared on first use in this module)."""
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return b.call(fn, args)


def _contract(instr):
    # Allow mul+add -> FMA (as llama.cpp's _mm256_fmadd_ps) without Numba's blanket fastmath.
    instr.flags.append("contract")
    return instr


def _splat_value(b, v, n):
    """<n x T>: the IR value v (of type T) in every lane."""
    undef = ir.Constant(_vec(n, v.type), None)
    return b.shuffle_vector(b.insert_element(undef, v, ir.Constant(_I32, 0)), undef, _lanes([0] * n))


def _dot8_portable(b, wq, xv, signed):
    """<8 x i32>, lane k = the exact sum of products 4k..4k+3 of two <32 x i8> (wq signed or unsigned, xv
    signed): the lanes of pmaddubsw + pmaddwd-by-ones, in target-independent IR, so the float sums after
    it are the same on every CPU."""
    wx = (b.sext if signed else b.zext)(wq, _vec(32, _I32))
    prod = b.mul(wx, b.sext(xv, _vec(32, _I32)))
    pairs = b.add(_shuffle(b, prod, range(0, 32, 2)), _shuffle(b, prod, range(1, 32, 2)))
    return b.add(_shuffle(b, pairs, range(0, 16, 2)), _shuffle(b, pairs, range(1, 16, 2)))


def _shuffle(b, v, idx):
    return b.shuffle_vector(v, v, _lanes(idx))


def _maddubs(b, u, y, avx2):
    """pmaddubsw: <32 x u8> u, <32 x i8> y -> <16 x i16>, lane k = u[2k]*y[2k] + u[2k+1]*y[2k+1]. The
    portable IR computes the products in int16: callers keep |u*y| pair sums within int16 (AVX2 saturates)."""
    if avx2:
        return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(16, _I16), u, y)
    p = b.mul(b.zext(u, _vec(32, _I16)), b.sext(y, _vec(32, _I16)))
    return b.add(_shuffle(b, p, range(0, 32, 2)), _shuffle(b, p, range(1, 32, 2)))


def _madd(b, p, s, avx2):
    """pmaddwd: <16 x i16> p, s -> <8 x i32>, lane k = p[2k]*s[2k] + p[2k+1]*s[2k+1]."""
    if avx2:
        return _call(b, "llvm.x86.avx2.pmadd.wd", _vec(8, _I32), p, s)
    e = b.mul(b.sext(_shuffle(b, p, range(0, 16, 2)), _vec(8, _I32)), b.sext(_shuffle(b, s, range(0, 16, 2)), _vec(8, _I32)))
    o = b.mul(b.sext(_shuffle(b, p, range(1, 16, 2)), _vec(8, _I32)), b.sext(_shuffle(b, s, range(1, 16, 2)), _vec(8, _I32)))
    return b.add(e, o)


@contextmanager
def _loop_kept(b, count):
    """`for i in range(count)` in IR (count an i64 constant or value), yielding i, and never unrolled: the
    back edge carries llvm.loop.unroll.disable. For bodies whose registers only fit one iteration at a time:
    cgutils.for_range's loop of 2 trip counts LLVM unrolled whole and rescheduled into spills."""
    count = count if isinstance(count, ir.Value) else ir.Constant(_I64, count)
    pre = b.basic_block
    cond, body, end = (b.append_basic_block(name) for name in ("kept.cond", "kept.body", "kept.end"))
    b.branch(cond)
    b.position_at_end(cond)
    i = b.phi(_I64)
    i.add_incoming(ir.Constant(_I64, 0), pre)
    b.cbranch(b.icmp_signed("<", i, count), body, end)
    b.position_at_end(body)
    yield i
    i.add_incoming(b.add(i, ir.Constant(_I64, 1)), b.basic_block)
    latch = b.branch(cond)
    disable = b.module.add_metadata([ir.MetaDataString(b.module, "llvm.loop.unroll.disable")])
    loop_id = b.module.add_metadata([disable, disable])
    loop_id.operands = (loop_id, disable)  # a loop id refers to itself (LLVM LangRef, "llvm.loop")
    latch.set_metadata("llvm.loop", loop_id)
    b.position_at_end(end)
