"""`qcpu bench`: prompt processing (pp) and text generation (tg) speed, llama-bench's way.

pp: a prompt of `n_prompt` random tokens prefilled into an empty cache, tokens/s.
tg: `n_gen` tokens decoded one at a time after a one-token prompt, tokens/s.
ttft: launch to first streamed token of `qcpu generate`, in a fresh process (warm Numba cache).
rss: resident memory of this process after the runs (the model is mapped, so its pages count once read).
With `compare_llama_cpp`, llama-cpp-python runs the same file, threads and sizes in a child process of the
same run, so the ratios compare like with like on a noisy shared machine.
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


def bench_qcpu(path: Path, n_prompt: int, n_gen: int, repeats: int, threads: int) -> dict:
    from qcpu.model import Qwen2Model

    model = Qwen2Model.load(path)
    trained = model.config.context_length
    if n_prompt + n_gen > trained:  # beyond it the numbers mean nothing, and a huge -p would exhaust memory
        raise QcpuError(f"--n-prompt {n_prompt} + --n-gen {n_gen} is more than the {trained} tokens of context "
                        f"{Path(path).name} was trained for")
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    cache = model.new_cache(n_prompt + n_gen + 8)
    model.forward(rng.integers(0, vocab, 8), cache)  # warm-up: compile/load kernels, touch pages
    model.forward([1], cache)
    pp, tg = [], []
    for _ in range(repeats):
        cache.reset()
        tokens = rng.integers(0, vocab, n_prompt)
        t = time.perf_counter()
        model.forward(tokens, cache)
        pp.append(n_prompt / (time.perf_counter() - t))
        cache.reset()
        model.forward([int(tokens[0])], cache)
        token = int(tokens[1 if n_prompt > 1 else 0])
        t = time.perf_counter()
        for _ in range(n_gen):
            model.forward([token], cache)  # llama-bench's tg: one token fed n_gen times
        tg.append(n_gen / (time.perf_counter() - t))
    weights_bytes = sum(info.nbytes for name, info in model.file.tensors.items() if name != "token_embd.weight")
    return {"pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg), "rss_mb": _rss_mb(),
            "weights_read_per_token_mb": weights_bytes / 2**20, "kv_cache_mb": cache.nbytes / 2**20,
            "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats}


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
path, n_prompt, n_gen, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
llm = llama_cpp.Llama(path, n_ctx=n_prompt + n_gen + 8, n_threads=threads, n_threads_batch=threads,
                      n_batch=n_prompt, n_ubatch=n_prompt, verbose=False)
rng = np.random.default_rng(0)
vocab = llm.n_vocab()
llm.eval(rng.integers(0, vocab, 8).tolist())
pp, tg = [], []
for _ in range(repeats):
    tokens = rng.integers(0, vocab, n_prompt).tolist()
    llm.reset()  # eval() then drops the cache from position 0
    t = time.perf_counter(); llm.eval(tokens); pp.append(n_prompt / (time.perf_counter() - t))
    llm.reset()
    llm.eval(tokens[:1])
    t = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tokens[1]])  # llama-bench's tg: the same token fed n_gen times, no sampling
    tg.append(n_gen / (time.perf_counter() - t))
print(json.dumps({"pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg),
                  "rss_mb": psutil.Process().memory_info().rss / 2**20}))
"""


def bench_llama_cpp(path: Path, n_prompt: int, n_gen: int, repeats: int, threads: int) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise QcpuError("--compare-llama-cpp needs llama-cpp-python: pip install -e '.[llama]'") from None
    proc = subprocess.run([sys.executable, "-c", _LLAMA_CHILD, str(path), str(n_prompt), str(n_gen),
                           str(repeats), str(threads)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise QcpuError(f"llama-cpp-python benchmark failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
