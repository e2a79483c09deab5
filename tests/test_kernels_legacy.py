"""Float (F32/F16/BF16) and legacy block-quant (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) kernels.

References:
  * dequantize -> gguf-py's numpy `gguf.quants.dequantize`, bit for bit (np.array_equal);
  * matvec     -> (a) float64 dequantized-weights @ x, within the error the activation rounding can
                  cause; (b) a float64 NumPy emulation of llama.cpp's CPU scheme (quantize x to Q8_0/
                  Q8_1 as the x86 quantize_row_q8_* does, exact integer dot per block, times the
                  float32 product d_w*d_x, plus m_w*s_x for the *_1 types), much more tightly.
The NumPy code here is written independently of the Numba kernels.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from qcpu.kernels import REGISTRY, legacy, matmul

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
FLOATS = [T.F32, T.F16, T.BF16]
QK = 32
# Byte offsets of the fp16 fields (d, and m for the *_1 types) in each block (ggml-common.h).
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,)}
ACT_Q8_1 = {T.Q4_1, T.Q5_1}  # vec_dot_type Q8_1; the others use Q8_0

# Tolerance (a), legacy types: x is rounded to 8 bits per 32-value block with step d = amax/127.
# The rounding error is uniform in +-d/2 (rms d/sqrt(12)), and amax <= sqrt(32) * rms(block), so the
# rms error is at most sqrt(32)/(127*sqrt(12)) = 1.3% of the block's rms -- typically ~0.5% -- and the
# fp16 rounding of d adds <0.05%. A matvec with unstructured weights carries that relative error
# over to ||y||; 2e-2 of ||y|| bounds it with margin. F16/BF16 round x to 11/8 significant bits.
TOL_REF = {**{t: 2e-2 for t in LEGACY}, T.F32: 1e-5, T.F16: 2e-3, T.BF16: 1e-2}
# Tolerance (b): the kernel and the emulation do the same integer arithmetic; they differ only in
# float32 (kernel: 8-lane accumulators) versus float64 (emulation) summation of the block terms.
TOL_EMU = 1e-5


# --------------------------------------------------------------------------------------------------
# Fixtures and data


@pytest.fixture(scope="module")
def model(real_model_path):
    """{type: [(name, uint8[rows, row_bytes] or float32[...], cols)]} from the default model."""
    from gguf import GGUFReader

    out: dict = {}
    for t in GGUFReader(str(real_model_path)).tensors:
        out.setdefault(t.tensor_type, []).append((t.name, t.data, int(t.shape[0])))
    return out


def _tensor(model, name):
    for ts in model.values():
        for n, data, cols in ts:
            if n == name:
                return data, cols
    raise KeyError(name)


@pytest.fixture(scope="module")
def real_floats(model):
    """Float weights of the real model to requantize into the types the file lacks: an attention
    matrix and 256 token embeddings, dequantized by gguf-py."""
    q, _ = _tensor(model, "blk.0.attn_q.weight")
    e, _ = _tensor(model, "token_embd.weight")
    return [gq.dequantize(np.asarray(q), T.Q5_0), gq.dequantize(np.asarray(e[1000:1256]), T.Q5_0)]


def as_rows(qtype, a):
    """gguf.quants.quantize output -> uint8[rows, row_bytes], the kernels' input."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], -1)


