"""Time one decode step of Qwen2Model.forward_batch for several sequences at once (a server's batch).

    python tools/batch_decode.py [MODEL] [--rows 1,2,4,8] [--depth 64] [--steps 20] [-t 2]

Each row count gets its own caches filled with `depth` tokens; the steps of the row counts alternate
(round robin), so a drift of the machine's speed hits them alike. Prints the median ms per step and the
aggregate tokens/s, and the ratio to one row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from qcpu.models import resolve_model
from qcpu.model import Qwen2Model
from qcpu.threads import set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    model = Qwen2Model.load(resolve_model(args.model))
    rows = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    caches = {}
    for n in rows:
        caches[n] = [model.new_cache(args.depth + args.steps + 8) for _ in range(n)]
        for c in caches[n]:
            model.forward(rng.integers(100, 20000, args.depth), c)
    times = {n: [] for n in rows}
    for step in range(args.steps + 2):
        for n in rows:
            t0 = time.perf_counter()
            model.forward_batch(rng.integers(100, 20000, n), caches[n])
            if step >= 2:  # the first steps compile and warm up
                times[n].append(time.perf_counter() - t0)
    base = statistics.median(times[rows[0]]) / rows[0]
    for n in rows:
        m = statistics.median(times[n])
        print(f"rows {n:2d}: {m * 1e3:7.1f} ms/step  {n / m:6.1f} tok/s  ({base * n / m:.2f}x the tokens/s of {rows[0]} row)")


if __name__ == "__main__":
    main()
