"""Numba's on-disk cache of this package's kernels, stamped with every module that holds Numba code.

Numba stamps a cached function with the mtime and size of its own source file only. Our kernels inline
intrinsics and jitted functions from other modules: a family's GEMM (k_quants.py, legacy.py) inlines
gemm.py's micro-kernel, attention.py inlines legacy.py's dequantization. Editing gemm.py alone therefore
left the cached K-quant GEMM running the old micro-kernel, with no sign of it (found by an A/B that
measured two "versions" at the same speed). Installed files change together, so users were safe; anyone
editing a checkout was not.

Importing this module puts a locator in front of Numba's own for the files of the `qcpu` and `quant`
packages: the same cache files in the same place, stamped with (path, mtime, size) of every module of
those packages that imports Numba or llvmlite, so any edit to kernel code recompiles what may have inlined
it. Other code (and everything, on a Numba without this internal hook) keeps Numba's behaviour.

A module of its own, outside kernels/: everything that defines cached kernels imports it first (the
kernel registry, rope.py, sampling.py; quant/ through the registry), and it imports nothing of ours.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from numba.core import caching

_IMPORTS_JIT = re.compile(rb"^(from|import) (numba|llvmlite)\b", re.MULTILINE)
_ROOTS = tuple(str(p) for p in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "quant"))


def _ours(py_file: str) -> bool:
    path = os.path.realpath(py_file)
    return any(path.startswith(root + os.sep) for root in _ROOTS)


@functools.cache
def package_stamp() -> tuple[tuple[str, int, int], ...]:
    """(relative path, mtime in ns, size in bytes) of every .py file of qcpu/ and quant/ that imports numba
    or llvmlite, sorted (17 of ~50 files here; read once per process, ~5 ms)."""
    stamp = []
    for root in _ROOTS:
        for path in sorted(Path(root).rglob("*.py")):
            data = path.read_bytes()
            if _IMPORTS_JIT.search(data):
                st = path.stat()
                stamp.append((str(path.relative_to(Path(root).parent)), st.st_mtime_ns, st.st_size))
    return tuple(stamp)


class _PackageStamped:
    """Mixin over a Numba locator: ours only for the package's files; their stamp includes package_stamp()."""

    @classmethod
    def from_function(cls, py_func, py_file):
        return super().from_function(py_func, py_file) if _ours(py_file) else None

    def get_source_stamp(self):
        return (super().get_source_stamp(), package_stamp())


def _install() -> bool:
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    bases = [getattr(caching, n, None) for n in ("UserProvidedCacheLocator", "InTreeCacheLocator")]
    if impl is None or not isinstance(getattr(impl, "_locator_classes", None), list) or None in bases:
        return False
    if any(issubclass(c, _PackageStamped) for c in impl._locator_classes):
        return True
    # NUMBA_CACHE_DIR's locator first, as in Numba's own list.
    ours = [type(f"PackageStamped{b.__name__}", (_PackageStamped, b), {}) for b in bases]
    impl._locator_classes[:0] = ours
    return True


INSTALLED = _install()
