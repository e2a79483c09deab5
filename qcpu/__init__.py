"""qcpu: run GGUF-quantized Qwen2-family chat models on laptop CPUs with NumPy + Numba."""

__version__ = "0.1.0"

import os as _os

# Thread-pool settings this process chose (names the user had not set). Child processes that run other
# programs (llama.cpp in `qcpu bench --compare-llama-cpp`) get the environment without them, so they run
# as their users would run them.
ENV_DEFAULTS: dict[str, str] = {}


def _default(name: str, value: str) -> None:
    if name not in _os.environ:
        _os.environ[name] = ENV_DEFAULTS[name] = value


# Numba's parallel kernels run on TBB where the `tbb` wheel exists (x86-64: a dependency there; Numba
# prefers it). Its idle workers spin yielding the core, then sleep, so a decode step's ~110 regions rarely
# wait for a wake-up, and a busy machine loses little. Default model, 2 threads, AMD EPYC VM, OpenMP (the
# settings below) / TBB, both in turn: qcpu bench tg64 idle 41.2 / 47.0 tok/s, one core busy 17.9-19.5 /
# 28.7-29.9, both busy 15.1-16.6 / 16.0-17.5; a 4-row batched decode step (a server's, tools/batch_decode.py)
# idle 46-50 / 38-45 ms (32.7 / 31.5 in a faster phase of the machine), one core busy 81-87 / 63-66 ms.
#
# Elsewhere (ARM) they run on OpenMP. GNU OpenMP's default is to spin-wait between parallel regions;
# a decode step has ~170 of them, and the moment anything else wants the CPU (a browser, a build) a
# spinning thread is preempted and every region waits a scheduler tick: measured 0.6 tok/s instead of
# 20 on the default model with a loaded 2-core machine. Sleeping waits cost microseconds instead.
_default("OMP_WAIT_POLICY", "passive")
# ...after a short spin: on these VMs waking a sleeping thread costs ~80 us, and a decode step starts ~200
# parallel regions. Decode, default model, 2 threads, tok/s with the machine idle / one core busy / both
# busy: sleeping at once 20.5 / 22.4 / 12.1; 1000 spins 27.5-32.2 / 17.4 / 12.2; 2000 spins 31.9-38.0 /
# 13.7-14.2 / 12.9; 20000 spins 36.0 / 5.1 / 3.1 (llama.cpp b11434, spinning: 38.8 / 15.6 / 14.6). 2000 is
# llama.cpp's profile; GOMP_SPINCOUNT=0 sleeps at once (best beside another busy program).
_default("GOMP_SPINCOUNT", "2000")
# OpenBLAS (under NumPy's matmuls: prefill attention) also spins after each call, by default for 2**28
# cycles, on the cores the next Numba kernel needs: the prefill GEMMs ran at half speed beside it
# (default model, pp512: 126 -> 185 tok/s with the minimum, 2**4). OpenBLAS reads this when NumPy loads
# it, so it applies when qcpu is imported first (the CLI; a script that imported NumPy before keeps its own).
_default("OPENBLAS_THREAD_TIMEOUT", "4")
