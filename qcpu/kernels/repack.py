"""Legacy-quant weights repacked at load into groups of 8 interleaved rows (llama.cpp's repack.cpp idea).

Why: a decode matvec over row-major blocks pays, for every row and block, a scalar fp16 scale conversion,
a broadcast and the nibble unpack on 32 weights: ~20 instructions per 18-byte Q4_0 block, which holds a
core to ~9 GB/s, half of what it can read. With 8 rows' blocks side by side, one vector instruction does
that work for all 8 rows, lane r of every sum belongs to row r (no horizontal sums), and the same loop
reads memory at its speed. llama.cpp does this for Q4_0 (block_q4_0x8, ggml_gemv_q4_0_8x8_q8_0); here
every legacy type shares one layout and one kernel builder.

The packed tensor has exactly the bytes of the original (the memory check's sums hold): uint8[rows/8,
nb * 8 * type_size], group g's block b at byte b * 8 * type_size of row g:

    +---------+---------+-----------------+------------------------------------------------------+
    | d x 8   | m x 8   | qh (Q5_*)       | quants                                               |
    +---------+---------+-----------------+------------------------------------------------------+
      f16 [r]   (*_1)     32 bytes:         nibble types: 128 bytes, byte 32j + 4r + i = byte 4j+i
                          byte 4r+i, bit s  of row r's qs (low nibble: weight 4j+i, high: 16+4j+i)
                          = 5th bit of      Q8_0: 256 bytes, byte 32s + 4r + i = quant of weight
                          weight 4s+i of    4s+i of row r
                          row r

A "step" s (0..7) of a block is 32 bytes, byte 4r+i = weight 4s+i of row r (nibble types: qs vector s
& 0x0F for s < 4, >> 4 for s >= 4, or'ed with 16 * (qh bit s)). The matvec multiplies step s with x's
4 bytes 4s..4s+3 broadcast to every row (pmaddubsw, pmaddwd: lane r = row r's exact int32 dot), then
per block acc_r += float(dot_r - offset * sum(x_block)) * (d_r * d_x), as ggml's vec_dot.
The GEMM (gemm.py) unpacks steps straight into its tile layout, which is the same order of weights.
"""

from __future__ import annotations

import functools
import mmap

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels import check_rows, gemm, literal_values, locate_row, register_packed, specialise, total_rows
from qcpu.kernels.cpu import F16C, X86_AVX2
from qcpu.kernels.halves import ir_half_to_f32
from qcpu.kernels.legacy import LAYOUTS, QK, quantize_rows_q8
from qcpu.kernels.llvm_ir import _F32, _I8, _I16, _I32, _I64, _call, _contract, _dot8_portable, _load, _prefetch, _splat, _splat_value, _vec

ROWS = 8  # rows per group


def fields(type_size, has_m, has_qh):
    """Byte offsets of (m, qh, quants) in a packed group-block (d is at 0)."""
    m_at = 16
    qh_at = m_at + (16 if has_m else 0)
    return m_at, qh_at, qh_at + (32 if has_qh else 0)


# ---- pack (LLVM IR, at load) and unpack (plain Numba: tests, embedding lookups) ----------------------

def _ir_qh_bytes(b, qh):
    """i32 qh (bit k = 5th bit of weight k) -> the 4 packed qh bytes as an i32: byte i, bit s = bit 4s+i.
    Gathers every 4th bit by three shift-or-mask folds (no pext on AVX2)."""
    out = None
    for i in range(4):
        x = b.and_(b.lshr(qh, ir.Constant(_I32, i)), ir.Constant(_I32, 0x11111111))
        x = b.and_(b.or_(x, b.lshr(x, ir.Constant(_I32, 3))), ir.Constant(_I32, 0x03030303))
        x = b.and_(b.or_(x, b.lshr(x, ir.Constant(_I32, 6))), ir.Constant(_I32, 0x000F000F))
        x = b.and_(b.or_(x, b.lshr(x, ir.Constant(_I32, 12))), ir.Constant(_I32, 0xFF))
        x = b.shl(x, ir.Constant(_I32, 8 * i))
        out = x if out is None else b.or_(out, x)
    return out


