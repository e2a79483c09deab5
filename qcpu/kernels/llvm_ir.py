"""The LLVM IR vocabulary the hand-written block kernels share (legacy.py, k_quants.py)."""

from llvmlite import ir

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32, _F64 = ir.FloatType(), ir.DoubleType()


def _vec(n, t):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vec(n, t), [v] * n)


def _lanes(idx):
    idx = list(idx)
    return ir.Constant(_vec(len(idx), _I32), idx)
