"""Memory read bandwidth of this machine, the ceiling of decode speed (every weight is read once per token).

    python tools/membw.py [--gib 1.0] [--threads 1 2 ...] [--repeats 5]

Sums a float32 array much larger than the caches with a Numba prange loop (what PERF_NOTES.md calls the
prange sum), at each thread count, best of --repeats, and prints GB/s (1e9 bytes/s). Compare it with
`qcpu bench`'s "decode reads N GB/s of weights": decode tok/s <= bandwidth / bytes of weights per token.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True)  # reassociation lets the sum vectorize: the loads set the pace
def _sum(a):
    total = np.float32(0.0)
    for i in prange(a.shape[0]):
        total += a[i]
    return total


def bandwidth(a: np.ndarray, threads: int, repeats: int) -> float:
    """Bytes of `a` read per second (best of `repeats`) with `threads` Numba threads."""
    numba.set_num_threads(threads)
    _sum(a)  # compile / warm up
    best = min(_timed(a) for _ in range(repeats))
    return a.nbytes / best


def _timed(a):
    t = time.perf_counter()
    _sum(a)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="array size in GiB (default 1)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1..all)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    n = int(args.gib * (1 << 30)) // 4
    a = np.ones(n, dtype=np.float32)
    for t in args.threads or range(1, numba.config.NUMBA_NUM_THREADS + 1):
        print(f"{t} thread(s): {bandwidth(a, t, args.repeats) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
