"""How many CPU threads the kernels use: one setting for every command, for Numba's thread pool and for
the BLAS library NumPy's matmuls run on (prefill's batched products), through threadpoolctl."""

from __future__ import annotations

from qcpu.errors import QcpuError

_blas_limits = None  # the threadpoolctl limiter in effect (kept: it holds the setting until restored)


def set_threads(threads: int | None) -> int:
    """Run the Numba kernels and BLAS on `threads` threads (None: leave the defaults, all cores); at
    most the pool Numba started with. Returns the number now in use. Raises QcpuError if `threads` <= 0."""
    global _blas_limits
    import numba
    from threadpoolctl import threadpool_limits

    if threads is not None:
        if threads <= 0:
            raise QcpuError(f"--threads must be positive, got {threads}")
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _blas_limits = threadpool_limits(limits=numba.get_num_threads(), user_api="blas")
    return numba.get_num_threads()
