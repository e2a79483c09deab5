"""`qcpu bench`: prompt processing (pp) and text generation (tg) speed, llama-bench's way.

pp: a prompt of `n_prompt` random tokens prefilled after `depth` tokens already in the cache, tokens/s.
tg: `n_gen` tokens decoded one at a time after `depth` tokens (or a one-token prompt), tokens/s.
depth: llama-bench's -d; the cache is filled once and rewound to `depth` before each run.
ttft: launch to first streamed token of `qcpu generate`, in a fresh process (warm Numba cache).
rss: resident memory of this process after the runs (the model is mapped, so its pages count once read).
With `compare_llama_cpp`, llama.cpp runs the same file, threads, sizes, depth and cache types in a child
process of the same run, with flash attention off and on, so the ratios (against the faster of the two)
compare like with like on a noisy shared machine: a current `llama-bench` when tools/build_llama_cpp.py has
built one (the newest llama.cpp on PyPI), else llama-cpp-python (the `[llama]` extra).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qcpu.errors import QcpuError


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bench_qcpu(path: Path, n_prompt: int, n_gen: int, repeats: int, threads: int, depth: int = 0,
               cache_types: tuple[str, str] = ("f16", "f16")) -> dict:
    """Median pp and tg tokens/s of `repeats` runs after `depth` tokens (see the module docstring), plus
    memory; cache_types: -ctk/-ctv names. Raises QcpuError when depth + n_prompt + n_gen exceeds the
    trained context."""
    from qcpu.cache import cache_type
    from qcpu.model import Qwen2Model

    model = Qwen2Model.load(path)
    trained = model.config.context_length
    if depth + n_prompt + n_gen > trained:  # beyond it the numbers mean nothing, and huge sizes exhaust memory
        raise QcpuError(f"--depth {depth} + --n-prompt {n_prompt} + --n-gen {n_gen} is more than the {trained} "
                        f"tokens of context {Path(path).name} was trained for")
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    kv_types = {"type_k": cache_type(cache_types[0]), "type_v": cache_type(cache_types[1])}
    cache = model.new_cache(depth + n_prompt + n_gen + 8, **kv_types)
    # Warm-up, in a cache of its own: compile or load every kernel the runs take (64 tokens reach the
    # batched GEMMs; 8 did not, so a first bench after an install or an edit timed their compilation as
    # pp), touch the weights' pages.
    warm = model.new_cache(72, **kv_types)
    model.forward(rng.integers(0, vocab, 64), warm)
    model.forward([1], warm)
    del warm
    context = rng.integers(0, vocab, max(depth, 1))
    for at in range(0, depth, 512):
        model.forward(context[at:at + 512], cache)
    base = max(depth, 1)
    pp, tg = [], []
    for _ in range(repeats):
        cache.truncate(depth)
        tokens = rng.integers(0, vocab, n_prompt)
        t = time.perf_counter()
        model.forward(tokens, cache)
        pp.append(n_prompt / (time.perf_counter() - t))
        cache.truncate(depth)
        if depth == 0:
            model.forward(context[:1], cache)
        token = int(tokens[0])
        t = time.perf_counter()
        for _ in range(n_gen):
            model.forward([token], cache)  # llama-bench's tg: one token fed n_gen times
        tg.append(n_gen / (time.perf_counter() - t))
        cache.truncate(base)
    weights_bytes = sum(info.nbytes for name, info in model.file.tensors.items() if name != "token_embd.weight")
    return {"pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg), "rss_mb": _rss_mb(),
            "weights_read_per_token_mb": weights_bytes / 2**20, "kv_cache_mb": cache.nbytes / 2**20,
            "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "depth": depth, "repeats": repeats,
            "cache_types": list(cache_types), "threading_layer": _threading_layer()}


def _threading_layer() -> str:
    """The pool Numba's kernels ran on ('tbb', 'omp', 'workqueue'): it changes decode speed, and each
    platform gets what its wheels allow."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "none"


