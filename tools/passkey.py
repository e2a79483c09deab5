"""Passkey retrieval over long contexts, qcpu and llama.cpp side by side on the same prompt tokens.

    python tools/passkey.py [--model M.gguf] [--lengths 4096 16384 30000] [--depths 0.1 0.5 0.9]
                            [--ctx 32768] [-ctk f16] [-ctv f16] [--llama-cpp] [--threads 2] [--json]

For each length and depth: the chat prompt (tests/passkey.py) is rendered and tokenized once by qcpu,
qcpu answers greedily (16 tokens at most), then llama.cpp (llama-cpp-python, flash attention on, the
same cache types) evaluates the very same tokens and answers greedily. Prints whether each found the
key, the prompt processing time of each, and qcpu's peak resident memory (sampled every 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.passkey import found, passkey_messages  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "passkey.json"


class PeakRSS:
    """Resident memory of this process, sampled every `every` seconds in a thread: the peak, in MB."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_qcpu(engine, prompt, max_tokens=16):
    from qcpu.sampling import SamplingParams

    engine.reset()
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    t = time.perf_counter()
    out, first = [], None
    for token in engine.generate_tokens(prompt, greedy, max_tokens):
        if first is None:
            first = time.perf_counter() - t
        out.append(token)
    return engine.tokenizer.decode(out), first if first is not None else time.perf_counter() - t


def run_llama(llm, prompt, eot, max_tokens=16):
    import numpy as np

    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    first = time.perf_counter() - t
    out = []
    for _ in range(max_tokens):
        import llama_cpp

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        if token in eot:
            break
        out.append(token)
        llm.eval([token])
    return llm.detokenize(out).decode("utf-8", "replace"), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache/qcpu/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 30000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("-ctk", "--cache-type-k", default="f16")
    ap.add_argument("-ctv", "--cache-type-v", default="f16")
    ap.add_argument("--llama-cpp", action="store_true", help="also run llama-cpp-python on the same tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--key", type=int, default=68240)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", action="store_true",
                    help=f"write llama.cpp's answers to {GOLDEN.relative_to(ROOT)} for tests/test_passkey.py "
                         "(with --llama-cpp)")
    args = ap.parse_args()

    import numba

    from qcpu.generate import Engine

    numba.set_num_threads(args.threads)
    rows = []
    with PeakRSS() as rss:
        engine = Engine.load(args.model, ctx=args.ctx, cache_type_k=args.cache_type_k,
                             cache_type_v=args.cache_type_v)
        prompts = {}
        for n in args.lengths:
            for depth in args.depths:
                prompt = engine.tokenizer.encode(engine.template.render(
                    passkey_messages(engine.tokenizer, n, depth, args.key), add_generation_prompt=True))
                prompts[n, depth] = prompt
                reply, seconds = run_qcpu(engine, prompt)
                rows.append({"length": len(prompt), "depth": depth, "qcpu": reply.strip(),
                             "qcpu_found": found(reply, args.key), "qcpu_prompt_s": round(seconds, 1),
                             "qcpu_peak_rss_mb": round(rss.peak)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        file_mb = Path(args.model).stat().st_size / 2**20
        kv_mb = engine._cache.nbytes / 2**20  # noqa: SLF001 (a tool: reports what the engine allocated)
    if args.llama_cpp:
        import llama_cpp

        types = {"f16": 1, "q8_0": 8, "q4_0": 2}
        llm = llama_cpp.Llama(args.model, n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
                              n_batch=512, flash_attn=True, type_k=types[args.cache_type_k],
                              type_v=types[args.cache_type_v], logits_all=False, verbose=False)
        eot = set(engine.tokenizer.eot_ids)
        for row, prompt in zip(rows, prompts.values()):
            reply, seconds = run_llama(llm, prompt, eot)
            row.update({"llama": reply.strip(), "llama_found": found(reply, args.key),
                        "llama_prompt_s": round(seconds, 1)})
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.record:
        GOLDEN.write_text(json.dumps({"source": f"llama-cpp-python {llama_cpp.__version__}, greedy, flash attention on",
                                      "key": args.key, "ctx": args.ctx, "cases": [
            {"n_tokens": n, "depth": d, "prompt_tokens": r["length"], "llama": r["llama"],
             "llama_found": r["llama_found"]} for (n, d), r in zip(prompts, rows)]}, indent=1) + "\n")
    summary = {"model_mb": round(file_mb), "kv_mb": round(kv_mb), "peak_rss_mb": round(rss.peak),
               "rss_minus_file_minus_kv_mb": round(rss.peak - file_mb - kv_mb), "rows": rows}
    if args.json:
        print(json.dumps(summary))
    else:
        for r in rows:
            line = f"{r['length']:>6} tokens, depth {r['depth']:.0%}: qcpu {'found' if r['qcpu_found'] else 'MISSED'} " \
                   f"({r['qcpu_prompt_s']} s)"
            if "llama_found" in r:
                line += f", llama.cpp {'found' if r['llama_found'] else 'MISSED'} ({r['llama_prompt_s']} s)"
            print(line)
        print(f"peak RSS {summary['peak_rss_mb']} MB = file {summary['model_mb']} + KV {summary['kv_mb']} + "
              f"{summary['rss_minus_file_minus_kv_mb']} MB")


if __name__ == "__main__":
    main()