def random_blocks(qtype, rows, nb, seed):
    """Random bytes in every field, with the fp16 fields set to finite values (normals of several
    magnitudes, some subnormals and zeros, both signs), so every weight decodes to a finite float."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[qtype][1]
    w = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        v = (rng.standard_normal((rows, nb)) * 10.0 ** rng.integers(-4, 2, (rows, nb))).astype(np.float16)
        sub = rng.random((rows, nb)) < 0.05
        v[sub] = (rng.integers(-1023, 1024, sub.sum()) * 2.0**-24).astype(np.float16)
        v[rng.random((rows, nb)) < 0.02] = 0
        w[:, :, off:off + 2] = v.view(np.uint8).reshape(rows, nb, 2)
    return w.reshape(rows, nb * size)


def random_float_rows(qtype, rows, cols, seed):
    """Random bit patterns for F16/BF16 rows, NaNs replaced (infinities and subnormals kept)."""
    rng = np.random.default_rng(seed)
    if qtype == T.F32:
        return (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-30, 30, (rows, cols))).astype(np.float32)
    h = rng.integers(0, 1 << 16, size=(rows, cols), dtype=np.uint16)
    nan = ((h & 0x7C00) == 0x7C00) & ((h & 0x03FF) != 0) if qtype == T.F16 else ((h & 0x7F80) == 0x7F80) & ((h & 0x7F) != 0)
    h[nan] &= 0x8000 | 0x3FFF  # clear an exponent bit: a finite value
    return h


def activation(cols, seed):
    """An activation-like vector: gaussian with a few large outliers (as hidden states have)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cols).astype(np.float32)
    x[rng.integers(0, cols, max(1, cols // 100))] *= 20
    return x


def kernel_dequantize(qtype, w, cols):
    out = np.full((w.shape[0], cols), np.nan, dtype=np.float32)
    REGISTRY[qtype].dequantize(w, out)
    return out


def kernel_matvec(qtype, w, x):
    out = np.full(w.shape[0], np.nan, dtype=np.float32)
    REGISTRY[qtype].matvec(w, x, out)
    return out


# --------------------------------------------------------------------------------------------------
# NumPy emulation of llama.cpp's x86 activation quantizers and vec_dot


def np_quantize_q8(x, with_sum):
    """quantize_row_q8_0 / q8_1 as llama.cpp's AVX/AVX2 code computes them, in float32."""
    xb = x.reshape(-1, QK).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.int8)  # round half to even
    d16 = d.astype(np.float16).astype(np.float32)
    if not with_sum:
        return q, d16, None
    s = (d * q.astype(np.int32).sum(axis=1).astype(np.float32)).astype(np.float16).astype(np.float32)
    return q, d16, s


def np_weight_ints(qtype, w):
    """Weight rows -> (int quants [rows, nb, 32], d [rows, nb], m [rows, nb] or None), via gguf's own
    dequantization of a block whose scale is 1 and min 0 (so the layout knowledge stays gguf's)."""
    rows = w.shape[0]
    size = GGML_QUANT_SIZES[qtype][1]
    b = w.reshape(rows, -1, size).copy()
    d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if qtype in ACT_Q8_1 else None
    b[:, :, 0:2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    if m is not None:
        b[:, :, 2:4] = 0
    q = gq.dequantize(b.reshape(rows, -1), qtype).reshape(rows, -1, QK)
    return np.rint(q).astype(np.int64), d, m


def np_llama_matvec(qtype, w, x):
    """float64 emulation of ggml_vec_dot_q*_q8_*: exact int32 block dots, d_w*d_x rounded to float32
    as ggml forms it, everything else summed in float64."""
    q, dw, mw = np_weight_ints(qtype, w)
    xq, dx, sx = np_quantize_q8(x, qtype in ACT_Q8_1)
    sumi = np.einsum("rbk,bk->rb", q, xq.astype(np.int64))
    y = (sumi * (dw * dx[None, :]).astype(np.float64)).sum(axis=1)
    scale = (np.abs(sumi) * np.abs(dw * dx[None, :]).astype(np.float64)).sum(axis=1)
    if mw is not None:
        y += (mw.astype(np.float64) * sx[None, :]).sum(axis=1)
        scale += np.abs(mw.astype(np.float64) * sx[None, :]).sum(axis=1)
    return y, scale


def np_float_matvec(qtype, w, x):
    """float64 emulation of ggml_vec_dot_f32/f16/bf16: x converted to the weight's format first."""
    wf = gq.dequantize(w, qtype) if qtype != T.F32 else w.view(np.float32)
    if qtype == T.F16:
        x = x.astype(np.float16).astype(np.float32)
    elif qtype == T.BF16:
        x = gq.dequantize(gq.quantize(x, T.BF16), T.BF16)
    prod = wf.astype(np.float64) * x.astype(np.float64)
    return prod.sum(axis=1), np.abs(prod).sum(axis=1)


def check_matvec(qtype, w, x):
    """Both matvec references (see the module docstring)."""
    got = kernel_matvec(qtype, w, x).astype(np.float64)
    wf = gq.dequantize(w, qtype) if qtype != T.F32 else w.view(np.float32)
    ref = wf.astype(np.float64) @ x.astype(np.float64)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) <= TOL_REF[qtype] * np.linalg.norm(ref), "far from float64 W @ x"
    emu, scale = (np_float_matvec if qtype in FLOATS else np_llama_matvec)(qtype, w, x)
    assert np.linalg.norm(got - emu) <= TOL_EMU * np.linalg.norm(emu), "off llama.cpp's arithmetic"
    # Per row too, against the row's sum of |terms| (the scale float32 summation error grows with).
    assert (np.abs(got - emu) <= TOL_EMU * scale + 1e-30).all()


# --------------------------------------------------------------------------------------------------
# Registry, activation quantizers


def test_registered():
    for t in LEGACY + FLOATS:
        assert t in REGISTRY, t.name


@pytest.mark.parametrize("with_sum", [False, True], ids=["q8_0", "q8_1"])
def test_activation_quantizer_matches_llama_x86(with_sum):
    rng = np.random.default_rng(2)
    x = np.concatenate([
        activation(4096, 3),
        np.zeros(QK, np.float32),  # amax == 0: d = 0, all quants 0
        # amax 127 makes the multiplier exactly 1: the halves are ties, rounded to even
        np.array([127.0] + [k + 0.5 for k in range(-16, 15)], np.float32),
        (rng.standard_normal(QK) * 1e-6).astype(np.float32),
    ])
    want_q, want_d, want_s = np_quantize_q8(x, with_sum)
    if with_sum:
        q, d, s = legacy.quantize_q8_1(x)
        assert np.array_equal(s, want_s)
    else:
        q, d = legacy.quantize_q8_0(x)
    assert np.array_equal(q.reshape(-1, QK), want_q)
    assert np.array_equal(d, want_d)
    assert list(q[-2 * QK + 1:-2 * QK + 5]) == [-16, -14, -14, -12]  # -15.5, -14.5, -13.5, -12.5


# --------------------------------------------------------------------------------------------------
# Dequantize: bit-exact against gguf-py


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q8_0, T.F32], ids=lambda t: t.name)
def test_dequantize_real_tensors(model, qtype):
    tensors = model[qtype]
    assert tensors
    for name, data, cols in tensors[:12]:
        data = np.asarray(data[:2048])  # row slices keep the big ones (embeddings, output) fast
        w = data.reshape(1, -1).view(np.uint8) if qtype == T.F32 else data
        want = gq.dequantize(data, qtype).reshape(w.shape[0], -1)
        got = kernel_dequantize(qtype, w, want.shape[1])
        assert np.array_equal(got, want), name


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_1, T.Q5_0, T.Q8_0, T.F16, T.BF16], ids=lambda t: t.name)
def test_dequantize_requantized_real_weights(real_floats, qtype):
    for f in real_floats:
        q = gq.quantize(f, qtype)
        w = as_rows(qtype, q)
        assert np.array_equal(kernel_dequantize(qtype, w, f.shape[1]), gq.dequantize(q, qtype))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_dequantize_random_blocks(qtype):
    w = random_blocks(qtype, rows=37, nb=24, seed=int(qtype))
    assert np.array_equal(kernel_dequantize(qtype, w, 24 * QK), gq.dequantize(w, qtype))


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda t: t.name)
def test_dequantize_random_float_bits(qtype):
    a = random_float_rows(qtype, rows=29, cols=160, seed=int(qtype))
    w = as_rows(qtype, a)
    want = gq.dequantize(w, qtype) if qtype != T.F32 else a
    assert np.array_equal(kernel_dequantize(qtype, w, 160).view(np.uint32), want.view(np.uint32))


