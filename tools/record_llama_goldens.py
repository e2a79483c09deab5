"""Record llama.cpp's greedy chat continuations and perplexity as goldens, so qcpu's tests need no compiler.

llama.cpp (through llama-cpp-python, the ``llama`` extra) is the reference oracle.

    python tools/record_llama_goldens.py [--model MODEL.gguf] [--only greedy|perplexity]
                                         [--cache-types f16 q8_0 q4_0]

Writes:
  tests/golden/greedy.json      greedy (argmax of raw logits) chat continuations of 5 ChatML prompts, with
                                llama.cpp's top-64 logits at EVERY generated position (the test feeds these
                                same tokens, teacher-forced, and compares position by position)
  tests/golden/perplexity.json  llama-perplexity's method over tests/data/ppl_text.txt, n_ctx=512
  tests/golden/perplexity_q8_0.json, perplexity_q4_0.json
                                the same with a q8_0 / q4_0 K and V cache (-ctk/-ctv; flash attention on)
  tests/data/ppl_text.txt       (only if missing) a verbatim leading excerpt of the GPL-3 text

Everything runs single-sequence on the CPU with n_threads=2; flash attention explicitly disabled with the
default (f16) KV cache, enabled for the quantized ones.  No llama.cpp sampler is involved: the argmax is taken here on the logits that
llama_get_logits_ith returns.  Takes about a minute on 2 idle cores, many times longer when other processes
compete for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache" / "qcpu" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GREEDY_OUT = ROOT / "tests" / "golden" / "greedy.json"
PPL_OUT = ROOT / "tests" / "golden" / "perplexity.json"
PPL_TEXT = ROOT / "tests" / "data" / "ppl_text.txt"

N_THREADS = 2

# ---------------------------------------------------------------------------------------------------------
# Greedy chat continuations
# ---------------------------------------------------------------------------------------------------------

GREEDY_N_CTX = 2048
GREEDY_N_BATCH = 512
MAX_NEW_TOKENS = 80
EOT_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
TOP_K = 64  # logits recorded per generated position
DECIMALS = 4  # logits rounded to this many decimals in the file (keeps it ~250 KB); 5e-5 << any tolerance

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

PROMPTS: list[dict] = [
    {
        "name": "coding",
        "messages": [
            {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number iteratively."},
        ],
    },
    {
        "name": "factual",
        "messages": [
            {"role": "user", "content": "What is the capital of Australia, and why was it chosen over Sydney?"},
        ],
    },
    {
        "name": "chinese",
        "messages": [
            {"role": "user", "content": "请用一句话解释什么是递归。"},
        ],
    },
    {
        "name": "system_user",
        "messages": [
            {"role": "system", "content": "You are a terse assistant. Answer in at most two sentences."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    },
    {
        "name": "two_turn",
        "messages": [
            {"role": "user", "content": "Give me a name for a pet turtle."},
            {"role": "assistant", "content": "How about \"Sheldon\"?"},
            {"role": "user", "content": "Why is that a good name? Answer briefly."},
        ],
    },
]


def render_chatml(messages: list[dict]) -> str:
    """Qwen2.5's chat template (no tools), add_generation_prompt=True, rendered by hand."""
    out = []
    if messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_with_gguf_template(template: str, messages: list[dict]) -> str:
    """Cross-check: render with the GGUF's own Jinja template (the way llama-cpp-python's Jinja2 formatter does)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, tools=None)


def _last_logits(llm, n_vocab: int) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32, copy=True)


def _topk(logits: np.ndarray, k: int = TOP_K) -> dict:
    # stable sort on -logit: ties are ordered by ascending token id
    order = np.argsort(-logits, kind="stable")[:k]
    return {"ids": [int(i) for i in order], "logits": [round(float(logits[i]), DECIMALS) for i in order]}


def greedy_run(llm, n_vocab: int, prompt_ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """llama.cpp's greedy continuation; per generated position (teacher-forced on its own tokens, as
    greedy decoding is) the top-K logits, the top1-top2 margin and the mean over the full vocabulary."""
    llm.reset()  # n_tokens = 0; eval() then removes every KV cell from position 0 on
    llm.eval(prompt_ids)
    logits = _last_logits(llm, n_vocab)
    gen: list[int] = []
    steps: list[dict] = []
    raw: list[np.ndarray] = []  # full logits, only to check determinism
    while len(gen) < max_new_tokens:
        tok = int(np.argmax(logits))
        two = np.partition(logits, -2)[-2:]
        steps.append({**_topk(logits), "margin": round(float(two.max() - two.min()), 6),
                      "mean": round(float(logits.astype(np.float64).mean()), 6)})
        raw.append(logits)
        gen.append(tok)
        if tok in EOT_IDS:
            break
        llm.eval([tok])
        logits = _last_logits(llm, n_vocab)
    return {"gen": gen, "steps": steps, "raw": raw}


def _compact(text: str) -> str:
    """json.dumps(indent=1) output with every list of plain numbers put on one line."""
    # A real newline after '[' only occurs in the layout, never inside a JSON string (escaped there).
    return re.sub(r"\[\n[-0-9.eE+,\s]+\]", lambda m: "[" + ",".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]", text)


def record_greedy(model_path: Path, info: dict) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(model_path),
        n_ctx=GREEDY_N_CTX,
        n_batch=GREEDY_N_BATCH,
        n_ubatch=GREEDY_N_BATCH,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        logits_all=False,
        flash_attn=False,
        seed=0,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    template = llm.metadata["tokenizer.chat_template"]
    cases = []
    all_deterministic = True
    t0 = time.time()
    for p in PROMPTS:
        text = render_chatml(p["messages"])
        ref = render_with_gguf_template(template, p["messages"])
        if text != ref:
            raise SystemExit(f"hand-rendered ChatML differs from the GGUF template for {p['name']!r}:\n{text!r}\n{ref!r}")
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        r1 = greedy_run(llm, n_vocab, ids)
        r2 = greedy_run(llm, n_vocab, ids)
        # bit-identical logits at every position on a second run
        deterministic = r1["gen"] == r2["gen"] and all(np.array_equal(x, y) for x, y in zip(r1["raw"], r2["raw"]))
        all_deterministic &= deterministic
        gen = r1["gen"]
        margins = [s["margin"] for s in r1["steps"]]
        case = {
            "name": p["name"],
            "messages": p["messages"],
            "rendered": text,
            "prompt_ids": [int(i) for i in ids],
            "generated_ids": gen,
            "stopped_on_eot": bool(gen and gen[-1] in EOT_IDS),
            "generated_text": llm.detokenize(gen, special=True).decode("utf-8", errors="replace"),
            "deterministic": deterministic,
            "steps": r1["steps"],
        }
        cases.append(case)
        print(
            f"  greedy {p['name']:<12} prompt={len(ids):3d} gen={len(gen):2d} eot={case['stopped_on_eot']!s:<5} "
            f"det={deterministic} min_margin={min(margins):.4f}  {case['generated_text'][:60]!r}"
        )
    print(f"  greedy: {time.time() - t0:.0f}s")
    out = {
        "description": "llama.cpp greedy (argmax of raw logits, no sampler/penalties) chat continuations of "
        "Qwen2.5 ChatML prompts. generated_ids includes the end-of-turn id if one was produced. "
        "steps[i] holds the logits that chose generated_ids[i]: step 0 at the last prompt position (after the "
        "prompt in one llama_decode), step i after generated_ids[:i] were fed one token per llama_decode. "
        f"'ids'/'logits' are the top-{TOP_K} sorted by descending logit, ties by ascending id, logits rounded "
        f"to {DECIMALS} decimals; 'margin' is top1 - top2 and 'mean' the mean of all n_vocab float32 logits "
        "(in float64), both unrounded but for 6 decimals.",
        **info,
        "settings": {
            "n_ctx": GREEDY_N_CTX,
            "n_batch": GREEDY_N_BATCH,
            "n_ubatch": llm.context_params.n_ubatch,
            "n_threads": N_THREADS,
            "n_threads_batch": N_THREADS,
            "flash_attn": False,
            "flash_attn_type": int(llm.context_params.flash_attn_type),
            "type_k": int(llm.context_params.type_k),
            "type_v": int(llm.context_params.type_v),
            "kv_cache_type": "f16 (llama.cpp default; GGML_TYPE_F16 = 1)",
            "logits_all": False,
            "add_bos": False,
            "tokenize_special": True,
            "max_new_tokens": MAX_NEW_TOKENS,
            "eot_ids": list(EOT_IDS),
            "top_k_recorded": TOP_K,
            "prompt_eval": "whole prompt in one llama_decode (n_batch=512), then one token per llama_decode",
        },
        "default_system_prompt": DEFAULT_SYSTEM,
        "deterministic": all_deterministic,
        "n_vocab": n_vocab,
        "cases": cases,
    }
    llm.close()
    return out


# ---------------------------------------------------------------------------------------------------------
# Perplexity (tools/perplexity/perplexity.cpp, perplexity())
# ---------------------------------------------------------------------------------------------------------

PPL_N_CTX = 512
GPL3 = Path("/usr/share/common-licenses/GPL-3")
GPL3_PARAGRAPHS = 60  # paragraphs 0..59: the title through the end of section 6 ("Conveying Non-Source Forms.")


def ensure_ppl_text() -> str:
    if not PPL_TEXT.exists():
        paras = GPL3.read_text(encoding="utf-8").split("\n\n")
        PPL_TEXT.parent.mkdir(parents=True, exist_ok=True)
        PPL_TEXT.write_text("\n\n".join(paras[:GPL3_PARAGRAPHS]) + "\n", encoding="utf-8")
    text = PPL_TEXT.read_text(encoding="utf-8")
    if GPL3.exists() and not GPL3.read_text(encoding="utf-8").startswith(text.rstrip("\n")):
        raise SystemExit(f"{PPL_TEXT} is no longer a verbatim prefix of {GPL3}")
    return text


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log_softmax(logits[r])[targets[r]] like perplexity.cpp's log_softmax: float max, expf, double sum."""
    logits = logits.astype(np.float32, copy=False)
    mx = logits.max(axis=1, keepdims=True)
    sum_exp = np.exp(logits - mx).astype(np.float64).sum(axis=1)
    tgt = logits[np.arange(len(targets)), targets] - mx[:, 0]
    return -(tgt.astype(np.float64) - np.log(sum_exp))


CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_* of the -ctk/-ctv names


def ppl_golden_path(cache: str) -> Path:
    """tests/golden/perplexity.json for the f16 cache, perplexity_<type>.json for a quantized one."""
    return PPL_OUT if cache == "f16" else PPL_OUT.with_name(f"perplexity_{cache}.json")


def record_perplexity(model_path: Path, info: dict, cache: str = "f16") -> dict:
    """cache: the K and V cache type; a quantized one runs with flash attention on (llama.cpp needs it for
    a quantized V cache) and, in a current llama.cpp, its Hadamard attention rotation."""
    import llama_cpp

    flash_attn = cache != "f16"

    raw = ensure_ppl_text()
    # llama-perplexity -f: the file is read whole and ONE trailing '\n' is popped (common/arg.cpp)
    text = raw[:-1] if raw.endswith("\n") else raw
    llm = llama_cpp.Llama(
        str(model_path),
        n_ctx=PPL_N_CTX,
        n_batch=PPL_N_CTX,
        n_ubatch=PPL_N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        logits_all=True,
        flash_attn=flash_attn,
        type_k=CACHE_TYPES[cache],
        type_v=CACHE_TYPES[cache],
        seed=0,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm._model.model)))
    bos_id = int(llm.token_bos())
    # common_tokenize(ctx, text, add_special=true, parse_special=false): BOS only if the vocab adds one
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    n_tok = len(tokens)
    if n_tok < 2 * PPL_N_CTX:
        raise SystemExit(f"need >= {2 * PPL_N_CTX} tokens, got {n_tok}")
    n_chunk = n_tok // PPL_N_CTX
    first = PPL_N_CTX // 2
    toks = np.asarray(tokens, dtype=np.int64)

    chunk_nll: list[float] = []
    chunk_nll_exact: list[float] = []
    token_nll: list[list[float]] = []
    max_diff = 0.0
    t0 = time.time()
    for i in range(n_chunk):
        start, end = i * PPL_N_CTX, (i + 1) * PPL_N_CTX
        chunk = list(tokens[start:end])
        if add_bos:  # perplexity.cpp replaces the chunk's first token by BOS (never for Qwen)
            chunk[0] = bos_id
        # (a) logits_all=True: every position's logits, one llama_decode of 512 tokens on a cleared KV cache
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[first : PPL_N_CTX - 1], dtype=np.float32)
        targets = toks[start + first + 1 : end]
        nll = _nll_rows(logits, targets)
        # (b) exactly like perplexity.cpp: outputs requested only for pos >= first
        llm.reset()
        llm._ctx.kv_cache_clear()
        b = llm._batch
        b.set_batch(batch=chunk, n_past=0, logits_all=False)
        for k in range(PPL_N_CTX):
            b.batch.logits[k] = k >= first
        llm._ctx.decode(b)
        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), shape=(PPL_N_CTX - first, n_vocab))
        nll_exact = _nll_rows(np.array(out[: PPL_N_CTX - 1 - first], dtype=np.float32), targets)
        llm.reset()
        max_diff = max(max_diff, float(np.abs(nll - nll_exact).max()))
        chunk_nll.append(float(nll.sum()))
        chunk_nll_exact.append(float(nll_exact.sum()))
        token_nll.append([round(float(v), 6) for v in nll])
        print(f"  ppl chunk {i + 1}/{n_chunk} ({time.time() - t0:.0f}s): nll_sum={nll.sum():.4f} running ppl={math.exp(sum(chunk_nll) / ((i + 1) * (PPL_N_CTX - 1 - first))):.4f}")
    count = n_chunk * (PPL_N_CTX - 1 - first)
    nll_tot = sum(chunk_nll)
    nll2_tot = sum(float(v) ** 2 for row in token_nll for v in row)
    mean = nll_tot / count
    var = nll2_tot / count - mean * mean
    ppl = math.exp(mean)
    ppl_exact = math.exp(sum(chunk_nll_exact) / count)
    out = {
        "description": "llama-perplexity's method (tools/perplexity/perplexity.cpp perplexity(), ppl_stride=0): "
        "text tokenized whole (add_special=true -> BOS only if the vocab adds one, parse_special=false), split "
        "into n_chunk = n_tokens // n_ctx chunks of n_ctx tokens (the tail is dropped), each evaluated on a cleared "
        "KV cache from position 0; for j in [n_ctx/2, n_ctx-1) the chunk scores -log softmax(logits[j])[tok[j+1]], "
        "i.e. n_ctx/2 - 1 tokens per chunk. perplexity = exp(sum of all NLL / count). Recorded with "
        "logits_all=True (chunk_nll_sums, token_nll); chunk_nll_sums_outputs_only is the same chunk decoded "
        "with outputs requested only for positions >= n_ctx/2, exactly as perplexity.cpp does.",
        **info,
        "text_file": "tests/data/ppl_text.txt",
        "text_source": "verbatim leading excerpt (title through section 6) of the GNU General Public License v3 "
        "text, /usr/share/common-licenses/GPL-3 (Debian base-files). (c) Free Software Foundation; verbatim "
        "copying permitted.",
        "text_sha256": hashlib.sha256(raw.encode("utf-8")).hexdigest(),
        "text_bytes": len(raw.encode("utf-8")),
        "text_preprocessing": "one trailing '\\n' removed before tokenizing, as llama-perplexity -f does",
        "settings": {
            "n_ctx": PPL_N_CTX,
            "n_batch": PPL_N_CTX,
            "n_ubatch": llm.context_params.n_ubatch,
            "n_threads": N_THREADS,
            "flash_attn": flash_attn,
            "flash_attn_type": int(llm.context_params.flash_attn_type),
            "cache_type": cache,
            "type_k": int(llm.context_params.type_k),
            "type_v": int(llm.context_params.type_v),
            "logits_all": True,
            "n_seq_per_batch": 1,
            "note": "the llama-perplexity CLI with its default -b 2048 would pack 4 chunks per batch (n_seq=4); "
            "here every chunk is decoded alone (equivalent to -b 512)",
        },
        "vocab_add_bos": add_bos,
        "bos_inserted": add_bos,
        "first_token_ids": [int(t) for t in tokens[:8]],
        "n_tokens": n_tok,
        "n_chunk": n_chunk,
        "first_scored_pos": first,
        "scored_per_chunk": PPL_N_CTX - 1 - first,
        "count": count,
        "perplexity": ppl,
        "perplexity_outputs_only": ppl_exact,
        "max_abs_token_nll_diff_outputs_only_vs_logits_all": max_diff,
        "nll_mean": mean,
        "ppl_uncertainty": math.sqrt(var / (count - 1)) * ppl if var > 0 else None,
        "perplexity_first_chunk": math.exp(chunk_nll[0] / (PPL_N_CTX - 1 - first)),
        "chunk_nll_sums": chunk_nll,
        "chunk_nll_sums_outputs_only": chunk_nll_exact,
        "token_nll": token_nll,
    }
    return out


