"""What a parallel region costs after the calling thread worked alone for a while: how long the kernels'
worker threads keep spinning before they sleep, and what waking them costs on this machine.

    python tools/region_wakeup.py [--gaps 0 10 50 100 500 1000] [--repeats 200]

A decode step starts ~110 parallel regions from Python; any serial gap longer than the workers' spin
(OMP_WAIT_POLICY=passive + GOMP_SPINCOUNT, as qcpu sets them unless the environment does) makes the next
region pay a wake-up. Prints the median and 90th percentile wall time of a tiny region after each gap.
Measured here (AMD EPYC VM, GOMP_SPINCOUNT=2000): 2.5 us up to a 50 us gap, 46 us after 100 us, 82 us
(p90 312) after 500 us.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from numba import njit, prange

import qcpu  # noqa: F401  (sets the thread pools' wait policy before Numba starts them)


@njit(parallel=True, cache=True)
def _tiny(a):
    for i in prange(a.shape[0]):
        a[i] += 1.0


def _busy(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gaps", type=float, nargs="+", default=[0, 5, 10, 20, 50, 100, 200, 500, 1000],
                   help="serial gaps before each region, microseconds")
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    a = np.zeros(64)
    _tiny(a)  # compile / start the pool
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    for gap in args.gaps:
        times = []
        for _ in range(args.repeats):
            _busy(gap)
            t = time.perf_counter()
            _tiny(a)
            times.append(time.perf_counter() - t)
        print(f"gap {gap:7.0f} us: region {np.median(times) * 1e6:7.1f} us (p90 {np.percentile(times, 90) * 1e6:7.1f})")


if __name__ == "__main__":
    main()
