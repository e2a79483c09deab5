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