# ---------------------------------------------------------------------------------------------------------


def common_info(model_path: Path, sha: str) -> dict:
    import llama_cpp

    return {
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_system_info": llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip(),
        "machine": platform.machine(),
        "model_file": model_path.name,
        "model_sha256": sha,
        "recorded_by": "tools/record_llama_goldens.py",
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--only", choices=["greedy", "perplexity"])
    ap.add_argument("--cache-types", nargs="+", default=list(CACHE_TYPES), choices=list(CACHE_TYPES),
                    help="KV cache types to record perplexity goldens for (default: all)")
    args = ap.parse_args(argv)

    sha = sha256_file(args.model)
    if sha != MODEL_SHA256:
        print(f"WARNING: model sha256 {sha} != expected {MODEL_SHA256}", file=sys.stderr)
    info = common_info(args.model, sha)

    if args.only in (None, "greedy"):
        g = record_greedy(args.model, info)
        GREEDY_OUT.parent.mkdir(parents=True, exist_ok=True)
        GREEDY_OUT.write_text(_compact(json.dumps(g, ensure_ascii=False, indent=1)) + "\n", encoding="utf-8")
        print(f"greedy: {len(g['cases'])} prompts, deterministic={g['deterministic']}, "
              f"{GREEDY_OUT.stat().st_size / 1024:.1f} KiB -> {GREEDY_OUT.relative_to(ROOT)}")
    for cache in args.cache_types if args.only in (None, "perplexity") else ():
        p = record_perplexity(args.model, info, cache)
        out = ppl_golden_path(cache)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(p, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"perplexity ({cache} cache): PPL={p['perplexity']:.4f} +/- {p['ppl_uncertainty']:.4f} "
              f"(outputs-only {p['perplexity_outputs_only']:.4f}, max token diff "
              f"{p['max_abs_token_nll_diff_outputs_only_vs_logits_all']:.2e}), tokens={p['n_tokens']} "
              f"chunks={p['n_chunk']} count={p['count']}, {out.stat().st_size / 1024:.1f} KiB -> "
              f"{out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
