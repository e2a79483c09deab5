"""Soak test: a scripted conversation of many times the context length through `qcpu chat`'s machinery
(Chat + Engine + the ring KV cache), greedy, short replies, resident memory sampled every turn.

    python tools/soak_chat.py [--model PATH] [--ctx 256] [--factor 10] [--max-tokens 8]

Prints one row per turn (turn, tokens seen, cache length, RSS MB) and a verdict: memory is flat after
warm-up when the max RSS of the second half of the turns minus the max RSS of the first half is below
--limit-mb (20). Exit code 0 when flat, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import psutil

from qcpu.generate import Engine
from qcpu.conversation import Chat
from qcpu.sampling import SamplingParams

TOPICS = ["sorting a list", "reading a file", "a binary search", "parsing JSON", "a linked list", "regular expressions",
          "a hash map", "recursion", "string formatting", "unit tests", "list comprehensions", "exceptions"]


def message(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    # ~60 tokens each: enough that a few turns fill a small context.
    return (f"Turn {i}. In one short sentence, tell me something about {topic} in Python. "
            f"Context for you: I am writing a small program, step {i}, and I want to keep it simple, "
            f"readable and fast; no long answer please, a few words are enough.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF model (default: the default model)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--factor", type=float, default=10.0, help="tokens to push through, in context lengths")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--limit-mb", type=float, default=20.0)
    args = ap.parse_args()

    if args.model is None:
        from qcpu.models import default_model_path

        args.model = default_model_path()
    proc = psutil.Process()
    rss = lambda: proc.memory_info().rss / 2**20  # noqa: E731

    t0 = time.perf_counter()
    rss_start = rss()
    chat = Chat(Engine.load(args.model, ctx=args.ctx), SamplingParams(temperature=0.0), args.max_tokens)
    chat.refill()
    rss_loaded = rss()
    target = int(args.factor * chat.capacity)
    print(f"model {args.model.name}, ctx {chat.capacity}, target {target} tokens "
          f"({args.factor:g}x), max_tokens {args.max_tokens}; RSS {rss_start:.1f} MB before load, "
          f"{rss_loaded:.1f} MB loaded", flush=True)
    print(f"{'turn':>5} {'seen':>7} {'cache':>6} {'msgs':>5} {'reply':>6} {'RSS MB':>8} {'s':>6}", flush=True)

    rows = []
    turn = 0
    while chat.engine.n_seen < target:
        t = time.perf_counter()
        reply = chat.send(message(turn))
        for _ in reply:
            pass
        reply.finish()
        notice = chat.eviction_notice(reply)
        gc.collect()
        eng = chat.engine
        row = (turn, eng.n_seen, eng.n_held, len(chat.messages), reply.stats.generated_tokens, rss())
        rows.append(row)
        print(f"{row[0]:>5} {row[1]:>7} {row[2]:>6} {row[3]:>5} {row[4]:>6} {row[5]:>8.1f} "
              f"{time.perf_counter() - t:>6.1f}" + (f"  {notice}" if notice else ""), flush=True)
        turn += 1

    half = len(rows) // 2
    first = max(r[5] for r in rows[:half]) if half else rows[0][5]
    second = max(r[5] for r in rows[half:])
    growth = second - first
    flat = growth < args.limit_mb
    eng = chat.engine
    print(f"\n{turn} turns, {eng.n_seen} tokens seen ({eng.n_seen / eng.capacity:.1f}x the context of "
          f"{eng.capacity}), {eng.n_evicted} evicted, {len(chat.messages)} messages kept, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"RSS: loaded {rss_loaded:.1f} MB; max first half {first:.1f} MB, max second half {second:.1f} MB, "
          f"growth {growth:+.1f} MB (limit {args.limit_mb:g})")
    print(f"verdict: {'FLAT' if flat else 'GROWING'}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