def time_to_first_token(path: Path, threads: int) -> float:
    """Wall time from launching `qcpu generate` to its first byte on stdout."""
    cmd = [sys.executable, "-m", "qcpu.cli", "generate", str(path), "Say hi.", "--temp", "0", "-n", "2",
           "--threads", str(threads)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    first = time.perf_counter() - t
    proc.communicate()
    return first


_LLAMA_CHILD = r"""
import json, statistics, sys, time, numpy as np, llama_cpp, psutil
path, n_prompt, n_gen, repeats, threads, depth, flash, type_k, type_v = sys.argv[1], *map(int, sys.argv[2:10])
llm = llama_cpp.Llama(path, n_ctx=depth + n_prompt + n_gen + 8, n_threads=threads, n_threads_batch=threads,
                      n_batch=512, n_ubatch=512, flash_attn=bool(flash), type_k=type_k, type_v=type_v,
                      verbose=False)
rng = np.random.default_rng(0)
vocab = llm.n_vocab()
llm.eval(rng.integers(0, vocab, 8).tolist())
llm.reset()
context = rng.integers(0, vocab, max(depth, 1)).tolist()
if depth:
    llm.eval(context)
pp, tg = [], []
for _ in range(repeats):
    tokens = rng.integers(0, vocab, n_prompt).tolist()
    llm.n_tokens = depth  # eval() drops the cache after n_tokens
    t = time.perf_counter(); llm.eval(tokens); pp.append(n_prompt / (time.perf_counter() - t))
    llm.n_tokens = depth
    if not depth:
        llm.eval(context[:1])
    t = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tokens[0]])  # llama-bench's tg: the same token fed n_gen times, no sampling
    tg.append(n_gen / (time.perf_counter() - t))
print(json.dumps({"pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg),
                  "rss_mb": psutil.Process().memory_info().rss / 2**20, "flash_attn": bool(flash)}))
"""


def foreign_env() -> dict[str, str]:
    """This process's environment without the thread-pool settings qcpu made for itself (qcpu.ENV_DEFAULTS):
    llama.cpp is measured as its users run it. (They shape OpenMP, which llama.cpp also uses: inherited,
    qcpu's sleeping waits once halved llama.cpp's decode speed in these comparisons.)"""
    import qcpu

    return {k: v for k, v in os.environ.items() if qcpu.ENV_DEFAULTS.get(k) != v}


def bench_llama_cpp(path: Path, n_prompt: int, n_gen: int, repeats: int, threads: int, depth: int = 0,
                    flash_attn: bool = False, cache_types: tuple[str, str] = ("f16", "f16")) -> dict:
    """llama-cpp-python's pp/tg tokens/s (median of `repeats`) and RSS on the same sizes, in a child
    process. Raises QcpuError when llama-cpp-python is missing or fails."""
    from qcpu.cache import cache_type

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise QcpuError("--compare-llama-cpp needs llama-cpp-python: pip install -e '.[llama]'") from None
    proc = subprocess.run([sys.executable, "-c", _LLAMA_CHILD, str(path), str(n_prompt), str(n_gen),
                           str(repeats), str(threads), str(depth), str(int(flash_attn)),
                           *(str(int(cache_type(t))) for t in cache_types)], capture_output=True,
                          text=True, env={**foreign_env(), "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise QcpuError(f"llama-cpp-python benchmark failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_bench_binary() -> Path | None:
    """The newest llama-bench that tools/build_llama_cpp.py built into the cache folder, if any."""
    from qcpu.models import cache_dir

    found = sorted((cache_dir() / "llama.cpp").glob("*/bin/llama-bench"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.parent.name.split("-")[0].split(".")])
    return found[-1] if found else None


def run_llama_bench(binary: Path, path: Path, n_prompt: int, n_gen: int, repeats: int, threads: int, depth: int,
                    flash_attn: bool, cache_types: tuple[str, str]) -> dict:
    """pp and tg tokens/s (llama-bench's avg_ts) from `binary` on the same sizes. Raises QcpuError if it fails."""
    cmd = [str(binary), "-m", str(path), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen), "-d", str(depth),
           "-r", str(repeats), "-fa", "1" if flash_attn else "0", "-ctk", cache_types[0], "-ctv", cache_types[1],
           "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=foreign_env())
    if proc.returncode != 0:
        raise QcpuError(f"llama-bench failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    rows = json.loads(proc.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"pp_tps": pp, "tg_tps": tg, "rss_mb": float("nan"), "flash_attn": flash_attn,
            "build": f"llama-bench {rows[0].get('build_number', '?')}"}


def best_of_llama_cpp(path: Path, n_prompt: int, n_gen: int, repeats: int, threads: int, depth: int = 0,
                      cache_types: tuple[str, str] = ("f16", "f16")) -> dict:
    """llama.cpp with flash attention off and on: {"fa0": ..., "fa1": ..., "best": {pp_tps, tg_tps}}, the
    best of each measure being what the ratios are taken against. A quantized V cache needs flash
    attention in llama.cpp, so only fa1 runs then."""
    modes = (True,) if cache_types[1] != "f16" else (False, True)
    binary = llama_bench_binary()
    if binary is not None:
        runs = {f"fa{int(fa)}": run_llama_bench(binary, path, n_prompt, n_gen, repeats, threads, depth, fa, cache_types)
                for fa in modes}
    else:
        runs = {f"fa{int(fa)}": bench_llama_cpp(path, n_prompt, n_gen, repeats, threads, depth, fa, cache_types)
                for fa in modes}
    best = {key: max(r[key] for r in runs.values()) for key in ("pp_tps", "tg_tps")}
    best["rss_mb"] = min(r["rss_mb"] for r in runs.values())
    return {**runs, "best": best}


def bench_speculative(path: Path, options, n_gen: int, sets: tuple[str, ...] = ("chat", "edit"),
                      ctx: int | None = None, progress=None) -> dict:
    """Decode tokens/s with and without speculative decoding (`options`: speculative.SpecOptions) on the
    fixed prompts of bench_prompts (greedy, Qwen's repeat penalty, `n_gen` tokens at most per reply). For
    each prompt the modes run back to back (plain first), so the machine's drift hits them alike; the
    generated seconds exclude the prompt (and the draft model reading it). Lookup is measured as users get
    it (on by measured acceptance) and always on. Per set: tokens, seconds, tok/s per mode, the ratios to
    plain, accepted tokens per checking pass, and whether every reply equals plain decoding's (it must).
    `progress(text)` is called before each reply; ctx None: the engine's default. Prompts that do not fit
    the context with n_gen tokens after them are skipped (counted). Raises QcpuError for a bad model or
    draft."""
    from dataclasses import replace

    from qcpu.bench_prompts import SETS
    from qcpu.generate import Engine, Stats
    from qcpu.sampling import SamplingParams
    from qcpu.speculative import attach

    engine = Engine.load(path, ctx=ctx)
    modes = {"plain": None}
    if options.draft is not None:
        modes["draft"] = options
    else:
        modes["lookup"] = replace(options, lookup=None)
        modes["lookup always"] = replace(options, lookup=True)
    speculators = {}
    for name, opts in modes.items():  # one speculator per mode for the whole run: it learns as in a chat
        speculators[name] = attach(engine, opts) if opts is not None else None
    params = SamplingParams(temperature=0.0, seed=0)
    warm = engine.chat_prompt_tokens([{"role": "user", "content": "Say hi twice: hi hi hi hi"}])
    for name in modes:  # compile every path before timing
        engine.reset()
        engine.speculator = speculators[name]
        list(engine.generate_tokens(warm, params, 12))
    out: dict = {"model": Path(path).name, "n_gen": n_gen, "draft": options.draft, "sets": {}}
    for set_name in sets:
        totals = {name: Stats() for name in modes}
        same, skipped = True, 0
        for i, text in enumerate(SETS[set_name]):
            engine.reset()
            if len(engine.chat_prompt_tokens([{"role": "user", "content": text}])) + n_gen > engine.capacity:
                skipped += 1
                continue
            replies = {}
            for name in modes:
                if progress:
                    progress(f"{set_name} {i + 1}/{len(SETS[set_name])}: {name}")
                engine.reset()
                engine.speculator = speculators[name]
                prompt = engine.chat_prompt_tokens([{"role": "user", "content": text}])
                s = Stats()
                replies[name] = list(engine.generate_tokens(prompt, params, n_gen, s))
                t = totals[name]
                t.generated_tokens += s.generated_tokens
                t.generate_seconds += s.generate_seconds
                t.draft_passes += s.draft_passes
                t.drafted_tokens += s.drafted_tokens
                t.accepted_tokens += s.accepted_tokens
            same &= all(r == replies["plain"] for r in replies.values())
        plain_tps = totals["plain"].generate_tps
        out["sets"][set_name] = {
            "prompts": len(SETS[set_name]) - skipped, "skipped": skipped, "identical": same,
            "modes": {name: {"tokens": t.generated_tokens, "seconds": t.generate_seconds, "tok_s": t.generate_tps,
                             "ratio": t.generate_tps / plain_tps if plain_tps else float("nan"),
                             "drafted": t.drafted_tokens, "accepted": t.accepted_tokens,
                             "accepted_per_pass": t.accepted_per_pass}
                      for name, t in totals.items()}}
    engine.speculator = None
    return out
