"""How many CPU threads the kernels use: one setting for every command (Numba's thread pool)."""

from __future__ import annotations

from qcpu.errors import QcpuError


def set_threads(threads: int | None) -> int:
    """Run the Numba kernels on `threads` threads (None: leave the default, all cores); at most the
    pool Numba started with. Returns the number now in use. Raises QcpuError if `threads` <= 0."""
    import numba

    if threads is not None:
        if threads <= 0:
            raise QcpuError(f"--threads must be positive, got {threads}")
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return numba.get_num_threads()
