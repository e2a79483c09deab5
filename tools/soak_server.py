"""Soak of `qcpu serve`: starts the server, runs 8 client threads for minutes with a mix of normal, malformed
and disconnecting requests, samples its resident memory, then stops it with Ctrl-C (issue 13).

    python tools/soak_server.py [MODEL] [--minutes 10] [--ctx N] [--clients 8] [--limit-mb 50] [--log-dir /tmp/soak]

The server is `qcpu serve [MODEL] --host 127.0.0.1 --port P -np 4 [--ctx N]` on a free port, its stdout and
stderr kept in --log-dir. Each client thread picks a kind at random, one request after another:
  stream      streaming chat with the official `openai` client (a short question, max_tokens 32..64)
  whole       the same, not streamed
  malformed   with httpx: invalid JSON, `"messages": 5`, `"max_tokens": "x"`, an empty messages list, an
              unknown model, a prompt longer than a slot's context, ...: each must get a 4xx, never a 5xx
  disconnect  a streaming request with httpx, 1..3 SSE chunks read, then the connection closed
A 503 with code "overloaded" (every slot busy and the queue full: the documented answer) is counted apart.
The server's RSS (with its children) is sampled every 2 s with psutil. At the end every slot must be free
(GET /stats, within 30 s; skipped when /stats is 404) and the server must exit 0 within 20 s of SIGINT.

Exit code 0 when: no 5xx, no connection error, the server alive throughout, the max RSS of the last minute
minus that of the first minute below --limit-mb, every slot free at the end, and the server's exit code 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil
from openai import APIConnectionError, APIStatusError, OpenAI

QUESTIONS = ["What is a Python list comprehension?", "Explain recursion in two sentences.",
             "Write a haiku about compilers.", "What does HTTP 404 mean?", "Name three sorting algorithms.",
             "What is a mutex?", "Explain Big-O notation briefly.", "What is a closure in JavaScript?",
             "What is a hash map?", "How do I reverse a string in Python?", "What is TCP?", "What is a monad?"]
KINDS = [("stream", 0.35), ("whole", 0.25), ("malformed", 0.25), ("disconnect", 0.15)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qcpu_command() -> list[str]:
    """The `qcpu` entry point of this Python (not a pyenv shim), else the one on PATH."""
    here = Path(sys.executable).parent / "qcpu"
    return [str(here)] if here.exists() else [shutil.which("qcpu") or "qcpu"]


class Tally:
    """Counts by (kind, detail): thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # kind -> requests
        self.status: dict[str, Counter] = defaultdict(Counter)  # kind -> status (or error name) -> n
        self.malformed: dict[str, Counter] = defaultdict(Counter)  # case -> status -> n
        self.problems: list[str] = []  # every 5xx, connection error, wrong status or bad reply (first ones)
        self.n_problems = 0
        self.overloaded = 0
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def add(self, kind: str, status, seconds: float, case: str | None = None, problem: str | None = None) -> None:
        with self.lock:
            self.requests[kind] += 1
            self.status[kind][status] += 1
            self.seconds[kind].append(seconds)
            if case is not None:
                self.malformed[case][status] += 1
            if status == 503 and problem is None:
                self.overloaded += 1
            if problem is not None:
                self.n_problems += 1
                if len(self.problems) < 50:
                    self.problems.append(f"{time.strftime('%H:%M:%S')} {kind}{'/' + case if case else ''}: {problem}")


def overloaded(body: str) -> bool:
    try:
        return json.loads(body)["error"]["code"] == "overloaded"
    except Exception:
        return False


