"""Our quantizer against llama.cpp's on the same input: wall time, peak memory, per-tensor byte equality.

    /work/venv/bin/python tools/compare_quantize.py IN.gguf TYPE [TYPE ...] [--outdir DIR] [--threads N]
                                                    [--only ours|llama] [--keep]

For each TYPE both quantizers run in a child process (so each one's peak resident memory is its own,
from wait4's rusage): ours is `qcpu quantize IN OUT TYPE`, llama.cpp's is llama-cpp-python's
`llama_model_quantize` (what llama-quantize calls, no importance matrix). Then the two files are
compared tensor by tensor: same type, same bytes. Prints a table, and one JSON line per type.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_SNIPPET = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = int(sys.argv[4]); p.allow_requantize = True
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
sys.exit(1 if rc else 0)
"""


def run_measured(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB, exit code, stderr tail) of a command, measured by /usr/bin/time.

    Through `time` rather than our own wait4: Linux carries the pre-exec RSS high-water mark into
    ru_maxrss, so a child forked from this (by then large) process would inherit our peak."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "QCPU_MAXRSS_KB=%M", *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stderr.splitlines()
    kb = [int(x.split("=")[1]) for x in lines if x.startswith("QCPU_MAXRSS_KB=")]
    return wall, (kb[-1] / 1024 if kb else float("nan")), proc.returncode, proc.stderr[-2000:]


def compare_files(ours: Path, theirs: Path) -> dict:
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from qcpu.gguf_file import GGUFFile

    a, b = GGUFFile(ours), GGUFFile(theirs)
    names = sorted(set(a.tensors) | set(b.tensors))
    same_type = same_bytes = 0
    diffs = []
    for n in names:
        ta, tb = a.tensors.get(n), b.tensors.get(n)
        if ta is None or tb is None:
            diffs.append(f"{n}: only in {'ours' if tb is None else 'llama.cpp'}")
            continue
        if ta.ggml_type != tb.ggml_type or ta.shape != tb.shape:
            diffs.append(f"{n}: {T(ta.ggml_type).name}{list(ta.shape)} vs {T(tb.ggml_type).name}{list(tb.shape)}")
            continue
        same_type += 1
        ra, rb = a.raw(n), b.raw(n)
        if np.array_equal(ra, rb):
            same_bytes += 1
        else:
            rows = int(np.count_nonzero((ra != rb).any(axis=1)))
            diffs.append(f"{n} ({T(ta.ggml_type).name}): {rows}/{ra.shape[0]} rows differ")
        del ra, rb
    meta_diff = [k for k in sorted(set(a.metadata) | set(b.metadata)) if a.metadata.get(k) != b.metadata.get(k)]
    return {"tensors": len(names), "same_type": same_type, "same_bytes": same_bytes, "diffs": diffs,
            "metadata_diffs": meta_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("types", nargs="+")
    ap.add_argument("--outdir", default="/tmp/qcpu-compare")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", choices=["ours", "llama"])
    ap.add_argument("--keep", action="store_true", help="keep the output files")
    args = ap.parse_args()

    from quant.recipes import file_type

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.src)
    results = []
    for name in args.types:
        ft = file_type(name)
        ours, theirs = out / f"{src.stem}.{name}.qcpu.gguf", out / f"{src.stem}.{name}.llama.gguf"
        row = {"type": name, "input": str(src), "input_GiB": round(src.stat().st_size / 2**30, 2)}
        if args.only != "llama":
            w, rss, rc, tail = run_measured([sys.executable, "-m", "qcpu.cli", "quantize", str(src), str(ours),
                                             name, "--force", "--quiet", "--threads", str(args.threads)])
            if rc:
                sys.exit(f"qcpu quantize failed: {tail}")
            row.update(qcpu_s=round(w, 1), qcpu_peak_rss_MiB=round(rss), qcpu_out_GiB=round(ours.stat().st_size / 2**30, 3))
        if args.only != "ours":
            w, rss, rc, tail = run_measured([sys.executable, "-c", LLAMA_SNIPPET, str(src), str(theirs),
                                             str(int(ft.ftype)), str(args.threads)])
            if rc:
                sys.exit(f"llama_model_quantize failed: {tail}")
            row.update(llama_s=round(w, 1), llama_peak_rss_MiB=round(rss),
                       llama_out_GiB=round(theirs.stat().st_size / 2**30, 3))
        if args.only is None:
            cmp = compare_files(ours, theirs)
            row.update(tensors=cmp["tensors"], same_type=cmp["same_type"], byte_equal=cmp["same_bytes"],
                       metadata_diffs=cmp["metadata_diffs"], diffs=cmp["diffs"][:10])
        if not args.keep:
            for p in (ours, theirs):
                p.unlink(missing_ok=True)
        results.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'type':8} {'qcpu s':>8} {'qcpu MiB':>9} {'llama s':>8} {'llama MiB':>9}  byte-equal tensors")
    for r in results:
        eq = f"{r['byte_equal']}/{r['tensors']}" if "byte_equal" in r else "-"
        print(f"{r['type']:8} {r.get('qcpu_s', '-'):>8} {r.get('qcpu_peak_rss_MiB', '-'):>9} "
              f"{r.get('llama_s', '-'):>8} {r.get('llama_peak_rss_MiB', '-'):>9}  {eq}")


if __name__ == "__main__":
    main()