def test_dequantize_portable_half_decode_all_scales():
    """Dequantize built without F16C (integer half decode in IR), over every non-NaN fp16 scale."""
    run = legacy.make_kernels(T.Q8_0, avx2=False, f16c=False)[0]

    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = h[~np.isnan(h.view(np.float16))]
    w = np.zeros((h.size, 34), np.uint8)
    w[:, 0:2] = h.view(np.uint8).reshape(-1, 2)
    w[:, 2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    out = np.empty((h.size, QK), np.float32)
    run(w, out)
    with np.errstate(invalid="ignore"):  # inf scale * 0 = NaN, on both sides
        want = gq.dequantize(w, T.Q8_0)
    assert np.array_equal(out, want, equal_nan=True)


def test_dequantize_through_registry_helpers():
    from qcpu.kernels import dequantize

    w = random_blocks(T.Q5_0, rows=3, nb=2, seed=9)
    assert np.array_equal(dequantize(w, T.Q5_0, 64), gq.dequantize(w, T.Q5_0))


# --------------------------------------------------------------------------------------------------
# Matvec: float64 reference and llama.cpp emulation


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q8_0], ids=lambda t: t.name)
def test_matvec_real_tensors(model, qtype):
    for name, data, cols in model[qtype][:6]:
        w = np.asarray(data[:1024])
        check_matvec(qtype, w, activation(cols, seed=len(name)))


@pytest.mark.parametrize("qtype", LEGACY + [T.F16, T.BF16], ids=lambda t: t.name)
def test_matvec_requantized_real_weights(real_floats, qtype):
    for i, f in enumerate(real_floats):
        w = as_rows(qtype, gq.quantize(f, qtype))
        check_matvec(qtype, w, activation(f.shape[1], seed=i))


