"""Fuzz qcpu's GGUF loader with the mutation corpus from tests/gguf_mutations.py, at scale.

    python tools/fuzz_gguf.py                      # 1200 tiny F32 + 300 tiny Q8_0 + 300 real-header cases
    python tools/fuzz_gguf.py --tiny 5000 --real 0 --seed 7 --jobs 2
    python tools/fuzz_gguf.py --save-failures /tmp/gguf-fails

Every case must either load (GGUFFile + ModelConfig + ModelWeights) or raise QcpuError with a one-line
message, within --time-limit seconds and --rss-limit MB of peak-RSS growth in the worker. Prints counts
per outcome and per operator, the slowest cases and every failure; exits 1 if any case broke the contract.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf import GGMLQuantizationType as T  # noqa: E402

from tests import gguf_mutations as gm  # noqa: E402


def _op(case_name: str) -> str:
    """The operator family of a case name ("tiny-F32#12:fill4096x00@77" -> "fill")."""
    tail = case_name.split("#", 1)[1].split(":", 1)[1]
    return re.match(r"bad_utf8|[a-z_]*", tail).group(0) or tail[:12]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", type=int, default=1200, help="cases from the tiny F32 model")
    ap.add_argument("--tiny-q8", type=int, default=300, help="cases from the tiny Q8_0 model")
    ap.add_argument("--real", type=int, default=300, help="cases from the default model's header (0 to skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per case")
    ap.add_argument("--rss-limit", type=float, default=256.0, help="MB of peak RSS growth per case")
    ap.add_argument("--save-failures", type=Path, help="copy failing case files here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qcpu-fuzz-"))
    try:
        bases: list[tuple[gm.Base, int]] = []
        if args.tiny:
            bases.append((gm.tiny_base(tmp, T.F32), args.tiny))
        if args.tiny_q8:
            bases.append((gm.tiny_base(tmp, T.Q8_0), args.tiny_q8))
        if args.real:
            from qcpu.models import fetch_default_model

            # Fetched (once, into qcpu's cache) if absent: --real 0 leaves the real-header corpus out.
            bases.append((gm.real_base(fetch_default_model()), args.real))

        t0 = time.perf_counter()
        reports: list[tuple[str, gm.Report]] = []
        for base, n in bases:
            shards: list[gm.Report | None] = [None] * args.jobs
            lock = threading.Lock()
            done = [0]

            def progress(i: int, r: gm.Result) -> None:
                with lock:
                    done[0] += 1
                    if r.problem:
                        print(f"  FAIL {r.case}: {r.problem}", flush=True)
                    if done[0] % 250 == 0:
                        print(f"  {base.name}: {done[0]}/{n}", flush=True)

            errors: list[str] = []

            def shard(j: int) -> None:
                try:
                    run_shard(j)
                except Exception as e:  # a bug in the generator or runner: report it, do not hide it
                    import traceback

                    errors.append(f"job {j}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                    shards[j] = gm.Report([], 0.0)

            def run_shard(j: int) -> None:
                # Case i goes to job i % jobs: each job generates only its own cases.
                per = [i for i in range(n) if i % args.jobs == j]
                cases = (c for i in per for c in gm.generate(base, 1, seed=args.seed, start=i))
                shards[j] = gm.run_corpus(cases, tmp / f"{base.name}-{j}", base.case("warmup"),
                                          time_limit=args.time_limit, rss_limit_mb=args.rss_limit,
                                          progress=progress)
                if args.save_failures:
                    args.save_failures.mkdir(parents=True, exist_ok=True)
                    failed = {r.case for r in shards[j].failures}
                    for i in per:
                        case = next(gm.generate(base, 1, seed=args.seed, start=i))
                        if case.name in failed:
                            case.write(args.save_failures / f"{base.name}-{i}.gguf")

            threads = [threading.Thread(target=shard, args=(j,)) for j in range(args.jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                print("\n".join(errors))
                return 2
            merged = gm.Report([r for s in shards for r in s.results], max(s.seconds for s in shards),
                               min(s.rss_start_mb for s in shards), max(s.rss_end_mb for s in shards))
            reports.append((base.name, merged))
            print(f"{base.name}: {merged.summary()}", flush=True)

        total = sum(len(r.results) for _, r in reports)
        all_results = [x for _, r in reports for x in r.results]
        failures = [x for x in all_results if x.problem]
        by_op: dict[str, Counter] = defaultdict(Counter)
        for x in all_results:
            by_op[_op(x.case)][x.status] += 1
        print(f"\n{total} cases in {time.perf_counter() - t0:.1f} s wall; outcomes: "
              f"{dict(Counter(x.status for x in all_results))}; contract failures: {len(failures)}")
        print("per operator (loaded / refused / other):")
        for op in sorted(by_op):
            c = by_op[op]
            print(f"  {op:>22}: {c['ok']:5d} / {c['error']:5d} / {sum(c.values()) - c['ok'] - c['error']:3d}")
        print("slowest cases:")
        for x in sorted(all_results, key=lambda x: -x.seconds)[:5]:
            print(f"  {x.seconds:6.2f} s  {x.case[:100]}")
        print(f"largest peak-RSS growth: {max((x.peak_growth_mb for x in all_results), default=0):.1f} MB")
        if failures:
            print("\nFAILURES:")
            for x in failures:
                print(f"  {x.case}: {x.problem}\n      {x.msg[:500]}")
        return 1 if failures else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
