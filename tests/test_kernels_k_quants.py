"""K-quant kernels (Q2_K..Q6_K): bit-exact dequantization and llama.cpp-faithful matvec.

References:
  * dequantize  -> gguf-py's numpy `gguf.quants.dequantize` (must be bit-identical);
  * matvec      -> (a) float64 dequantized-weights @ x, within the error that 8-bit activation
                   quantization can cause; (b) a float64 NumPy emulation of llama.cpp's scheme
                   (quantize_row_q8_K_ref + ggml_vec_dot_q*_K_q8_K_generic), much more tightly.
The NumPy unpacking below is written independently of the Numba kernels (vectorized, gguf-py style).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from qcpu.kernels import REGISTRY, kernel_for
from qcpu.kernels import k_quants as kq

K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
QK = 256

# Byte offsets of the fp16 fields in each block (ggml-common.h).
F16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_tensors(real_model_path):
    """{type: [(name, uint8[rows, row_bytes], cols)]} for the K-type tensors of the default model."""
    from gguf import GGUFReader

    out: dict = {}
    for t in GGUFReader(str(real_model_path)).tensors:
        if t.tensor_type in K_TYPES:
            out.setdefault(t.tensor_type, []).append((t.name, t.data, int(t.shape[0])))
    return out


def random_blocks(qtype, rows, nb, seed, d_scale=1e-2):
    """Random bytes for every field, with the fp16 scales replaced by finite values (normals, some
    subnormals and zeros, both signs) so the blocks decode to finite weights."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[qtype][1]
    w = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        v = (rng.standard_normal((rows, nb)) * d_scale).astype(np.float16)
        sub = rng.random((rows, nb)) < 0.05
        v[sub] = (rng.integers(-1023, 1024, sub.sum()) * 2.0**-24).astype(np.float16)  # subnormals
        v[rng.random((rows, nb)) < 0.02] = 0
        w[:, :, off : off + 2] = v[..., None].view(np.uint8)
    return np.ascontiguousarray(w.reshape(rows, nb * size))


# --------------------------------------------------------------------------------------------------
# Independent NumPy emulation of llama.cpp's Q8_K activation quantizer and K-quant dot products.


def q8_K_ref(x):
    """quantize_row_q8_K_ref in float32: -> qs int64[nb, 256], d float32[nb], bsums int64[nb, 16]."""
    xb = x.astype(np.float32).reshape(-1, QK)
    qs = np.zeros(xb.shape, np.int64)
    d = np.zeros(len(xb), np.float32)
    for i, blk in enumerate(xb):
        j = int(np.argmax(np.abs(blk)))  # first index of the largest magnitude, as the strict '>' scan
        if blk[j] == 0:
            continue
        iscale = np.float32(-127.0) / blk[j]
        qs[i] = np.minimum(np.rint(iscale * blk).astype(np.int64), 127)  # round half to even
        d[i] = np.float32(1.0) / iscale
    return qs, d, qs.reshape(len(xb), 16, 16).sum(-1)


def _f16(w, off):
    return w[:, off : off + 2].copy().view(np.float16)[:, 0].astype(np.float64)


