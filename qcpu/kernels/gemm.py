"""Integer GEMM for batched products (prefill): weight tiles interleaved 8 rows at a time, int8 dots.

A batched product y[n, rows] = x[n, cols] @ W.T runs as llama.cpp's quantized products do, not through
float BLAS: x is quantized once to the weight type's vec_dot_type (Q8_0 / Q8_1 blocks of 32 for the legacy
types, Q8_K super-blocks of 256 for the K-quants; by the family module), and every (row, token, block)
contributes (d_w * d_x) * (exact int32 block dot), as the decode matvec does. What changes is the order of
the work, so each weight byte loaded serves many tokens:

  Tile: a family's `pack` unpacks a tile of weight rows (L2-sized, per thread) into groups of 8 rows,
  interleaved 4 weights at a time (the layout of llama.cpp's repack.cpp, block_q4_0x8, with an interleave
  of 4: one 32-byte vector holds weights 4g..4g+3 of each of the 8 rows):

      group, block b:  q   uint8[256]   byte 32g + 4r + i = weight (32b + 4g + i) of row r
                                         (g = 0..7, r = 0..7, i = 0..3; nibble types unsigned, Q8_0 signed)
                       d   float32[8]    row r's block scale;  m  float32[8]  row r's block min (*_1 types)

  (K-quants: the same interleave per 32 values of a super-block, plus per-16 scale vectors and the
  coefficients of the activation block sums: k_quants._pack_block and _emit_k below.)

  Micro-kernel (`_gemm_tile`): RG groups x RN tokens at a time. For each 4-weight step g, the 4 activation
  bytes of a token are broadcast to all 8 lanes, so one multiply-add of the group's vector with it yields
  8 rows' partial dots (x86 AVX2: pmaddubsw, summed in int16 while that cannot overflow, then pmaddwd by
  ones into int32). After 8 steps lane r holds row r's exact block dot; it is converted, multiplied by
  d_w * d_x and accumulated in float32, one block after the other. No horizontal sums.

Every output element is computed the same way whatever the tile, the batch or the thread count, so
prefill logits no longer depend on a BLAS tile size.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qcpu.kernels import check_rows, literal_values
from qcpu.kernels.llvm_ir import (
    _F32,
    _I8,
    _I16,
    _I32,
    _I64,
    _call,
    _contract,
    _dot8_portable,
    _load,
    _madd,
    _maddubs,
    _splat,
    _splat_value,
    _vec,
)

QK = 32  # weights per block (the legacy types; the interleaved layout's unit)
ROWS = 8  # rows per interleaved group
GROUP_BLOCK_BYTES = ROWS * QK  # one group's quants for one block
RG, RN = 1, 4  # micro-kernel: groups (of 8 rows) x tokens per call (measured best of 1..4 x 1..8 on AVX2)
TILE_BYTES = 256 * 1024  # a thread's packed tile: fits a 512 KiB L2 with the activations beside it
CHUNK_BYTES = 48 * 1024  # activations of the tokens a group sweeps before the next group: L1/L2-resident
# The drivers' parallel loop runs over this many workers, each allocating its tile buffers once and taking
# every WORKERS-th tile. A prange over the tiles themselves allocated the buffers per tile and scaled
# 1.24-1.44x from 1 to 2 threads (4B ffn_gate Q4_K, 256 tokens; llama.cpp's pp: 2.0x); this: 1.9-2.0x.
WORKERS = 16


@njit(cache=True)
def token_chunk(cols):
    """Tokens per sweep: a multiple of RN with at most CHUNK_BYTES of int8 activations (at least 4*RN)."""
    return max(4 * RN, CHUNK_BYTES // max(cols, 1) // RN * RN)


@njit(cache=True)
def tile_rows(cols):
    """Rows per packed tile for rows of `cols` weights: a multiple of RG*8, at most TILE_BYTES of int8
    quants, at most 64 (enough tiles for every thread on the 128-row K/V projections)."""
    unit = RG * ROWS
    return max(unit, min(64, TILE_BYTES // max(cols, 1) // unit * unit))


# ---- the micro-kernel ----------------------------------------------------------------------------------


def _pairs_avx2(b, wv, wabs, xb, signed):
    """<16 x i16> pmaddubsw pairs. Signed weights (Q8_0) go in as |w| (wabs, computed once per step) with x
    given w's sign by psignb, ggml's mul_sum_i8_pairs: |pair| <= 2*128*127 < 32768."""
    if signed:
        xb = _call(b, "llvm.x86.avx2.psign.b", _vec(32, _I8), xb, wv)
        wv = wabs
    return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(16, _I16), wv, xb)


def _broadcast4(b, row, at, ty=None):
    """The 4 bytes at row + at, repeated in all 8 lanes, as `ty` (32 bytes; default <32 x i8>)."""
    return b.bitcast(_splat_value(b, _load(b, row, at, _I32), 8), ty or _vec(32, _I8))


def _c64(v):
    return ir.Constant(_I64, v)


def _frame(b, g0, t0, rg, rn, xqp, cols):
    """The micro-kernel's indices: its groups and tokens (i64), the tokens' activation rows, and one
    zeroed <8 x float> accumulator per (group, token)."""
    groups = [b.add(g0, _c64(i)) for i in range(rg)]
    tokens = [b.add(t0, _c64(j)) for j in range(rn)]
    xrows = [b.gep(xqp, [b.mul(t, cols)]) for t in tokens]
    accs = [[cgutils.alloca_once_value(b, ir.Constant(_vec(8, _F32), [0.0] * 8)) for _ in range(rn)] for _ in range(rg)]
    return groups, tokens, xrows, accs


def _emit_legacy(b, arr, g0, t0, spec):
    """Legacy blocks of 32: packed (q, d, m), acts (xq, xd, xc, xs) = legacy.quantize_row_q8's arrays."""
    _, has_m, signed, sub_offset, max_q, avx2, rg, rn = spec
    per_i16 = max(1, min(8, 32767 // (2 * max_q * 127))) if avx2 else 0
    (q, d, m), (xq, xd, xc, xs) = arr
    qp, dp, mp = (b.bitcast(a.data, _I8.as_pointer()) for a in (q, d, m))
    xqp, xdp, xcp, xsp = (b.bitcast(a.data, _I8.as_pointer()) for a in (xq, xd, xc, xs))
    nb = b.extract_value(xd.shape, 1)
    cols = b.extract_value(xq.shape, 1)
    gstride = b.extract_value(q.shape, 1)  # bytes per group = nb * 256
    groups, tokens, xrows, accs = _frame(b, g0, t0, rg, rn, xqp, cols)

    with cgutils.for_range(b, nb) as loop:
        blk = loop.index
        wbase = [b.gep(qp, [b.add(b.mul(g, gstride), b.mul(blk, _c64(GROUP_BLOCK_BYTES)))]) for g in groups]
        xoff = b.mul(blk, _c64(QK))
        isum = [[None] * rn for _ in range(rg)]
        part = [[None] * rn for _ in range(rg)]
        for step in range(8):
            wv = [_load(b, wbase[i], step * 32, _vec(32, _I8)) for i in range(rg)]
            wabs = [_call(b, "llvm.abs.v32i8", _vec(32, _I8), w_, ir.Constant(ir.IntType(1), 0)) for w_ in wv] if signed and avx2 else wv
            for j in range(rn):
                xb = _broadcast4(b, xrows[j], b.add(xoff, _c64(4 * step)))
                for i in range(rg):
                    if avx2:
                        pairs = _pairs_avx2(b, wv[i], wabs[i], xb, signed)
                        part[i][j] = pairs if part[i][j] is None else b.add(part[i][j], pairs)
                        if (step + 1) % per_i16 == 0 or step == 7:
                            wide = _madd(b, part[i][j], _splat(_I16, 16, 1), True)
                            isum[i][j] = wide if isum[i][j] is None else b.add(isum[i][j], wide)
                            part[i][j] = None
                    else:
                        s_ = _dot8_portable(b, wv[i], xb, signed)
                        isum[i][j] = s_ if isum[i][j] is None else b.add(isum[i][j], s_)
        for i in range(rg):
            gb = b.mul(b.add(b.mul(groups[i], nb), blk), _c64(32))  # (group, block) -> 8 floats of d / m
            dv = _load(b, dp, gb, _vec(8, _F32))
            mv = _load(b, mp, gb, _vec(8, _F32)) if has_m else None
            for j in range(rn):
                tb = b.mul(b.add(b.mul(tokens[j], nb), blk), _c64(4))
                s32 = isum[i][j]
                if sub_offset:  # sum (q - offset) x = sum q x - offset * sum x: exact in int32
                    s32 = b.sub(s32, _splat_value(b, _load(b, xcp, tb, _I32), 8))
                scale = b.fmul(dv, _splat_value(b, _load(b, xdp, tb, _F32), 8))  # d_w * d_x first, as ggml
                acc = _contract(b.fadd(b.load(accs[i][j]), _contract(b.fmul(b.sitofp(s32, _vec(8, _F32)), scale))))
                if has_m:
                    mterm = _contract(b.fmul(mv, _splat_value(b, _load(b, xsp, tb, _F32), 8)))
                    acc = _contract(b.fadd(acc, mterm))
                b.store(acc, accs[i][j])
    return groups, tokens, accs


def _emit_k(b, arr, g0, t0, spec):
    """K-quant super-blocks of 256: packed (q, sc, mc, d, dm) as k_quants._pack_block lays them out, acts
    (xq, xd, xb) = Q8_K (quants, float32 d per 256, int16 sums of 16). Per super-block and row, as
    ggml_vec_dot_q*_K_q8_K: isum = sum over 16-value groups s of sc_s * (u . x)_s, exact in int32 (the
    pair sums widened by pmaddwd with the scale itself); msum = sum_s mc_s * bsum_s, one pmaddwd per pair
    of groups; then d*d_x*isum - dmin*d_x*msum (Q2_K/Q4_K/Q5_K: mins), or d*d_x*(isum - msum)
    (Q3_K/Q6_K: mc_s = offset * sc_s)."""
    _, has_min, fold, max_q, group_steps, avx2, rg, rn = spec
    per_i16 = max(1, min(group_steps, 32767 // (2 * max_q * 127)))
    (q, sc, mc, d, dm), (xq, xd, xb) = arr
    qp, scp, mcp, dp, dmp = (b.bitcast(a.data, _I8.as_pointer()) for a in (q, sc, mc, d, dm))
    xqp, xdp, xbp = (b.bitcast(a.data, _I8.as_pointer()) for a in (xq, xd, xb))
    nbk = b.extract_value(xd.shape, 1)
    cols = b.extract_value(xq.shape, 1)
    gstride = b.extract_value(q.shape, 1)  # bytes per group = nbk * 2048
    groups, tokens, xrows, accs = _frame(b, g0, t0, rg, rn, xqp, cols)
    brows = [b.gep(xbp, [b.mul(t, b.mul(nbk, _c64(32)))]) for t in tokens]  # 16 int16 per super-block

    with cgutils.for_range(b, nbk) as loop:
        blk = loop.index
        gb = [b.add(b.mul(g, nbk), blk) for g in groups]  # (group, super-block)
        wbase = [b.gep(qp, [b.add(b.mul(g, gstride), b.mul(blk, _c64(8 * GROUP_BLOCK_BYTES)))]) for g in groups]
        xoff = b.mul(blk, _c64(256))
        # The groups of values sharing a scale (4 or 8 steps of 4 weights) as an IR loop, not unrolled: over
        # a whole unrolled super-block LLVM ran one token's 64 steps after another, spilling every weight
        # vector to the stack for the next token (1298 instructions per super-block, 86 of them spills).
        isum_at = [[cgutils.alloca_once_value(b, ir.Constant(_vec(8, _I32), [0] * 8)) for _ in range(rn)] for _ in range(rg)]
        with cgutils.for_range(b, _c64(16 * 4 // group_steps)) as sloop:
            step0 = b.mul(sloop.index, _c64(group_steps))  # first step of this scale group
            s16 = b.mul(sloop.index, _c64(group_steps // 4))  # its scale's index among the 16
            scv = [_load(b, scp, b.mul(b.add(b.mul(gb[i], _c64(16)), s16), _c64(32)), _vec(16, _I16)) for i in range(rg)]
            wsub = [b.gep(wbase[i], [b.mul(step0, _c64(32))]) for i in range(rg)]
            xsub = b.add(xoff, b.mul(step0, _c64(4)))
            part = [[None] * rn for _ in range(rg)]
            isum = [[b.load(isum_at[i][j]) for j in range(rn)] for i in range(rg)]
            for k in range(group_steps):
                wv = [_load(b, wsub[i], 32 * k, _vec(32, _I8)) for i in range(rg)]
                for j in range(rn):
                    xv = _broadcast4(b, xrows[j], b.add(xsub, _c64(4 * k)))
                    for i in range(rg):
                        pairs = _maddubs(b, wv[i], xv, avx2)
                        part[i][j] = pairs if part[i][j] is None else b.add(part[i][j], pairs)
                        if (k + 1) % per_i16 == 0 or k == group_steps - 1:
                            isum[i][j] = b.add(isum[i][j], _madd(b, part[i][j], scv[i], avx2))
                            part[i][j] = None
            for i in range(rg):
                for j in range(rn):
                    b.store(isum[i][j], isum_at[i][j])
        isum = [[b.load(isum_at[i][j]) for j in range(rn)] for i in range(rg)]
        msum = [[None] * rn for _ in range(rg)]
        for p in range(8):  # pairs of 16-value groups
            mcv = [_load(b, mcp, b.mul(b.add(b.mul(gb[i], _c64(8)), _c64(p)), _c64(32)), _vec(16, _I16)) for i in range(rg)]
            for j in range(rn):
                bs = _broadcast4(b, brows[j], b.add(b.mul(blk, _c64(32)), _c64(4 * p)), _vec(16, _I16))
                for i in range(rg):
                    w_ = _madd(b, mcv[i], bs, avx2)
                    msum[i][j] = w_ if msum[i][j] is None else b.add(msum[i][j], w_)
        for i in range(rg):
            dv = _load(b, dp, b.mul(gb[i], _c64(32)), _vec(8, _F32))
            dmv = _load(b, dmp, b.mul(gb[i], _c64(32)), _vec(8, _F32)) if has_min else None
            for j in range(rn):
                dx = _splat_value(b, _load(b, xdp, b.mul(b.add(b.mul(tokens[j], nbk), blk), _c64(4)), _F32), 8)
                s32 = b.sub(isum[i][j], msum[i][j]) if fold else isum[i][j]
                acc = _contract(b.fadd(b.load(accs[i][j]), _contract(b.fmul(b.sitofp(s32, _vec(8, _F32)), b.fmul(dv, dx)))))
                if has_min:
                    acc = _contract(b.fsub(acc, _contract(b.fmul(b.sitofp(msum[i][j], _vec(8, _F32)), b.fmul(dmv, dx)))))
                b.store(acc, accs[i][j])
    return groups, tokens, accs


@intrinsic
def _gemm_tile(typingctx, packed, acts, g0, t0, out, spec):
    """Groups g0..g0+rg-1 of a packed tile times tokens t0..t0+rn-1 -> out[t, 8*g .. 8*g+8] (float32).

    packed / acts: tuples of arrays, the family's packed tile and quantized activations (see _emit_legacy,
    _emit_k); out float32[n, >= 8*groups]. spec (literal): ("legacy", has_m, signed, sub_offset, max_q,
    avx2, rg, rn) or ("k", has_min, fold_offset, max_q, group_steps, avx2, rg, rn), group_steps = 4 or 8:
    the steps of 4 weights that share one sub-block scale (16 or 32 values). Unsigned quants have their offset
    taken off through activation sums, exactly; max_q bounds |weight quant|: it decides how many
    pmaddubsw results may be summed in int16 (|pair| <= 2 * max_q * 127) before widening.
    """
    spec_v = literal_values(spec)
    if spec_v is None:
        return None
    emit = _emit_legacy if spec_v[0] == "legacy" else _emit_k

    def codegen(context, b, signature, args):
        def arrays(ty, val):
            return [context.make_array(t)(context, b, v) for t, v in zip(ty.types, cgutils.unpack_tuple(b, val))]

        arr = (arrays(signature.args[0], args[0]), arrays(signature.args[1], args[1]))
        groups, tokens, accs = emit(b, arr, args[2], args[3], spec_v)
        out = context.make_array(signature.args[4])(context, b, args[4])
        op = b.bitcast(out.data, _F32.as_pointer())
        ostride = b.extract_value(out.shape, 1)
        for i, g in enumerate(groups):
            for j, t in enumerate(tokens):
                at = b.add(b.mul(t, ostride), b.mul(g, _c64(ROWS)))
                b.store(b.load(accs[i][j]), b.bitcast(b.gep(op, [at]), _vec(8, _F32).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(packed, acts, g0, t0, out, spec), codegen


@njit(cache=True, inline="always")
def sweep(packed, acts, n, cols, groups, o, spec_full, spec2, spec1):
    """All tokens x all groups of one packed tile into o float32[n, 8*groups]: tokens in chunks whose
    activations stay cached while every group sweeps them; RN tokens per micro-kernel call, the last
    ones two or one at a time (spec_full / spec2 / spec1: the micro-kernel for RN, 2, 1 tokens)."""
    chunk = token_chunk(cols)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        full = c1 - (c1 - c0) % RN
        for g0 in range(0, groups, RG):
            for t0 in range(c0, full, RN):
                _gemm_tile(packed, acts, g0, t0, o, spec_full)
            t0 = full
            while t0 < c1:
                if c1 - t0 >= 2:
                    _gemm_tile(packed, acts, g0, t0, o, spec2)
                    t0 += 2
                else:
                    _gemm_tile(packed, acts, g0, t0, o, spec1)
                    t0 += 1


@njit(cache=True, inline="always")
def check_shapes(w, x, out, block, type_size):
    """Raise ValueError unless w uint8[rows, cols/block*type_size], x float32[n, cols], out float32[n, rows]."""
    check_rows(w, out.shape[1], x.shape[1], block, type_size, "gemm: weight row bytes do not match the activation length")
    if out.shape[0] != x.shape[0]:
        raise ValueError("gemm: the output shape is not [tokens, rows]")


@njit(cache=True, inline="always")
def plan(rows, cols):
    """A driver's split of `rows` weight rows of `cols` weights: (rows per tile, tiles, workers, groups per
    full tile); worker i takes tiles i, i + workers, ... (see WORKERS)."""
    per_tile = tile_rows(cols)
    n_tiles = (rows + per_tile - 1) // per_tile
    return per_tile, n_tiles, min(WORKERS, n_tiles), per_tile // ROWS


@njit(cache=True, inline="always")
def tile_span(tile, rows, per_tile):
    """Tile number -> (first row, rows in it, groups to pack: a multiple of RG, padding rows included)."""
    r0 = tile * per_tile
    nr = min(rows - r0, per_tile)
    return r0, nr, (nr + RG * ROWS - 1) // (RG * ROWS) * RG


@njit(cache=True, inline="always")
def scatter(o, out, r0, nr):
    """A tile's outputs o[:, :nr] into out[:, r0:r0+nr]."""
    for t in range(out.shape[0]):
        for r in range(nr):
            out[t, r0 + r] = o[t, r]