def test_matvec_f32_real(model):
    for name, data, cols in model[T.F32][:8]:
        w = np.ascontiguousarray(np.broadcast_to(np.asarray(data, np.float32), (5, cols)))
        check_matvec(T.F32, as_rows(T.F32, w), activation(cols, seed=cols))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,nb", [(1, 1), (7, 3), (133, 80)])
def test_matvec_random_blocks(qtype, rows, nb):
    w = random_blocks(qtype, rows=rows, nb=nb, seed=rows * 100 + nb)
    # Random bytes give weights of wildly different scales per block, unlike a trained matrix, so
    # only the tight llama.cpp emulation is meaningful here (the float64 bound assumes smooth data).
    x = activation(nb * QK, seed=nb)
    got = kernel_matvec(qtype, w, x).astype(np.float64)
    emu, scale = np_llama_matvec(qtype, w, x)
    assert (np.abs(got - emu) <= TOL_EMU * scale + 1e-30).all()


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda t: t.name)
def test_matvec_random_floats(qtype):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((45, 320)).astype(np.float32)
    w = as_rows(qtype, a if qtype == T.F32 else gq.quantize(a, qtype))
    check_matvec(qtype, w, activation(320, seed=6))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_matvec_zero_activation_and_threads(qtype, real_floats):
    f = real_floats[0][:64]
    w = as_rows(qtype, gq.quantize(f, qtype))
    assert np.array_equal(kernel_matvec(qtype, w, np.zeros(f.shape[1], np.float32)), np.zeros(64, np.float32))
    x = activation(f.shape[1], seed=11)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = kernel_matvec(qtype, w, x)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(one, kernel_matvec(qtype, w, x))  # rows are independent: no thread effect


def generic_matvec(qtype):
    """The target-independent IR path (what CPUs without AVX2 and F16C run), built here so it is tested
    on every machine, whichever path the registry picked."""
    many = legacy.make_kernels(qtype, avx2=False, f16c=False)[1]
    return lambda w, x, out: many((w,), x[None], (out[None],))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_matvec_generic_ir_path(qtype, real_floats):
    mv = generic_matvec(qtype)
    for w, x in [(random_blocks(qtype, rows=57, nb=28, seed=3), activation(28 * QK, seed=4)),
                 (as_rows(qtype, gq.quantize(real_floats[0], qtype)), activation(real_floats[0].shape[1], seed=5))]:
        got = np.full(w.shape[0], np.nan, np.float32)
        mv(w, x, got)
        emu, scale = np_llama_matvec(qtype, w, x)
        assert (np.abs(got - emu) <= TOL_EMU * scale + 1e-30).all()
        # Same integers, same scales: only the float summation order may differ from the registry's.
        assert np.allclose(got, kernel_matvec(qtype, w, x), rtol=0, atol=TOL_EMU * scale.max())


@pytest.mark.parametrize("qtype", LEGACY + FLOATS, ids=lambda t: t.name)
def test_rejects_mismatched_shapes(qtype):
    w = random_blocks(qtype, rows=2, nb=2, seed=1) if qtype in LEGACY else as_rows(qtype, random_float_rows(qtype, 2, 64, 1))
    with pytest.raises(ValueError):
        REGISTRY[qtype].matvec(w, np.zeros(96, np.float32), np.empty(2, np.float32))
    with pytest.raises(ValueError):
        REGISTRY[qtype].matvec(w, np.zeros(64, np.float32), np.empty(3, np.float32))
    with pytest.raises(ValueError):
        REGISTRY[qtype].dequantize(w, np.empty((2, 96), np.float32))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_matmul_batch_path(real_floats, qtype):
    """The registry's batched path (the integer GEMM for Q4_0 / Q8_0, dequantized tiles + BLAS for F16)
    agrees with float64 W @ x and with the per-token matvec, within the activation-rounding bound."""
    f = real_floats[1]
    w = as_rows(qtype, gq.quantize(f, qtype))
    xs = np.stack([activation(f.shape[1], seed=s) for s in range(3)])
    ref = (gq.dequantize(w, qtype).astype(np.float64) @ xs.T.astype(np.float64)).T
    batch = matmul(w, qtype, xs)
    single = np.stack([matmul(w, qtype, xs[i:i + 1])[0] for i in range(3)])
    for got in (batch, single):
        assert np.linalg.norm(got - ref) <= TOL_REF[qtype] * np.linalg.norm(ref)


# --------------------------------------------------------------------------------------------------
# Batched products: the integer GEMM on interleaved 8-row groups (qcpu/kernels/gemm.py)

