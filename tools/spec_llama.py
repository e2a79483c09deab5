"""Measure llama.cpp's speculative decoding (llama-server) on the prompts of `qcpu bench --draft/--lookup`.

Starts llama-server on 127.0.0.1 (a free port, `-t 2 -c 4096 -np 1` plus the extra args given after `--`),
waits for GET /health, warms up with one short request, then sends each prompt of the chosen sets
(`CHAT`, `EDIT` from qcpu/bench_prompts.py) to POST /v1/chat/completions (temperature 0, max_tokens 128)
and reads the reply's "timings" object. Prints per set: decode tok/s (total predicted tokens / total
predicted seconds), draft_n / draft_n_accepted sums, and writes a JSON result (with each reply's text)
so that a plain run and a speculative run can be compared (`--compare`).

Usage:
    python tools/spec_llama.py --model F16.gguf --label plain --out /tmp/spec_llama/plain.json
    python tools/spec_llama.py --model F16.gguf --label draft16 --out /tmp/spec_llama/d16.json \\
        -- -md Q4_K_M.gguf --spec-draft-n-max 16 --spec-draft-p-min 0
    python tools/spec_llama.py --compare /tmp/spec_llama/plain.json /tmp/spec_llama/d16.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, "/work/main")
from qcpu import bench_prompts  # noqa: E402

DEFAULT_SERVER = Path.home() / ".cache/qcpu/llama.cpp/11434.0.0-avx2/bin/llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server: str, model: str, extra: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [server, "-m", model, "--host", "127.0.0.1", "--port", str(port),
           "-t", "2", "-c", "4096", "-np", "1", *extra]
    print("command:", " ".join(cmd), flush=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            log.close()
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n" + "\n".join(tail))
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError("llama-server did not become healthy in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def chat(client: httpx.Client, base: str, prompt: str, max_tokens: int) -> dict:
    r = client.post(base + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": max_tokens, "stream": False})
    r.raise_for_status()
    return r.json()


def run(args: argparse.Namespace) -> dict:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.out).with_suffix(".log")
    sets = {name: getattr(bench_prompts, name.upper()) for name in args.sets}
    result: dict = {"label": args.label, "model": args.model, "extra": args.extra, "sets": {}}
    proc, base = start_server(args.server, args.model, args.extra, log_path)
    try:
        with httpx.Client(timeout=600) as client:
            chat(client, base, "Say hi.", 8)  # warm-up
            shown = False
            for name, prompts in sets.items():
                prompts = prompts[: args.limit] if args.limit else prompts
                rows = []
                for i, prompt in enumerate(prompts):
                    j = chat(client, base, prompt, args.max_tokens)
                    t = j.get("timings", {})
                    if not shown:
                        print("timings keys:", sorted(t), flush=True)
                        shown = True
                    text = j["choices"][0]["message"]["content"]
                    rows.append({"prompt": i, "text": text, "timings": t,
                                 "finish_reason": j["choices"][0].get("finish_reason")})
                    print(f"  {name}[{i}] n={t.get('predicted_n')} {t.get('predicted_per_second', 0):.2f} tok/s"
                          f" draft={t.get('draft_n')} acc={t.get('draft_n_accepted')}", flush=True)
                n = sum(r["timings"].get("predicted_n", 0) for r in rows)
                ms = sum(r["timings"].get("predicted_ms", 0.0) for r in rows)
                dn = sum(r["timings"].get("draft_n", 0) or 0 for r in rows)
                da = sum(r["timings"].get("draft_n_accepted", 0) or 0 for r in rows)
                agg = {"predicted_n": n, "predicted_s": ms / 1000, "tok_s": n / (ms / 1000) if ms else 0.0,
                       "draft_n": dn, "draft_n_accepted": da}
                result["sets"][name] = {"agg": agg, "rows": rows}
                print(f"{args.label} {name}: {n} tok in {ms / 1000:.2f} s = {agg['tok_s']:.2f} tok/s,"
                      f" drafted {dn}, accepted {da}", flush=True)
    finally:
        stop_server(proc)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def compare(plain_path: str, spec_path: str) -> None:
    a = json.loads(Path(plain_path).read_text())
    b = json.loads(Path(spec_path).read_text())
    print(f"{a['label']} vs {b['label']}")
    print("| set | plain tok/s | spec tok/s | ratio | drafted/accepted (rate) | identical replies |")
    print("|---|---|---|---|---|---|")
    for name, sa in a["sets"].items():
        sb = b["sets"].get(name)
        if not sb:
            continue
        pa, pb = sa["agg"], sb["agg"]
        same = sum(x["text"] == y["text"] for x, y in zip(sa["rows"], sb["rows"]))
        rate = pb["draft_n_accepted"] / pb["draft_n"] if pb["draft_n"] else 0.0
        print(f"| {name} | {pa['tok_s']:.2f} | {pb['tok_s']:.2f} | {pb['tok_s'] / pa['tok_s']:.2f}x |"
              f" {pb['draft_n']}/{pb['draft_n_accepted']} ({rate:.0%}) | {same}/{len(sa['rows'])} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=str(DEFAULT_SERVER))
    p.add_argument("--model", help="target model GGUF")
    p.add_argument("--label", default="run")
    p.add_argument("--out", default="/tmp/spec_llama/run.json")
    p.add_argument("--sets", nargs="+", default=["chat", "edit"], choices=["chat", "edit"])
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts of each set")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--compare", nargs=2, metavar=("PLAIN_JSON", "SPEC_JSON"))
    p.add_argument("extra", nargs=argparse.REMAINDER, help="extra llama-server args after --")
    args = p.parse_args()
    if args.extra and args.extra[0] == "--":
        args.extra = args.extra[1:]
    if args.compare:
        compare(*args.compare)
        return
    if not args.model:
        p.error("--model is required")
    try:
        run(args)
    except RuntimeError as e:
        print("FAILED:", e, flush=True)
        Path(args.out).with_suffix(".err").write_text(str(e))
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
