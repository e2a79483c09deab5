"""The one CPU-feature probe every kernel family asks: which instructions the emitted code may use.

Features are those Numba compiles for: the host's, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name another
target (a cache shared between machines, or the tests forcing the portable paths with
NUMBA_CPU_NAME=generic). Numba's cache is keyed on the CPU, so cached code never meets a CPU without
what it was built for. AMX is never used: these VMs list amx_tile yet fault on its instructions.
"""

from __future__ import annotations

import llvmlite.binding as llb
import numba


def cpu_features() -> set[str]:
    """LLVM feature names ("avx2", "f16c", "fma", ...) the kernels are compiled for."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        flags = numba.config.CPU_FEATURES or ""
    else:
        flags = llb.get_host_cpu_features().flatten()
    return {f[1:] for f in flags.split(",") if f.startswith("+")}


_FEATURES = cpu_features()

# F16C: x86's half<->float conversions. Without it LLVM would lower a half conversion to a runtime-library
# call Numba does not provide, so IR that converts halves needs it (else: integer bit arithmetic).
F16C = "f16c" in _FEATURES
# AVX2: the 256-bit integer instructions llama.cpp's x86 kernels use (pmaddubsw, pmaddwd).
X86_AVX2 = "avx2" in _FEATURES
