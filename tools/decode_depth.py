"""Decode speed with a deep KV cache against an empty one, alternating in one process (issue 11's "16K
keeps 60% of depth 0").

The deep cache is filled with random rows instead of a 16K-token prefill (minutes): attention's cost does
not depend on what the rows hold, only on how many there are. Both caches decode the same token, one step
each in turn, so a machine that slows down mid-run slows both sides alike; the ratio of the medians is
printed.

    python tools/decode_depth.py [--model FILE] [--depth 16384] [-ctk q8_0 -ctv q8_0] [--steps 40] [-t 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qcpu.cache import cache_type, to_rows
from qcpu.model import Qwen2Model
from qcpu.models import resolve_model
from qcpu.threads import set_threads


def deep_cache(model: Qwen2Model, depth: int, type_k, type_v, seed: int = 0):
    """A cache holding `depth` tokens of random rows (keys of unit variance, as Qwen2's roughly are)."""
    c = model.config
    cache = model.new_cache(max(depth + 64, 128), type_k=type_k, type_v=type_v)
    if depth:
        rng = np.random.default_rng(seed)
        block = min(depth, 4096)
        keys = to_rows(rng.standard_normal((block, c.n_kv_heads, c.head_dim)).astype(np.float32), type_k)
        values = to_rows(rng.standard_normal((block, c.n_kv_heads, c.head_dim)).astype(np.float32), type_v)
        for layer in range(c.n_layers):
            for lo in range(0, depth, block):
                n = min(block, depth - lo)
                cache.k[layer, :, lo:lo + n] = keys[:n].transpose(1, 0, 2)
                cache.v[layer, :, lo:lo + n] = values[:n].transpose(1, 0, 2)
        cache.slot_seq[:depth] = np.arange(depth)
        cache.n_held = cache.n_seen = depth
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf (default: the default model)")
    ap.add_argument("--depth", type=int, default=16384)
    ap.add_argument("-ctk", "--cache-type-k", default="q8_0")
    ap.add_argument("-ctv", "--cache-type-v", default="q8_0")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    model = Qwen2Model.load(resolve_model(args.model))
    tk, tv = cache_type(args.cache_type_k), cache_type(args.cache_type_v)
    caches = [deep_cache(model, 0, tk, tv), deep_cache(model, args.depth, tk, tv)]
    for cache in caches:  # compile and warm up
        model.forward([100], cache)
    times: list[list[float]] = [[], []]
    for _ in range(args.steps):
        for side, cache in enumerate(caches):
            t0 = time.perf_counter()
            model.forward([100], cache)
            times[side].append(time.perf_counter() - t0)
            cache.truncate(cache.n_seen - 1)
    empty, deep = (float(np.median(t)) * 1e3 for t in times)
    print(f"{model.file.path.name}, -ctk {args.cache_type_k} -ctv {args.cache_type_v}: depth 0 {empty:.2f} ms/token "
          f"({1e3 / empty:.2f} tok/s), depth {args.depth} {deep:.2f} ms/token ({1e3 / deep:.2f} tok/s): "
          f"{empty / deep:.1%} of depth 0's speed")


if __name__ == "__main__":
    main()
