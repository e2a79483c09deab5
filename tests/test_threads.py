"""--threads sets both pools the kernels run on: Numba's and the BLAS library under NumPy's matmuls."""

import numba
import pytest
from threadpoolctl import threadpool_info

from qcpu.errors import QcpuError
from qcpu.threads import set_threads


def blas_threads():
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_threads_sets_numba_and_blas():
    before = numba.get_num_threads()
    try:
        assert set_threads(1) == 1 and numba.get_num_threads() == 1
        assert blas_threads() == {1}
        most = numba.config.NUMBA_NUM_THREADS
        assert set_threads(most + 5) == most and blas_threads() == {most}
        assert set_threads(None) == most  # None leaves the setting alone
    finally:
        set_threads(before)


@pytest.mark.parametrize("bad", [0, -3])
def test_threads_must_be_positive(bad):
    with pytest.raises(QcpuError, match="--threads must be positive"):
        set_threads(bad)