@intrinsic
def _pack_group(typingctx, w, g, out, spec):
    """Rows 8g..8g+7 of w (uint8[rows, row_bytes], the file's blocks) -> row g of out (the packed layout)."""
    layout = literal_values(spec)
    if layout is None:
        return None
    type_size, has_m, has_qh, nibbles = layout[:4]
    m_at, qh_at, qs_at = fields(type_size, has_m, has_qh)
    src_qh = 4 if has_m else 2
    src_qs = src_qh + (4 if has_qh else 0)
    words = 4 if nibbles else 8  # 4-byte chunks of quants per row and block

    def codegen(context, b, signature, args):
        aw, ao = context.make_array(signature.args[0])(context, b, args[0]), context.make_array(signature.args[2])(context, b, args[2])
        g = args[1]
        wstride = b.extract_value(aw.strides, 0)
        rows = [b.gep(b.bitcast(aw.data, _I8.as_pointer()), [b.mul(b.add(b.mul(g, ir.Constant(_I64, ROWS)), ir.Constant(_I64, r)), wstride)])
                for r in range(ROWS)]
        op = b.gep(b.bitcast(ao.data, _I8.as_pointer()), [b.mul(g, b.extract_value(ao.strides, 0))])
        nb = b.udiv(b.extract_value(aw.shape, 1), ir.Constant(_I64, type_size))

        def store(ptr, at, v):
            b.store(v, b.bitcast(b.gep(ptr, [at]), v.type.as_pointer()), align=1)

        with cgutils.for_range(b, nb) as loop:
            src = b.mul(loop.index, ir.Constant(_I64, type_size))
            dst = b.gep(op, [b.mul(loop.index, ir.Constant(_I64, ROWS * type_size))])
            for r in range(ROWS):
                blk = b.gep(rows[r], [src])
                store(dst, ir.Constant(_I64, 2 * r), _load(b, blk, 0, _I16))
                if has_m:
                    store(dst, ir.Constant(_I64, m_at + 2 * r), _load(b, blk, 2, _I16))
                if has_qh:
                    store(dst, ir.Constant(_I64, qh_at + 4 * r), _ir_qh_bytes(b, _load(b, blk, src_qh, _I32)))
                for j in range(words):
                    store(dst, ir.Constant(_I64, qs_at + 32 * j + 4 * r), _load(b, blk, src_qs + 4 * j, _I32))
        return context.get_dummy_value()

    return types.void(w, g, out, spec), codegen


@njit(cache=True, parallel=True)
def _unpack(p, out, type_size, has_m, has_qh, nibbles, at):
    nb = p.shape[1] // (ROWS * type_size)
    m_at, qh_at, qs_at = at
    src_qh = 4 if has_m else 2
    src_qs = src_qh + (4 if has_qh else 0)
    for g in prange(p.shape[0]):
        for blk in range(nb):
            o = blk * ROWS * type_size
            for r in range(ROWS):
                s = out[ROWS * g + r, blk * type_size:(blk + 1) * type_size]
                s[0] = p[g, o + 2 * r]
                s[1] = p[g, o + 2 * r + 1]
                if has_m:
                    s[2] = p[g, o + m_at + 2 * r]
                    s[3] = p[g, o + m_at + 2 * r + 1]
                if has_qh:
                    qh = np.int64(0)
                    for i in range(4):
                        byte = np.int64(p[g, o + qh_at + 4 * r + i])
                        for st in range(8):
                            qh |= ((byte >> st) & 1) << (4 * st + i)
                    for k in range(4):
                        s[src_qh + k] = (qh >> (8 * k)) & 0xFF
                if nibbles:
                    for j in range(4):
                        for i in range(4):
                            s[src_qs + 4 * j + i] = p[g, o + qs_at + 32 * j + 4 * r + i]
                else:
                    for st in range(8):
                        for i in range(4):
                            s[src_qs + 4 * st + i] = p[g, o + qs_at + 32 * st + 4 * r + i]


