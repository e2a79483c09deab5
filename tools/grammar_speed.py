"""Decode speed with a grammar constraint against without it, same prompt, in one process (issue 14).

    python tools/grammar_speed.py [MODEL] [--tokens 200] [--rounds 3]

Alternates a constrained and a free greedy run of the same length (the free run is given the
constrained run's token count, and EOS is ignored there) so that drift hits both alike; prints tok/s of
each and the ratio. The constraint is a JSON schema with an array of objects, long enough to fill the
token budget.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from qcpu.generate import Engine
from qcpu.grammar import Grammar
from qcpu.models import resolve_model
from qcpu.sampling import SamplingParams, make_sampler

SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "minItems": 30, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                     "city": {"type": "string", "maxLength": 40}},
    "required": ["name", "age", "city"], "additionalProperties": False}}}, "required": ["people"]}


def run(engine: Engine, prompt: list[int], params: SamplingParams, n: int) -> tuple[int, float]:
    """Greedy decode of n tokens after prompt; (tokens, seconds of the decode loop)."""
    engine.reset()
    sampler = make_sampler(params, tokenizer=engine.tokenizer)
    logits = engine.feed(prompt)
    t0 = time.perf_counter()
    done = 0
    for _ in range(n):
        token = sampler(logits, ())
        if params.grammar is not None and token in engine.tokenizer.eot_ids:
            break
        logits = engine.feed([token])
        done += 1
    return done, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    engine = Engine.load(resolve_model(args.model))
    prompt = engine.tokenizer.encode(engine.template.render(
        [{"role": "user", "content": "List thirty people with their name, age and city as JSON."}], add_generation_prompt=True))
    free = SamplingParams(temperature=0.0, repeat_penalty=1.0)
    bound = replace(free, grammar=Grammar.json_schema(SCHEMA))
    make_sampler(bound, tokenizer=engine.tokenizer)  # the vocabulary table, built once
    rates = {"free": [], "schema": []}
    for _ in range(args.rounds):
        n, s = run(engine, prompt, bound, args.tokens)
        rates["schema"].append(n / s)
        n2, s2 = run(engine, prompt, free, n)
        rates["free"].append(n2 / s2)
    f, g = statistics.median(rates["free"]), statistics.median(rates["schema"])
    print(f"{n} tokens: free {f:.2f} tok/s, with the JSON schema {g:.2f} tok/s ({g / f:.3f}x)")


if __name__ == "__main__":
    main()