def malformed_cases(model: str, n_ctx: int) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) of requests that must get a 4xx."""
    ok = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    long_text = " ".join(["apple"] * (n_ctx + 256))  # one token a word: more than a slot holds
    return [
        ("invalid_json", {"content": b'{"model": "x", "messages": [', "headers": {"content-type": "application/json"}}),
        ("not_an_object", {"json": [1, 2, 3]}),
        ("messages_5", {"json": {**ok, "messages": 5}}),
        ("max_tokens_x", {"json": {**ok, "max_tokens": "x"}}),
        ("empty_messages", {"json": {**ok, "messages": []}}),
        ("unknown_model", {"json": {**ok, "model": "no-such-model"}}),
        ("bad_role", {"json": {**ok, "messages": [{"role": "wizard", "content": "hi"}]}}),
        ("temperature_str", {"json": {**ok, "temperature": "hot", "stream": True}}),
        ("too_long", {"json": {**ok, "messages": [{"role": "user", "content": long_text}]}}),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="GGUF model (default: qcpu's default model)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--ctx", type=int, default=None, help="passed to qcpu serve")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--parallel", "-np", type=int, default=4)
    ap.add_argument("--limit-mb", type=float, default=50.0)
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/soak"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    args.log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = qcpu_command() + ["serve"] + ([args.model] if args.model else []) + [
        "--host", "127.0.0.1", "--port", str(port), "-np", str(args.parallel)]
    if args.ctx:
        cmd += ["--ctx", str(args.ctx)]
    out_path, err_path = args.log_dir / "server.stdout", args.log_dir / "server.stderr"
    print(f"$ {' '.join(cmd)}  (logs in {args.log_dir})", flush=True)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        return soak(args, proc, base, err_path)
    finally:
        if proc.poll() is None:  # only when something above failed
            proc.kill()
            proc.wait()


def soak(args, proc: subprocess.Popen, base: str, err_path: Path) -> int:
    t_start = time.time()
    while True:  # the model loads (and may be fetched) first
        if proc.poll() is not None:
            print(f"FAIL: the server exited with {proc.returncode} before answering /health; see {err_path}")
            return 1
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() - t_start > 600:
            print("FAIL: no /health answer in 600 s")
            return 1
        time.sleep(0.5)
    print(f"server up after {time.time() - t_start:.1f} s", flush=True)
    model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    stats = httpx.get(f"{base}/stats", timeout=10)
    has_stats = stats.status_code == 200
    n_ctx = args.ctx or (stats.json()["slots"][0]["n_ctx"] if has_stats else 4096)
    print(f"model {model}, slot context {n_ctx}, /stats {'present' if has_stats else 'missing (404)'}", flush=True)
    cases = malformed_cases(model, n_ctx)

    tally = Tally()
    seconds = args.minutes * 60
    t0 = time.time()
    stop_at = t0 + seconds
    rss: list[tuple[float, float]] = []  # (seconds since t0, MB)
    died = threading.Event()
    sampling = threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not sampling.is_set():
            if proc.poll() is not None:
                died.set()
                return
            try:
                total = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                rss.append((time.time() - t0, total / 2**20))
            except psutil.Error:
                pass
            sampling.wait(2.0)

    def client(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        oai = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        http = httpx.Client(timeout=300)
        turn = 0
        while time.time() < stop_at and not died.is_set():
            turn += 1
            kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
            question = f"{rng.choice(QUESTIONS)} (client {i}, turn {turn})"
            messages = [{"role": "user", "content": question}]
            max_tokens = rng.randint(32, 64)
            t = time.time()
            try:
                if kind == "stream":
                    text, usage, finish = [], None, None
                    for chunk in oai.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                             stream=True, stream_options={"include_usage": True}):
                        if chunk.choices:
                            text.append(chunk.choices[0].delta.content or "")
                            finish = chunk.choices[0].finish_reason or finish
                        if chunk.usage:
                            usage = chunk.usage
                    bad = None if usage and finish and "".join(text) else f"odd stream: finish {finish}, usage {usage}"
                    tally.add(kind, 200, time.time() - t, problem=bad)
                elif kind == "whole":
                    r = oai.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
                    ok = r.choices and r.choices[0].message.content and r.usage.completion_tokens <= max_tokens
                    tally.add(kind, 200, time.time() - t, problem=None if ok else f"odd reply: {r}")
                elif kind == "malformed":
                    case, request = rng.choice(cases)
                    r = http.post(f"{base}/v1/chat/completions", **request)
                    status, body = r.status_code, r.text
                    problem = None
                    if status == 503 and overloaded(body):
                        pass
                    elif not 400 <= status < 500:
                        problem = f"status {status}: {body[:300]}"
                    else:
                        try:
                            json.loads(body)["error"]["message"]
                        except Exception:
                            problem = f"status {status} without OpenAI's error body: {body[:300]}"
                    tally.add(kind, status, time.time() - t, case=case, problem=problem)
                else:  # disconnect
                    want = rng.randint(1, 3)
                    got, status = 0, None
                    with httpx.Client(timeout=300) as once:
                        with once.stream("POST", f"{base}/v1/chat/completions",
                                         json={"model": model, "messages": messages, "max_tokens": max_tokens,
                                               "stream": True}) as r:
                            status = r.status_code
                            if status == 200:
                                for line in r.iter_lines():
                                    if line.startswith("data: "):
                                        got += 1
                                        if got >= want:
                                            break
                            else:
                                r.read()
                    problem = None
                    if status == 503 and overloaded(r.text):
                        pass
                    elif status != 200:
                        problem = f"status {status}"
                    tally.add(kind, status, time.time() - t, problem=problem)
            except APIStatusError as e:
                problem = None if e.status_code == 503 and overloaded(e.response.text) else \
                    f"status {e.status_code}: {e.response.text[:300]}"
                tally.add(kind, e.status_code, time.time() - t, problem=problem)
            except (APIConnectionError, httpx.HTTPError) as e:
                tally.add(kind, f"conn:{type(e).__name__}", time.time() - t, problem=f"{type(e).__name__}: {e}")
            except Exception as e:  # e.g. the openai client's APIError for an error event in a stream
                tally.add(kind, f"err:{type(e).__name__}", time.time() - t, problem=f"{type(e).__name__}: {e}")
        http.close()
        oai.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for th in threads:
        th.start()
    last_report = t0
    while any(th.is_alive() for th in threads):
        time.sleep(1.0)
        if time.time() - last_report >= 60:
            last_report = time.time()
            with tally.lock:
                done = sum(tally.requests.values())
            mb = rss[-1][1] if rss else float("nan")
            print(f"  {last_report - t0:5.0f} s: {done} requests, {tally.n_problems} problems, RSS {mb:.0f} MB",
                  flush=True)
    load_seconds = time.time() - t0
    alive = proc.poll() is None and not died.is_set()
    sampling.set()
    sampler.join()

    # every slot free at the end
    slots_free, slots_note = None, ""
    if alive:
        if has_stats:
            deadline = time.time() + 30
            while True:
                s = httpx.get(f"{base}/stats", timeout=10).json()
                busy = [x["id"] for x in s["slots"] if x["busy"]]
                if not busy and s.get("queue", 0) == 0:
                    slots_free = True
                    slots_note = f"all {len(s['slots'])} free after {30 - (deadline - time.time()):.1f} s; " + \
                                 f"/stats: requests {s.get('requests')}, prompt_tokens {s.get('prompt_tokens')}, " + \
                                 f"completion_tokens {s.get('completion_tokens')}, n_cached " + \
                                 f"{[x['n_cached'] for x in s['slots']]}"
                    break
                if time.time() > deadline:
                    slots_free = False
                    slots_note = f"still busy after 30 s: slots {busy}, queue {s.get('queue')}"
                    break
                time.sleep(0.5)
        else:
            slots_note = "skipped: /stats is 404"

    # stop: SIGINT, exit 0 within 20 s
    exit_code = None
    if alive:
        proc.send_signal(signal.SIGINT)
        try:
            exit_code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            exit_code = None
    else:
        exit_code = proc.poll()

    # the server's log: 5xx lines and tracebacks
    log = err_path.read_text(errors="replace").splitlines()
    server_status: Counter = Counter()
    for line in log:
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("GET", "POST") and parts[2].isdigit():
            server_status[int(parts[2])] += 1
    log_5xx = [ln for ln in log if (p := ln.split()) and len(p) >= 3 and p[0] in ("GET", "POST")
               and p[2].isdigit() and int(p[2]) >= 500 and int(p[2]) != 503]
    tracebacks = [i for i, ln in enumerate(log) if ln.startswith("Traceback")]

    # summary
    first = [mb for s, mb in rss if s <= 60]
    last = [mb for s, mb in rss if s >= load_seconds - 60]
    first_max, last_max = (max(first) if first else float("nan")), (max(last) if last else float("nan"))
    growth = last_max - first_max
    n_5xx = sum(n for kind in tally.status.values() for st, n in kind.items()
                if isinstance(st, int) and st >= 500 and st != 503)
    n_5xx += sum(n for kind in tally.status.values() for st, n in kind.items() if st == 503) - tally.overloaded
    n_conn = sum(n for kind in tally.status.values() for st, n in kind.items() if isinstance(st, str))

    print(f"\n{load_seconds:.0f} s of load, {args.clients} clients, {sum(tally.requests.values())} requests")
    print("kind        | requests | statuses                                 | mean s | max s")
    for kind, _ in KINDS:
        st = ", ".join(f"{k}: {v}" for k, v in sorted(tally.status[kind].items(), key=str))
        secs = tally.seconds[kind]
        mean = sum(secs) / len(secs) if secs else float("nan")
        print(f"{kind:11s} | {tally.requests[kind]:8d} | {st:40s} | {mean:6.2f} | {max(secs, default=float('nan')):5.2f}")
    print("malformed cases: " + "; ".join(f"{c}: " + ", ".join(f"{k} x{v}" for k, v in sorted(n.items(), key=str))
                                          for c, n in sorted(tally.malformed.items())))
    print(f"503 overloaded (the documented answer to a full queue): {tally.overloaded}")
    print(f"server log statuses: {dict(sorted(server_status.items()))}")
    print(f"RSS: first minute max {first_max:.1f} MB, last minute max {last_max:.1f} MB, "
          f"difference {growth:+.1f} MB (limit {args.limit_mb:g}); overall min {min(m for _, m in rss):.1f}, "
          f"max {max(m for _, m in rss):.1f} MB, {len(rss)} samples" if rss else "RSS: no samples")
    print(f"slots at the end: {slots_note or 'not checked (server down)'}")
    print(f"server exit code after SIGINT: {exit_code if exit_code is not None else 'still running after 20 s'}")
    if tally.problems:
        print(f"problems ({tally.n_problems}, first {len(tally.problems)}):")
        for p in tally.problems:
            print(f"  {p}")
    if log_5xx or tracebacks:
        print(f"server stderr: {len(log_5xx)} 5xx lines, {len(tracebacks)} tracebacks")
        for ln in log_5xx[:10]:
            print(f"  {ln}")
        for i in tracebacks[:3]:
            print("  " + "\n  ".join(log[i:i + 30]))

    checks = {
        "no 5xx": n_5xx == 0 and not log_5xx,
        "no connection errors": n_conn == 0,
        "no wrong statuses or replies": tally.n_problems == 0,
        "no tracebacks": not tracebacks,
        "server alive throughout": alive,
        f"RSS growth < {args.limit_mb:g} MB": growth < args.limit_mb,
        "slots free at the end": slots_free is not False and alive,
        "exit code 0": exit_code == 0,
    }
    print("checks: " + ", ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in checks.items()))
    ok = all(checks.values())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