def empty(rows: int, row_bytes: int) -> np.ndarray:
    """An uninitialised packed array for rows x row_bytes of blocks: uint8[rows/8, 8 * row_bytes].

    Anonymous pages from mmap, not np.empty: NumPy asks for transparent huge pages, whose faults (with
    compaction) took ~5x longer to fault on these VMs (400 MB: 1.57 s against 0.33 s)."""
    n = rows * row_bytes
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.uint8, count=n).reshape(rows // ROWS, ROWS * row_bytes)


def pack(w: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray | None = None) -> np.ndarray:
    """uint8[rows, row_bytes] row-major blocks -> uint8[rows/8, 8 * row_bytes] packed groups (the layout in
    the module docstring), into out if given (else a new array from `empty`). Raises ValueError unless rows
    is a multiple of 8, the rows are whole blocks of `qtype` and out has the packed shape."""
    type_size = LAYOUTS[qtype][0]
    if w.ndim != 2 or w.shape[0] % ROWS or w.shape[1] % type_size:
        raise ValueError(f"repack: {qtype.name} weight of shape {w.shape} is not groups of 8 whole-block rows")
    w = np.ascontiguousarray(w)  # the IR addresses rows by their stride and bytes within a row by +1
    if out is None:
        out = empty(*w.shape)
    elif out.shape != (w.shape[0] // ROWS, ROWS * w.shape[1]) or out.dtype != np.uint8:
        raise ValueError(f"repack: output of shape {out.shape} does not hold {w.shape[0]} rows of {w.shape[1]} bytes")
    make_kernels(qtype)[0](w, out)
    return out


def unpack(p: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The inverse of `pack`: uint8[groups, 8 * row_bytes] -> uint8[8 * groups, row_bytes]."""
    type_size, has_m, has_qh, nibbles, _ = LAYOUTS[qtype]
    out = np.empty((p.shape[0] * ROWS, p.shape[1] // ROWS), np.uint8)
    _unpack(p, out, type_size, has_m, has_qh, nibbles, fields(type_size, has_m, has_qh))
    return out


# ---- LLVM IR: one step's 32 weights, the group matvec, the GEMM tile unpack ------------------------


def _emit_step(b, blk, s, spec):
    """Step s of a packed group-block at byte pointer blk: <32 x i8>, byte 4r+i = weight 4s+i of row r
    (nibble types unsigned, before their offset; Q8_0 signed)."""
    type_size, has_m, has_qh, nibbles = spec[:4]
    _, qh_at, qs_at = fields(type_size, has_m, has_qh)
    if not nibbles:
        return _load(b, blk, qs_at + 32 * s, _vec(32, _I8))
    v = _load(b, blk, qs_at + 32 * (s % 4), _vec(32, _I8))
    v = b.and_(v, _splat(_I8, 32, 0x0F)) if s < 4 else b.lshr(v, _splat(_I8, 32, 4))
    if has_qh:
        h = _load(b, blk, qh_at, _vec(32, _I8))
        h = b.shl(h, _splat(_I8, 32, 4 - s)) if s < 4 else b.lshr(h, _splat(_I8, 32, s - 4)) if s > 4 else h
        v = b.or_(v, b.and_(h, _splat(_I8, 32, 0x10)))
    return v


def _halves8(b, blk, at, f16c):
    return ir_half_to_f32(b, _load(b, blk, at, _vec(8, _I16)), f16c)


@intrinsic
def _group_dot(typingctx, p, g, xq, xd, xc, xs, t0, out, spec):
    """out[t0 + j, 8g .. 8g+8] for j < nt = the 8 rows of packed group g (p uint8[groups, bytes]) dotted
    with activation rows t0 + j as legacy.quantize_rows_q8 gives them: xq int8[n, cols], xd float32[n, nb]
    (d), xc int32[n, nb] (offset * block sum of xq, read by the offset types), xs float32[n, nb] (Q8_1's
    s, read by the *_1 types); out float32[n, rows]. Each step's weights are unpacked once for the nt
    tokens; every token's arithmetic (and so its bits) is that of nt = 1. spec: the layout, avx2, f16c, nt."""
    layout = literal_values(spec)
    if layout is None:
        return None
    type_size, has_m, has_qh, nibbles, offset, avx2, f16c, nt = layout
    signed = not nibbles
    max_q = 128 if signed else (31 if has_qh else 15)
    per_i16 = max(1, 32767 // (2 * max_q * 127)) if avx2 else 0
    m_at = fields(type_size, has_m, has_qh)[0]

    def codegen(context, b, signature, args):
        ap, axq, axd, axc, axs, aout = [context.make_array(signature.args[k])(context, b, args[k]) for k in (0, 2, 3, 4, 5, 7)]
        g, t0 = args[1], args[6]
        gp = b.gep(b.bitcast(ap.data, _I8.as_pointer()), [b.mul(g, b.extract_value(ap.strides, 0))])

        def row_ptr(arr, t, ty):  # row t0 + t of a 2-D array, as a pointer to ty
            at = b.mul(b.add(t0, ir.Constant(_I64, t)), b.extract_value(arr.strides, 0))
            return b.bitcast(b.gep(b.bitcast(arr.data, _I8.as_pointer()), [at]), ty.as_pointer())

        xps = [row_ptr(axq, t, _I8) for t in range(nt)]
        dps = [row_ptr(axd, t, _F32) for t in range(nt)]
        cps = [row_ptr(axc, t, _I32) for t in range(nt)]
        sps = [row_ptr(axs, t, _F32) for t in range(nt)]
        nb = b.extract_value(axd.shape, 1)
        zero8 = ir.Constant(_vec(8, _F32), [0.0] * 8)
        accs = [cgutils.alloca_once_value(b, zero8) for _ in range(nt)]
        maccs = [cgutils.alloca_once_value(b, zero8) for _ in range(nt)]
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            at = b.mul(i, ir.Constant(_I64, ROWS * type_size))
            blk = b.gep(gp, [at])
            _prefetch(b, gp, at, ROWS * type_size)
            xrows = [b.gep(xp, [b.mul(i, ir.Constant(_I64, QK))]) for xp in xps]
            isum, part = [None] * nt, [None] * nt
            for s in range(8):
                wv = _emit_step(b, blk, s, layout)
                if avx2 and signed:  # q's signs move onto x (psignb), its magnitudes are shared by the tokens
                    wabs = _call(b, "llvm.abs.v32i8", _vec(32, _I8), wv, ir.Constant(ir.IntType(1), 0))
                for t in range(nt):
                    xb = b.bitcast(_splat_value(b, _load(b, xrows[t], 4 * s, _I32), 8), _vec(32, _I8))
                    if avx2:
                        u = wv
                        if signed:
                            xb = _call(b, "llvm.x86.avx2.psign.b", _vec(32, _I8), xb, wv)
                            u = wabs
                        pairs = _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(16, _I16), u, xb)
                        part[t] = pairs if part[t] is None else b.add(part[t], pairs)
                        if (s + 1) % per_i16 == 0 or s == 7:
                            wide = _call(b, "llvm.x86.avx2.pmadd.wd", _vec(8, _I32), part[t], _splat(_I16, 16, 1))
                            isum[t] = wide if isum[t] is None else b.add(isum[t], wide)
                            part[t] = None
                    else:
                        s8 = _dot8_portable(b, wv, xb, signed)
                        isum[t] = s8 if isum[t] is None else b.add(isum[t], s8)
            dw = _halves8(b, blk, 0, f16c)
            mw = _halves8(b, blk, m_at, f16c) if has_m else None
            for t in range(nt):
                st = isum[t]
                if offset:  # sum (q - offset) x = sum q x - offset * sum x, exact
                    st = b.sub(st, _splat_value(b, b.load(b.gep(cps[t], [i])), 8))
                scale = b.fmul(dw, _splat_value(b, b.load(b.gep(dps[t], [i])), 8))  # d_w * d_x
                term = _contract(b.fmul(b.sitofp(st, _vec(8, _F32)), scale))
                b.store(_contract(b.fadd(b.load(accs[t]), term)), accs[t])
                if has_m:
                    mterm = _contract(b.fmul(mw, _splat_value(b, b.load(b.gep(sps[t], [i])), 8)))
                    b.store(_contract(b.fadd(b.load(maccs[t]), mterm)), maccs[t])
        for t in range(nt):
            result = b.load(accs[t])
            if has_m:
                result = b.fadd(result, b.load(maccs[t]))
            op = b.gep(row_ptr(aout, t, _F32), [b.mul(g, ir.Constant(_I64, ROWS))])
            b.store(result, b.bitcast(op, _vec(8, _F32).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(p, g, xq, xd, xc, xs, t0, out, spec), codegen


@intrinsic
def _unpack_group(typingctx, p, g, q, d, m, spec):
    """Packed group g of p into one group of gemm.py's tile layout: q uint8[nb*256] (the steps, in order),
    d / m float32[nb*8] the 8 rows' block scales / mins."""
    layout = literal_values(spec)
    if layout is None:
        return None
    type_size, has_m, has_qh, _, _, _, f16c = layout
    m_at = fields(type_size, has_m, has_qh)[0]

    def codegen(context, b, signature, args):
        ap, aq, ad, am = [context.make_array(t)(context, b, a)
                          for t, a in zip((signature.args[0], *signature.args[2:5]), (args[0], *args[2:5]))]
        gp = b.gep(b.bitcast(ap.data, _I8.as_pointer()), [b.mul(args[1], b.extract_value(ap.strides, 0))])
        qp = b.bitcast(aq.data, _vec(32, _I8).as_pointer())
        dp = b.bitcast(ad.data, _vec(8, _F32).as_pointer())
        mp = b.bitcast(am.data, _vec(8, _F32).as_pointer())
        nb = b.udiv(b.extract_value(ad.shape, 0), ir.Constant(_I64, ROWS))
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            blk = b.gep(gp, [b.mul(i, ir.Constant(_I64, ROWS * type_size))])
            for s in range(8):
                at = b.add(b.mul(i, ir.Constant(_I64, 8)), ir.Constant(_I64, s))
                b.store(_emit_step(b, blk, s, layout), b.gep(qp, [at]), align=1)
            b.store(_halves8(b, blk, 0, f16c), b.gep(dp, [i]), align=4)
            if has_m:
                b.store(_halves8(b, blk, m_at, f16c), b.gep(mp, [i]), align=4)
        return context.get_dummy_value()

    return types.void(p, g, q, d, m, spec), codegen


# ---- entry points ---------------------------------------------------------------------------------------


@functools.cache
def make_kernels(qtype, avx2=X86_AVX2, f16c=F16C):
    """(pack(w, p), matvec_many(ps, x, outs), gemm(p, x, out)) for one legacy type in the packed layout: pack
    fills p from w uint8[rows, row_bytes] (see `pack`); p uint8[rows/8, 8 * row_bytes] (`pack`), x
    float32[n, cols], outs float32[n, rows] each / out float32[n, rows], as legacy.make_kernels' row-major
    ones. matvec_many reads each group from memory once for all n tokens (a few rows: a server's batch,
    speculative verification), each token's output bit for bit that of n = 1. ggml's arithmetic per block and row: (d_w * d_x) * exact int32
    dot [- offset * sum x], accumulated in float32 block after block [+ m_w * s_x summed apart, *_1 types].
    ValueError when the shapes do not match."""
    spec = (*LAYOUTS[qtype], avx2, f16c)
    type_size, has_m, has_qh, nibbles, offset = spec[:5]
    name = qtype.name.lower() + "x8" + ("" if (avx2, f16c) == (X86_AVX2, F16C) else f"_avx2{avx2:d}_f16c{f16c:d}")

    def pack_rows(w, p):
        for g in prange(p.shape[0]):
            _pack_group(w, g, p, spec)

    spec1, spec2, spec4 = [(*spec, nt) for nt in (1, 2, 4)]  # tokens per _group_dot call

    def matvec(ps, x, outs):
        n = x.shape[0]
        for k in range(len(ps)):
            if outs[k].shape[1] % ROWS or outs[k].shape[0] != n:
                raise ValueError("matvec: packed weight rows are not a multiple of 8, or outputs not [tokens, rows]")
            check_rows(ps[k], outs[k].shape[1] // ROWS, x.shape[1] * ROWS, QK, type_size,
                       "matvec: packed weight shape does not match the activation / output")
        xq, xd, xc, xs = quantize_rows_q8(x, offset)
        for t in prange(total_rows(ps)):  # rows of ps: groups, each read from memory once for all n tokens
            k, g = locate_row(ps, t)
            t0 = 0
            while n - t0 >= 4:
                _group_dot(ps[k], g, xq, xd, xc, xs, t0, outs[k], spec4)
                t0 += 4
            if n - t0 >= 2:
                _group_dot(ps[k], g, xq, xd, xc, xs, t0, outs[k], spec2)
                t0 += 2
            if n - t0 == 1:
                _group_dot(ps[k], g, xq, xd, xc, xs, t0, outs[k], spec1)

    signed = not nibbles
    max_q = 128 if signed else (31 if has_qh else 15)
    g1, g2, g_full = [("legacy", has_m, signed, offset != 0, max_q, avx2, gemm.RG, rn) for rn in (1, 2, gemm.RN)]

    def batched(p, x, out):
        n, cols = x.shape
        rows = out.shape[1]
        if out.shape[0] != n or rows % ROWS:
            raise ValueError("gemm: the output shape is not [tokens, rows], rows a multiple of 8")
        check_rows(p, rows // ROWS, cols * ROWS, QK, type_size, "gemm: packed weight shape does not match the activation / output")
        nb = cols // QK
        xq, xd, xc, xs = quantize_rows_q8(x, offset)
        per_tile, n_tiles, workers, max_groups = gemm.plan(rows, cols)
        for worker in prange(workers):  # as legacy.make_kernels' gemm, the tile unpacked from whole groups
            q = np.empty((max_groups, nb * gemm.GROUP_BLOCK_BYTES), np.uint8)
            d = np.zeros((max_groups, nb * gemm.ROWS), np.float32)
            m = np.zeros((max_groups, nb * gemm.ROWS), np.float32)
            o = np.empty((n, max_groups * gemm.ROWS), np.float32)
            for tile in range(worker, n_tiles, workers):
                r0, nr, groups = gemm.tile_span(tile, rows, per_tile)
                for k in range(nr // ROWS):
                    _unpack_group(p, r0 // ROWS + k, q[k], d[k], m[k], spec)
                gemm.sweep((q, d, m), (xq, xd, xc, xs), n, cols, groups, o, g_full, g2, g1)
                gemm.scatter(o, out, r0, nr)

    return (specialise(pack_rows, f"pack_{name}", parallel=True), specialise(matvec, f"matvec_{name}", parallel=True),
            specialise(batched, f"gemm_{name}", parallel=True))



def _pack_as(qtype, w, out=None):
    return pack(w, qtype, out)


# Below this many tokens the multi-token matvec beats the GEMM (measured on AVX2, 2 threads, 9000 x 6912
# weights, time / one token's matvec, multi vs GEMM: Q4_0 8 tokens 6.1 vs 5.8; Q5_0 16: 9.1 vs 9.3, 32:
# 17.9 vs 17.1; Q8_0 16: 5.0 vs 5.9).
GEMM_MIN_TOKENS = 12

for _t in LAYOUTS:
    register_packed(_t, functools.partial(_pack_as, _t), functools.partial(unpack, qtype=_t), *make_kernels(_t)[1:],
                    gemm_min_tokens=GEMM_MIN_TOKENS)