# (rows, blocks per row, tokens): rows not a multiple of the 8-row group, tokens not a multiple of the
# micro-kernel's, a tile boundary (more than 64 rows), one token; more tiles than gemm.WORKERS (1093 rows:
# workers reuse their buffers, the last tile ragged).
GEMM_SHAPES = [(1, 1, 1), (7, 2, 2), (9, 3, 5), (37, 4, 17), (130, 28, 13), (16, 1, 3), (1093, 1, 3)]


def gemm_kernel(qtype, portable):
    return legacy.make_kernels(qtype, avx2=False, f16c=False)[2] if portable else REGISTRY[qtype].gemm


def run_gemm(qtype, w, xs, portable=False):
    out = np.full((xs.shape[0], w.shape[0]), np.nan, dtype=np.float32)
    gemm_kernel(qtype, portable)(w, np.ascontiguousarray(xs, dtype=np.float32), out)
    return out


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_gemm_integer_part_is_exact(qtype, portable):
    """Block scales 1, mins 0, integer activations whose every block reaches +-127 (so their Q8 scale is
    1 and the quants are the values): each output must be the exact integer W @ x, with W's integers
    taken from gguf's dequantize and the product from NumPy int64 (all sums < 2**24: float32 holds them)."""
    rng = np.random.default_rng(7)
    size = GGML_QUANT_SIZES[qtype][1]
    for k, (rows, nb, n) in enumerate(GEMM_SHAPES):
        w = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)
        if k % 2:  # the extremes: every quant at its largest magnitude, where int16 partial sums could overflow
            w[:] = 0x80 if qtype == T.Q8_0 else 0xFF
        w[:, :, 0:2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
        if qtype in ACT_Q8_1:
            w[:, :, 2:4] = 0
        w = w.reshape(rows, nb * size)
        ints = gq.dequantize(w, qtype).astype(np.int64)
        x = rng.integers(-127, 128, (n, nb, QK))
        x[np.arange(n)[:, None], np.arange(nb)[None, :], rng.integers(0, QK, (n, nb))] = 127 * rng.choice([-1, 1], (n, nb))
        if k % 2:
            x[:] = 127 * rng.choice([-1, 1], (n, 1, 1))
        x = x.reshape(n, nb * QK)
        ref = x @ ints.T
        assert np.abs(ref).max() < 2**24
        assert np.array_equal(run_gemm(qtype, w, x, portable), ref.astype(np.float32))


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_gemm_follows_llama_arithmetic(qtype, portable):
    """Random blocks (scales of many magnitudes, subnormals, zeros) and activations with outliers: every
    token's row of the product agrees with the float64 emulation of llama.cpp's vec_dot (exact integer
    block dots) as tightly as the matvec does."""
    for i, (rows, nb, n) in enumerate(GEMM_SHAPES):
        w = random_blocks(qtype, rows, nb, seed=100 + i)
        xs = np.stack([activation(nb * QK, seed=200 + 31 * i + t) for t in range(n)])
        got = run_gemm(qtype, w, xs, portable).astype(np.float64)
        assert np.isfinite(got).all()
        for t in range(n):
            emu, scale = np_llama_matvec(qtype, w, xs[t])
            assert (np.abs(got[t] - emu) <= TOL_EMU * scale + 1e-30).all()


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_gemm_output_does_not_depend_on_the_batch(qtype):
    """A token's outputs are bit-identical whether it comes alone, in a small batch or in a large one
    (so prefill logits do not depend on the chunking), and match the real weights' float64 product."""
    f = np.concatenate([np.random.default_rng(3).standard_normal((75, 256)).astype(np.float32)])
    w = as_rows(qtype, gq.quantize(f, qtype))
    xs = np.stack([activation(256, seed=s) for s in range(19)])
    whole = run_gemm(qtype, w, xs)
    for lo, hi in ((0, 1), (5, 7), (3, 19), (18, 19)):
        assert np.array_equal(run_gemm(qtype, w, xs[lo:hi]), whole[lo:hi])
    ref = xs.astype(np.float64) @ gq.dequantize(w, qtype).T.astype(np.float64)
    assert np.linalg.norm(whole - ref) <= TOL_REF[qtype] * np.linalg.norm(ref)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_gemm_rejects_mismatched_shapes(qtype):
    w = random_blocks(qtype, rows=3, nb=2, seed=1)
    with pytest.raises(ValueError):
        REGISTRY[qtype].gemm(w, np.zeros((2, 96), np.float32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError):
        REGISTRY[qtype].gemm(w, np.zeros((2, 64), np.float32), np.empty((2, 4), np.float32))
