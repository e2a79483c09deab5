"""Legacy quants repacked into 8-row groups (qcpu/kernels/repack.py).

References: the file's own row layout (pack then unpack gives the bytes back), gguf's dequantize through
tests/test_kernels_legacy.py's float64 emulation of ggml's vec_dot (the packed matvec's integer block dots
are exact, so it differs only by float32 summation order), and the row-major GEMM, whose tile layout the
packed one unpacks into (so the two agree bit for bit). Both the native and the portable IR are built."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from qcpu.kernels import PACKED, REGISTRY, kernel_for, legacy, matmul, matmul_many, repack
from qcpu.model import Qwen2Model
from tests.test_kernels_legacy import TOL_EMU, activation, np_llama_matvec, random_blocks

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
QK = 32
# (rows, blocks per row): one group, odd block counts, a ragged last tile of the GEMM, many groups
SHAPES = [(8, 1), (16, 3), (40, 7), (136, 28)]


def kernels(qtype, portable):
    if portable:
        return repack.make_kernels(qtype, avx2=False, f16c=False)[1:]
    k = PACKED[qtype]
    return k.matvec_many, k.gemm


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_pack_round_trip(qtype):
    for rows, nb in SHAPES:
        w = random_blocks(qtype, rows, nb, seed=rows)
        p = repack.pack(w, qtype)
        assert p.shape == (rows // 8, 8 * w.shape[1])  # the same bytes, regrouped
        assert np.array_equal(repack.unpack(p, qtype), w)


def test_pack_refuses_ragged_rows():
    with pytest.raises(ValueError):
        repack.pack(random_blocks(T.Q4_0, 12, 2, seed=1), T.Q4_0)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_packed_matvec_follows_ggml(qtype, portable):
    matvec_many, _ = kernels(qtype, portable)
    for rows, nb in SHAPES:
        w = random_blocks(qtype, rows, nb, seed=nb)
        x = activation(nb * QK, seed=rows)
        got = np.full(rows, np.nan, np.float32)
        matvec_many((repack.pack(w, qtype),), x[None], (got[None],))
        emu, scale = np_llama_matvec(qtype, w, x)
        assert (np.abs(got - emu) <= TOL_EMU * scale + 1e-30).all()
        row = np.empty(rows, np.float32)
        REGISTRY[qtype].matvec(w, x, row)
        assert np.allclose(got, row, rtol=0, atol=TOL_EMU * scale.max())


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_packed_gemm_equals_row_gemm(qtype, portable):
    _, gemm = kernels(qtype, portable)
    row_gemm = legacy.make_kernels(qtype, avx2=False, f16c=False)[2] if portable else REGISTRY[qtype].gemm
    for (rows, nb), n in zip(SHAPES + [(1096, 2)], (1, 2, 5, 17, 3)):
        w = random_blocks(qtype, rows, nb, seed=n)
        xs = np.stack([activation(nb * QK, seed=s) for s in range(n)])
        got = np.full((n, rows), np.nan, np.float32)
        gemm(repack.pack(w, qtype), xs, got)
        want = np.full((n, rows), np.nan, np.float32)
        row_gemm(w, xs, want)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q8_0], ids=lambda t: t.name)
def test_packed_shapes_checked(qtype):
    p = repack.pack(random_blocks(qtype, 16, 2, seed=1), qtype)
    k = kernel_for(qtype, packed=True)
    for x, out in [(np.zeros(96, np.float32), np.empty(16, np.float32)), (np.zeros(64, np.float32), np.empty(8, np.float32)),
                   (np.zeros(64, np.float32), np.empty(12, np.float32))]:
        with pytest.raises(ValueError):
            k.matvec(p, x, out)
    with pytest.raises(ValueError):
        k.gemm(p, np.zeros((3, 64), np.float32), np.empty((3, 24), np.float32))


def test_matmul_many_mixes_packed_and_row_weights():
    """Packed and row-major weights of one type in one call: each output as its own layout's matvec."""
    a, b = random_blocks(T.Q5_0, 24, 4, seed=1), random_blocks(T.Q5_0, 9, 4, seed=2)
    x = activation(4 * QK, seed=3)[None]
    pa = repack.pack(a, T.Q5_0)
    got = matmul_many([(pa, T.Q5_0, True), (b, T.Q5_0), (pa, T.Q5_0, True)], x)
    assert [g.shape for g in got] == [(1, 24), (1, 9), (1, 24)]
    assert np.array_equal(got[0], matmul(pa, T.Q5_0, x, packed=True))
    assert np.array_equal(got[1], matmul(b, T.Q5_0, x))
    assert np.array_equal(got[2], got[0])
    xs = np.stack([activation(4 * QK, seed=s) for s in range(4)])  # the batched path through the packed gemm
    assert np.array_equal(matmul(pa, T.Q5_0, xs, packed=True), matmul(a, T.Q5_0, xs))


def test_model_repacks_legacy_matrices(real_model_path):
    """The default model (Q5_0 / Q8_0 matrices among K-quants): loaded packed, its legacy matrices are
    packed and everything else is as in the file; the same bytes come back. Prefill (the GEMM, whose tiles
    are the same either way) gives the same logits bit for bit; decode (the packed matvec sums each row's
    blocks in another float32 order) the same greedy token, logits within a third of the tolerance the
    llama.cpp goldens allow (test_llama_golden.py: this model's outlier activations amplify last-bit
    differences)."""
    packed, plain = Qwen2Model.load(real_model_path), Qwen2Model.load(real_model_path, repack=False)
    kinds = {}
    for lp, lq in zip(packed.weights.layers, plain.weights.layers):
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            tp, tq = getattr(lp, name), getattr(lq, name)
            assert not tq.packed and tp.rows == tq.rows
            assert tp.packed == (tp.ggml_type in PACKED)
            if tp.packed:
                assert np.array_equal(repack.unpack(tp.raw, T(tp.ggml_type)), tq.raw)
            kinds[T(tp.ggml_type).name] = tp.packed
    assert kinds == {"Q5_0": True, "Q8_0": True, "Q4_K": False, "Q6_K": False}
    assert packed.weights.output.packed and not packed.weights.token_embd.packed  # untied: only looked up
    ids = np.array([0, 7, 8, 151935])
    assert np.array_equal(packed.weights.token_embd.take_rows(ids), plain.weights.token_embd.take_rows(ids))
    out = packed.weights.output  # a packed tensor's rows, as an embedding lookup would take them (a tied file)
    want = GGML_QUANT_SIZES[out.ggml_type]
    assert out.raw.shape[1] == 8 * plain.weights.output.raw.shape[1] == 8 * out.cols // want[0] * want[1]
    assert np.array_equal(out.take_rows(ids), plain.weights.output.take_rows(ids))
    name = "blk.3.ffn_up.weight"  # the loader's pread of whole rows, against the mapped bytes
    scratch = np.empty(packed.file.tensors[name].nbytes, np.uint8)
    assert np.array_equal(packed.file.read_rows(name, 8, 24, scratch), packed.file.raw(name)[8:24])
    tokens = [9707, 11, 1879, 0, 151643, 42]
    lp = packed.forward(tokens, packed.new_cache(16), all_logits=True)
    lq = plain.forward(tokens, plain.new_cache(16), all_logits=True)
    assert np.array_equal(lp, lq)
    cp, cq = packed.new_cache(16), plain.new_cache(16)  # one token: the packed matvec
    dp, dq = packed.forward(tokens[:1], cp), plain.forward(tokens[:1], cq)
    assert np.abs(dp - dq).max() <= 0.25 and dp.argmax() == dq.argmax()
