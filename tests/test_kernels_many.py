"""matmul_many: several weights that read the same activation (Q/K/V, gate/up) in one pass per type.

Each output must be exactly what the type's own matvec gives for that weight alone: the activation is
quantized the same way, and a row's dot does not depend on which rows share its parallel region."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qcpu.kernels import kernel_for, matmul_many
from tests.test_kernels_k_quants import random_blocks as k_blocks
from tests.test_kernels_legacy import activation, random_float_rows
from tests.test_kernels_legacy import random_blocks as legacy_blocks

COLS = 512


def weight(qtype, rows, seed):
    if qtype in (T.F16, T.BF16, T.F32):
        w = random_float_rows(qtype, rows, COLS, seed)
        w = np.ascontiguousarray(w).view(np.uint8).reshape(rows, -1)
    elif qtype.name.endswith("_K"):
        w = k_blocks(qtype, rows, COLS // 256, seed)
    else:
        w = legacy_blocks(qtype, rows, COLS // 32, seed)
    w.setflags(write=False)  # as the mapped file's views are
    return w


@pytest.mark.parametrize("types", [(T.Q5_0, T.Q5_0, T.Q8_0), (T.Q4_K, T.Q4_K, T.Q6_K), (T.Q4_0, T.F16, T.Q4_0),
                                   (T.Q5_1, T.Q5_1)], ids=lambda ts: "-".join(t.name for t in ts))
@pytest.mark.parametrize("rows", [(37, 1, 9), (8, 64, 3)])
def test_matmul_many_equals_one_matvec_per_weight(types, rows):
    pairs = [(weight(t, r, seed), t) for seed, (t, r) in enumerate(zip(types, rows))]
    x = activation(COLS, seed=7)[None]
    got = matmul_many(pairs, x)
    assert [g.shape for g in got] == [(1, w.shape[0]) for w, _ in pairs]
    for (w, t), g in zip(pairs, got):
        want = np.full(w.shape[0], np.nan, np.float32)
        kernel_for(t).matvec(w, x[0], want)
        assert np.array_equal(g[0], want, equal_nan=True), t.name


def test_matmul_many_batch_is_matmul_per_weight():
    from qcpu.kernels import matmul

    pairs = [(weight(T.Q4_K, 16, 1), T.Q4_K), (weight(T.Q8_0, 5, 2), T.Q8_0)]
    xs = np.stack([activation(COLS, seed=s) for s in range(6)])
    for (w, t), g in zip(pairs, matmul_many(pairs, xs)):
        assert np.array_equal(g, matmul(w, t, xs))


def test_matmul_many_rejects_a_weight_of_the_wrong_width():
    narrow = np.ascontiguousarray(weight(T.Q4_0, 4, 2)[:, :-18])
    narrow.setflags(write=False)
    pairs = [(weight(T.Q4_0, 4, 1), T.Q4_0), (narrow, T.Q4_0)]
    with pytest.raises(ValueError):
        matmul_many(pairs, activation(COLS, seed=1)[None])


def _families(qtype):
    """(name, matvec_many) of every kernel of qtype: the registered one (this CPU's best path), the packed
    variant where there is one, and the target-independent IR of each, built here so every machine runs it."""
    from qcpu.kernels import PACKED, REGISTRY, k_quants, legacy, repack

    if qtype.name.endswith("_K"):
        return [("rows", REGISTRY[qtype].matvec_many, False),
                ("rows-portable", k_quants.make_matvec(qtype, avx2=False, f16c=False)[0], False)]
    return [("rows", REGISTRY[qtype].matvec_many, False),
            ("rows-portable", legacy.make_kernels(qtype, avx2=False, f16c=False)[1], False),
            ("packed", PACKED[qtype].matvec_many, True),
            ("packed-portable", repack.make_kernels(qtype, avx2=False, f16c=False)[1], True)]


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_multi_token_matvec_is_one_matvec_per_token(qtype):
    """A few tokens at once (a server's batch, speculative verification): each weight row is read once for
    all of them, and each token's output is bit for bit what the matvec gives it alone, for 1..17 tokens
    (every split into calls of 4, 2 and 1) and for rows that are not a multiple of 8 or 4."""
    from qcpu.kernels import repack

    for name, many, packed in _families(qtype):
        for rows, n in ((40, 17), (24, 5), (8, 3), (16, 2), (11, 6), (13, 1)):
            if packed and rows % 8:
                continue
            w = weight(qtype, rows, seed=rows)
            w2 = weight(qtype, 8, seed=rows + 1)  # a second weight in the same pass (Q/K/V, gate/up)
            if packed:
                w, w2 = repack.pack(w, qtype), repack.pack(w2, qtype)
            xs = np.stack([activation(COLS, seed=100 + s) for s in range(n)])
            got = (np.full((n, rows), np.nan, np.float32), np.full((n, 8), np.nan, np.float32))
            many((w, w2), xs, got)
            for t in range(n):
                for weight_, out in ((w, got[0]), (w2, got[1])):
                    want = np.full((1, out.shape[1]), np.nan, np.float32)
                    many((weight_,), xs[t : t + 1], (want,))
                    assert np.array_equal(out[t], want[0]), (name, rows, n, t)


def test_matmul_below_the_gemm_threshold_is_the_per_token_matvec():
    """matmul / matmul_many send a few tokens to the multi-token matvec: the same bits as token by token."""
    from qcpu.kernels import matmul

    from qcpu.kernels import repack

    pairs = [(weight(T.Q4_K, 16, 1), T.Q4_K, False), (weight(T.Q6_K, 8, 3), T.Q6_K, False),
             (repack.pack(weight(T.Q8_0, 24, 2), T.Q8_0), T.Q8_0, True)]
    for n in (2, 4, 7):
        xs = np.stack([activation(COLS, seed=s) for s in range(n)])
        many = matmul_many(pairs, xs)
        for (w, t, packed), g in zip(pairs, many):
            assert n < kernel_for(t, packed).gemm_min_tokens
            one = np.stack([matmul(w, t, xs[i : i + 1], packed)[0] for i in range(n)])
            assert np.array_equal(g, one) and np.array_equal(matmul(w, t, xs, packed), one), (t.name, n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0, T.Q4_K, T.Q6_K])
def test_exact_products_are_one_token_matvecs_whatever_the_batch(qtype, n):
    """matmul_many(exact=True) (speculative checking): every token's row bit for bit its own matvec, for any
    number of tokens, several weights in one pass (the F16 one pairs tokens over each widened row)."""
    pairs = [(weight(qtype, rows, seed), qtype) for seed, rows in enumerate((40, 24))]
    x = np.stack([activation(COLS, seed=11 + t) for t in range(n)])
    got = matmul_many(pairs, x, exact=True)
    for (w, t), g in zip(pairs, got):
        kernel = kernel_for(t)
        for i in range(n):
            one = np.empty(w.shape[0], np.float32)
            kernel.matvec(w, np.ascontiguousarray(x[i]), one)
            assert np.array_equal(g[i], one), (i, t)