def _k4_scales(s):
    """[nb, 12] packed 6-bit scales/mins of Q4_K/Q5_K -> (sc [nb, 8], mn [nb, 8])."""
    s = s.astype(np.int64)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def unpack_ref(qtype, blocks):
    """blocks uint8[nb, size] -> (q int64[nb, 256], scale int64[nb, n_sub], min int64[nb, n_sub] or
    None, d float64[nb], dmin float64[nb] or None), with weight = d*scale*q - dmin*min."""
    b = blocks.astype(np.int64)
    nb = len(b)
    if qtype == T.Q2_K:
        q = (b[:, 16:80].reshape(nb, 2, 1, 32) >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3
        return q.reshape(nb, QK), b[:, :16] & 15, b[:, :16] >> 4, _f16(blocks, 80), _f16(blocks, 82)
    if qtype == T.Q3_K:
        lo = (b[:, 32:96].reshape(nb, 2, 1, 32) >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3
        hb = (b[:, 0:32].reshape(nb, 1, 32) >> np.arange(8).reshape(1, 8, 1)) & 1
        q = lo.reshape(nb, 8, 32) - 4 * (1 - hb)
        s = b[:, 96:108]
        low = np.concatenate([s[:, 0:8] & 15, s[:, 0:8] >> 4], axis=1)
        high = np.concatenate([(s[:, 8:12] >> sh) & 3 for sh in (0, 2, 4, 6)], axis=1)
        return q.reshape(nb, QK), (low | (high << 4)) - 32, None, _f16(blocks, 108), None
    if qtype in (T.Q4_K, T.Q5_K):
        qs = b[:, 16:144] if qtype == T.Q4_K else b[:, 48:176]
        q = (qs.reshape(nb, 4, 1, 32) >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 15
        q = q.reshape(nb, QK)
        if qtype == T.Q5_K:
            q = q + 16 * ((b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8).reshape(1, 8, 1)) & 1).reshape(nb, QK)
        sc, mn = _k4_scales(blocks[:, 4:16])
        return q, sc, mn, _f16(blocks, 0), _f16(blocks, 2)
    if qtype == T.Q6_K:
        ql = (b[:, 0:128].reshape(nb, 2, 1, 64) >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 15
        qh = (b[:, 128:192].reshape(nb, 2, 1, 32) >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3
        q = (ql.reshape(nb, 2, 4, 32) | (qh << 4)) - 32
        sc = blocks[:, 192:208].view(np.int8).astype(np.int64)
        return q.reshape(nb, QK), sc, None, _f16(blocks, 208), None
    raise AssertionError(qtype)


def vec_dot_ref(qtype, w, x):
    """llama.cpp's K-quant x Q8_K dot, in float64 -> (y[rows], sum of |block terms| per row)."""
    rows = w.shape[0]
    size = GGML_QUANT_SIZES[qtype][1]
    nb = w.shape[1] // size
    q8, d8, bsums = q8_K_ref(x)
    q, sc, mn, d, dmin = unpack_ref(qtype, w.reshape(rows * nb, size))
    n_sub = sc.shape[1]
    prod = (q.reshape(rows, nb, n_sub, -1) * q8.reshape(1, nb, n_sub, -1)).sum(-1)
    isum = (prod * sc.reshape(rows, nb, n_sub)).sum(-1)
    terms = [d.reshape(rows, nb) * d8 * isum]
    if mn is not None:
        per16 = mn.reshape(rows, nb, n_sub).repeat(QK // n_sub // 16, axis=2)  # min of each sixteen
        msum = (per16 * bsums.reshape(1, nb, 16)).sum(-1)
        terms.append(-dmin.reshape(rows, nb) * d8 * msum)
    y = sum(t.sum(-1) for t in terms)
    return y, sum(np.abs(t).sum(-1) for t in terms)


def run_matvec(qtype, w, x, simd=True):
    """The registered kernel (simd=True: the best path for this CPU), or the target-independent IR."""
    out = np.full(w.shape[0], np.nan, np.float32)
    if simd:
        kernel_for(qtype).matvec(w, x, out)
    else:
        kq.make_matvec(qtype, avx2=False, f16c=False)[0]((w,), x[None], (out[None],))
    return out


# --------------------------------------------------------------------------------------------------
# Registry and scalar pieces


def test_all_k_types_registered():
    for qtype in K_TYPES:
        assert qtype in REGISTRY
        assert REGISTRY[qtype].block_size == QK


@pytest.mark.parametrize("seed", range(4))
def test_q8_K_quantizer_matches_llama_ref(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(256 * 6) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    x[256:512] = 0  # an all-zero block
    x[512 + 7] = x[512 + 9] = 5.0 * np.abs(x[512:768]).max()  # tied maxima: the first one wins
    x[768 + 3] = -np.abs(x[768:1024]).max() * 3  # negative extreme
    # exact halves of the quantization step, to exercise round-half-to-even
    x[1024:1280] = (np.arange(256, dtype=np.float32) - 128) / np.float32(2.0)
    qs, d, bsums = np.empty(len(x), np.int8), np.empty(6, np.float32), np.empty(6 * 16, np.int16)
    kq.quantize_q8_K(x, qs, d, bsums)
    rq, rd, rb = q8_K_ref(x)
    assert np.array_equal(qs, rq.ravel())
    assert np.array_equal(d.view(np.uint32), rd.view(np.uint32))
    assert np.array_equal(bsums, rb.ravel())


# --------------------------------------------------------------------------------------------------
# Dequantization: bit-exact against gguf-py


@pytest.mark.model
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_dequantize_real_tensors_bit_exact(model_tensors, qtype):
    tensors = model_tensors.get(qtype)
    assert tensors, f"the default model has no {qtype.name} tensors"
    for name, data, cols in tensors[:4]:
        w = np.ascontiguousarray(data)
        out = np.empty((w.shape[0], cols), np.float32)
        kernel_for(qtype).dequantize(w, out)
        assert np.array_equal(out, gq.dequantize(w, qtype)), name


@pytest.mark.parametrize("qtype", K_TYPES)
@pytest.mark.parametrize("rows,nb,seed", [(1, 1, 0), (7, 3, 1), (130, 2, 2), (300, 4, 3)])
def test_dequantize_random_blocks_bit_exact(qtype, rows, nb, seed):
    w = random_blocks(qtype, rows, nb, seed)
    out = np.empty((rows, nb * QK), np.float32)
    kernel_for(qtype).dequantize(w, out)
    ref = gq.dequantize(w, qtype)
    assert np.all(np.isfinite(ref))
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_numpy_emulation_unpacks_like_gguf(qtype):
    """Guards the emulation itself: its (q, scales, mins, d, dmin) rebuild gguf-py's weights."""
    w = random_blocks(qtype, 5, 3, 10)
    size = GGML_QUANT_SIZES[qtype][1]
    q, sc, mn, d, dmin = unpack_ref(qtype, w.reshape(-1, size))
    per = QK // sc.shape[1]
    wt = d[:, None] * sc.repeat(per, 1) * q
    if mn is not None:
        wt = wt - dmin[:, None] * mn.repeat(per, 1)
    np.testing.assert_allclose(wt.reshape(5, -1), gq.dequantize(w, qtype), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# Matvec
#
# Against float64 (W @ x): the only lossy step is the activation quantization. Each x_i becomes q_i*d_b
# with |x_i - q_i*d_b| <= d_b/2 (d_b = amax_b/127 of its 256-block; q is clipped at 127 only where
# rounding already lands there), so for row r the error is bounded by
#     sum_b d_b/2 * sum_{i in b} |W_ri|      (worst case: every error aligned)
# plus float32 rounding (1e-5 of sum |W||x|). In practice the rounding errors are independent and
# uniform on [-d_b/2, d_b/2] (std d_b/sqrt(12)), so the error's std is
#     sigma_r = sqrt(sum_i W_ri^2 * d_b(i)^2 / 12)
# and we also require |error| <= 6 sigma_r (+ the float32 slack): a much tighter, statistical check.
#
# Against the emulation of llama.cpp's exact scheme (same q8 integers, same integer dots): only float
# rounding differs (d_w*d_x is a float32 product), so |ours - emu| <= 1e-5 * sum_b |block term|.


def check_matvec(qtype, w, x, simd=True):
    y = run_matvec(qtype, w, x, simd).astype(np.float64)
    wf = gq.dequantize(w, qtype).astype(np.float64)
    exact = wf @ x.astype(np.float64)
    _, d8, _ = q8_K_ref(x)
    slack = 1e-5 * (np.abs(wf) @ np.abs(x.astype(np.float64))) + 1e-30
    bound = (np.abs(wf).reshape(w.shape[0], -1, QK).sum(-1) * np.abs(d8.astype(np.float64)) / 2).sum(-1)
    assert np.all(np.abs(y - exact) <= bound + slack), np.max(np.abs(y - exact) / (bound + slack))
    var = ((wf**2).reshape(w.shape[0], -1, QK).sum(-1) * np.abs(d8.astype(np.float64)) ** 2 / 12).sum(-1)
    assert np.all(np.abs(y - exact) <= 6 * np.sqrt(var) + slack), np.max(np.abs(y - exact) / (np.sqrt(var) + slack))

    emu, scale = vec_dot_ref(qtype, w, x)
    assert np.all(np.abs(y - emu) <= 1e-5 * scale + 1e-30), np.max(np.abs(y - emu) / (scale + 1e-30))
    return y, exact


@pytest.mark.parametrize("simd", [True, False], ids=["native", "portable-ir"])
@pytest.mark.parametrize("qtype", K_TYPES)
@pytest.mark.parametrize("rows,nb,seed", [(1, 1, 0), (13, 3, 1), (250, 2, 2)])
def test_matvec_random_blocks(qtype, rows, nb, seed, simd):
    w = random_blocks(qtype, rows, nb, seed)
    x = np.random.default_rng(seed + 100).standard_normal(nb * QK).astype(np.float32)
    x[:7] *= 20  # a few outliers, like real activations
    check_matvec(qtype, w, x, simd)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_matvec_extreme_quants_and_activations(qtype):
    """All-ones bytes give every type its largest quants and scales (Q6_K: u = 63, scale -1; Q4_K/Q5_K:
    scales and mins 63); x at +-amax makes qx = -+127: the largest pair sums the integer path sees."""
    w = random_blocks(qtype, 4, 2, 3)
    size = GGML_QUANT_SIZES[qtype][1]
    keep = np.zeros(size, bool)
    for off in F16_FIELDS[qtype]:
        keep[off : off + 2] = True
    blocks = w.reshape(4, 2, size)
    blocks[:, :, ~keep] = 0xFF
    blocks[1, :, ~keep] = 0x00
    x = np.where(np.arange(2 * QK) % 3 == 0, -1.0, 1.0).astype(np.float32)
    for simd in (True, False):
        check_matvec(qtype, w, x, simd)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_matvec_zero_block_of_x(qtype):
    w = random_blocks(qtype, 9, 3, 5)
    x = np.random.default_rng(5).standard_normal(3 * QK).astype(np.float32)
    x[QK : 2 * QK] = 0
    check_matvec(qtype, w, x)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_shape_mismatch_raises(qtype):
    w = random_blocks(qtype, 3, 2, 0)
    with pytest.raises(ValueError):
        kernel_for(qtype).matvec(w, np.zeros(3 * QK, np.float32), np.empty(3, np.float32))
    with pytest.raises(ValueError):
        kernel_for(qtype).dequantize(w, np.empty((3, 3 * QK), np.float32))


@pytest.mark.model
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_matvec_real_tensors(model_tensors, qtype):
    rng = np.random.default_rng(7)
    for name, data, cols in model_tensors[qtype][:2]:
        w = data  # the read-only memmap itself, as the runtime passes it
        x = rng.standard_normal(cols).astype(np.float32)
        y, exact = check_matvec(qtype, w, x)
        # Gaussian x without outliers: step d ~ 3.5 sigma / 127, so ~1% relative error at most.
        assert np.linalg.norm(y - exact) <= 0.01 * np.linalg.norm(exact), name


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_matvec_same_bits_for_any_thread_count(qtype):
    w = random_blocks(qtype, 301, 4, 9)
    x = np.random.default_rng(9).standard_normal(4 * QK).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run_matvec(qtype, w, x)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = run_matvec(qtype, w, x)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one, many)


# --------------------------------------------------------------------------------------------------
# Batched products: the integer GEMM on interleaved 8-row groups (qcpu/kernels/gemm.py)

# (rows, super-blocks per row, tokens): rows not a multiple of the 8-row group, tokens not a multiple of
# the micro-kernel's, a tile boundary (more than 64 rows), one token; more tiles than gemm.WORKERS (1093
# rows: workers reuse their buffers, the last tile ragged).
GEMM_SHAPES = [(1, 1, 1), (7, 1, 2), (9, 2, 5), (37, 1, 17), (70, 3, 6), (16, 1, 3), (1093, 1, 3)]


def run_gemm(qtype, w, xs, simd=True):
    out = np.full((xs.shape[0], w.shape[0]), np.nan, np.float32)
    gemm = kernel_for(qtype).gemm if simd else kq.make_matvec(qtype, avx2=False, f16c=False)[1]
    gemm(w, np.ascontiguousarray(xs, np.float32), out)
    return out


def _with_unit_scales(qtype, w):
    """The same blocks with d = 1 and dmin = 0 (the fp16 fields), so only the integer part remains."""
    size = GGML_QUANT_SIZES[qtype][1]
    b = w.reshape(w.shape[0], -1, size).copy()
    fields = F16_FIELDS[qtype]
    b[:, :, fields[0]:fields[0] + 2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    if len(fields) > 1:
        b[:, :, fields[1]:fields[1] + 2] = 0
    return b.reshape(w.shape[0], -1)


# Scale bytes that decode to sub-block scale 1 and min 0 (layouts in qcpu/kernels/k_quants.py).
_UNIT_SCALE_BYTES = {
    T.Q2_K: (0, [0x01] * 16),  # low nibble scale, high nibble min
    T.Q3_K: (96, [0x11] * 8 + [0xAA] * 4),  # stored scale 33 = 0b10_0001 (scale - 32 = 1)
    T.Q4_K: (4, [1] * 4 + [0] * 4 + [0x01] * 4),
    T.Q5_K: (4, [1] * 4 + [0] * 4 + [0x01] * 4),
    T.Q6_K: (192, [1] * 16),
}


def _extreme_quants(qtype, w):
    """Every quant at its largest unsigned value (all bits set), sub-block scales 1 and mins 0."""
    size = GGML_QUANT_SIZES[qtype][1]
    b = np.full((w.shape[0], w.shape[1] // size, size), 0xFF, np.uint8)
    at, vals = _UNIT_SCALE_BYTES[qtype]
    b[:, :, at:at + len(vals)] = vals
    return b.reshape(w.shape)


@pytest.mark.parametrize("simd", [True, False], ids=["native", "portable"])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_gemm_integer_part_is_exact(qtype, simd):
    """d = 1, dmin = 0, and activation blocks whose largest magnitude is -127 (so Q8_K's scale is exactly
    1 and its quants are the values): every output must equal the integer sum_s scale_s * (q . x)_s, from
    the NumPy unpacking checked against gguf above (exact: all sums < 2**24). Half the shapes use the
    extremes (every quant at its largest, scales 1, activations all -127), where int16 partial sums could
    overflow."""
    rng = np.random.default_rng(11)
    for k, (rows, nb, n) in enumerate(GEMM_SHAPES):
        w = random_blocks(qtype, rows, nb, seed=k)
        if k % 2:
            w = _extreme_quants(qtype, w)
        w = _with_unit_scales(qtype, w)
        x = rng.integers(-127, 128, (n, nb, QK))
        x[np.arange(n)[:, None], np.arange(nb)[None, :], rng.integers(0, QK, (n, nb))] = -127
        if k % 2:
            x[:] = -127
        x = x.reshape(n, nb * QK)
        q, sc, _, _, _ = unpack_ref(qtype, w.reshape(rows * nb, -1))
        n_sub = sc.shape[1]
        prod = q.reshape(rows, nb, n_sub, -1)[None] * x.reshape(n, 1, nb, n_sub, -1)
        ref = (prod.sum(-1) * sc.reshape(1, rows, nb, n_sub)).sum((-1, -2))
        assert np.abs(ref).max() < 2**24
        assert np.array_equal(run_gemm(qtype, w, x, simd), ref.astype(np.float32))


@pytest.mark.parametrize("simd", [True, False], ids=["native", "portable"])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_gemm_follows_llama_arithmetic(qtype, simd):
    """Random blocks and activations: each token's outputs agree with the float64 emulation of
    ggml_vec_dot_q*_K_q8_K, within float32 rounding of the block terms."""
    rng = np.random.default_rng(12)
    for k, (rows, nb, n) in enumerate(GEMM_SHAPES):
        w = random_blocks(qtype, rows, nb, seed=50 + k)
        xs = rng.standard_normal((n, nb * QK)).astype(np.float32)
        xs[:, rng.integers(0, nb * QK, 3)] *= 30
        got = run_gemm(qtype, w, xs, simd).astype(np.float64)
        for t in range(n):
            ref, scale = vec_dot_ref(qtype, w, xs[t])
            assert (np.abs(got[t] - ref) <= 1e-5 * scale + 1e-30).all()


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_gemm_output_does_not_depend_on_the_batch(qtype):
    """A token's outputs are bit-identical alone, in a small batch or a large one."""
    w = random_blocks(qtype, 75, 2, seed=9)
    xs = np.random.default_rng(5).standard_normal((19, 2 * QK)).astype(np.float32)
    whole = run_gemm(qtype, w, xs)
    for lo, hi in ((0, 1), (5, 7), (3, 19), (18, 19)):
        assert np.array_equal(run_gemm(qtype, w, xs[lo:hi]), whole[lo:hi])


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_gemm_rejects_mismatched_shapes(qtype):
    w = random_blocks(qtype, 3, 2, seed=1)
    with pytest.raises(ValueError):
        kernel_for(qtype).gemm(w, np.zeros((2, 256), np.float32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError):
        kernel_for(qtype).gemm(w, np.zeros((2, 512), np.float32), np.empty((2, 4), np.float32))
