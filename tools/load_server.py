"""Load on a running `qcpu serve` (or any OpenAI-compatible server): N concurrent streaming chat clients
for a fixed time; aggregate generated tokens/s, time to first token p50/p95, errors (issue 13).

    qcpu serve -np 4 &
    python tools/load_server.py [--base-url http://127.0.0.1:8080/v1] [--clients 1,2,4,8] [--seconds 30]

Each client is a thread with the official `openai` client, sending one request after another (a short
chat question, a different one per client and turn, `max_tokens` 64, streamed with usage), as a chat UI
would. Generated tokens are counted from each response's usage.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
from openai import OpenAI

QUESTIONS = ["What is a Python list comprehension?", "Explain recursion in two sentences.",
             "Write a haiku about compilers.", "What does HTTP 404 mean?", "Name three sorting algorithms.",
             "What is a mutex?", "Explain Big-O notation briefly.", "What is a closure in JavaScript?"]


def run(base_url: str, api_key: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    tokens, ttfts, errors = [], [], []
    lock = threading.Lock()
    stop_at = time.time() + seconds

    def client(i: int) -> None:
        c = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
        turn = 0
        while time.time() < stop_at:
            question = QUESTIONS[(i + turn) % len(QUESTIONS)]
            turn += 1
            t0 = time.time()
            first, used = None, 0
            try:
                for chunk in c.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": f"{question} (client {i}, turn {turn})"}],
                        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.time() - t0
                    if chunk.usage:
                        used = chunk.usage.completion_tokens
            except Exception as e:  # counted, and the load goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                if time.time() <= stop_at + 60:  # a reply finished after the window still counts
                    tokens.append(used)
                    if first is not None:
                        ttfts.append(first)

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    return {"clients": clients, "seconds": elapsed, "requests": len(tokens), "tokens": sum(tokens),
            "tok_s": sum(tokens) / elapsed,
            "ttft_p50": float(np.percentile(ttfts, 50)) if ttfts else float("nan"),
            "ttft_p95": float(np.percentile(ttfts, 95)) if ttfts else float("nan"),
            "errors": len(errors), "first_error": errors[0] if errors else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = OpenAI(base_url=args.base_url, api_key=args.api_key).models.list().data[0].id
    print(f"{model} at {args.base_url}, {args.seconds:g} s per row, max_tokens {args.max_tokens}")
    print("clients | requests | generated tok/s | TTFT p50 s | TTFT p95 s | errors")
    for n in (int(x) for x in args.clients.split(",")):
        r = run(args.base_url, args.api_key, model, n, args.seconds, args.max_tokens)
        print(f"{r['clients']:7d} | {r['requests']:8d} | {r['tok_s']:15.2f} | {r['ttft_p50']:10.2f} | "
              f"{r['ttft_p95']:10.2f} | {r['errors']}{' (' + r['first_error'] + ')' if r['errors'] else ''}")


if __name__ == "__main__":
    main()
