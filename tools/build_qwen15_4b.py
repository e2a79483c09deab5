"""A Qwen1.5-4B-Chat-shaped checkpoint (random weights), converted with qcpu and compared with llama.cpp.

    /work/venv/bin/python tools/build_qwen15_4b.py [--dir DIR] [--steps build,convert,compare] [--types ...]

build    DIR/hf: config.json / generation_config.json from /work/shared/qwen1.5-4b-chat.json (hidden 2560,
         40 layers, 20 heads, 20 KV heads, FFN 6912, vocab 151936, untied output), random bf16 weights
         of realistic scale in 4 safetensors shards + index, and the default model's tokenizer files
         (tokenizer.json / tokenizer_config.json re-created from its GGUF by tools/export_hf.py).
         ~7.9 GB, written slab by slab (never more than a few hundred MB in memory).
convert  `qcpu convert DIR/hf DIR/qwen15-4b.TYPE.gguf --type TYPE` for BF16 and each --types (default Q4_0
         Q4_K_M Q8_0), each timed with its peak resident memory (/usr/bin/time).
compare  tools/compare_quantize.py's measurement for llama.cpp: llama_model_quantize on DIR's BF16 GGUF to
         each type (wall time, peak RSS), then qcpu's converted file against llama.cpp's, tensor by tensor.
         Also runs `qcpu quantize` on the same BF16 GGUF, so both quantizers are timed on the same input.

Default DIR: ~/.cache/qcpu/qwen15-4b-shape (outside git). Results: DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

FACTS = Path("/work/shared/qwen1.5-4b-chat.json")
DEFAULT_DIR = Path.home() / ".cache" / "qcpu" / "qwen15-4b-shape"
SLAB = 1 << 24  # values generated at a time


def hf_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, HF shape) of a Qwen2ForCausalLM checkpoint, in safetensors' (sorted) order."""
    d, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d)), ("model.norm.weight", (d,))]
    if not c.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, d)))
    for i in range(n):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.q_proj.bias", (q,)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (d, q)), (p + "mlp.gate_proj.weight", (f, d)),
                (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f))]
    return sorted(out)


def fill(name: str, shape: tuple[int, ...], rng: np.random.Generator):
    """Yield float32 slabs (whole rows) of a realistic-looking tensor.

    Matrices: Gaussian rows with per-row scales ~ 0.02 * lognormal(0, 0.35) (down/o projections scaled by
    1/sqrt(2*layers) as GPT-2 style init does), plus 0.1% outliers at 6-10 sigma; embeddings 0.015;
    norms 1 +- 0.05 (attention) or ~0.2-1.5 (final); biases: q/k heavy (Qwen's are), v small."""
    if len(shape) == 1:
        n = shape[0]
        if "layernorm" in name or "norm" in name:
            yield (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32)
        elif "k_proj" in name or "q_proj" in name:
            yield (0.5 * rng.standard_t(3, n)).astype(np.float32)
        else:
            yield (0.02 * rng.standard_normal(n)).astype(np.float32)
        return
    rows, cols = shape
    base = 0.015 if ("embed" in name or "lm_head" in name) else 0.02
    if "down_proj" in name or "o_proj" in name:
        base /= math.sqrt(2 * 40 / 8)
    step = max(1, SLAB // cols)
    for r0 in range(0, rows, step):
        k = min(step, rows - r0)
        x = rng.standard_normal((k, cols), dtype=np.float32)
        x *= (base * rng.lognormal(0.0, 0.35, (k, 1))).astype(np.float32)
        mask = rng.random((k, cols), dtype=np.float32) < 1e-3
        x[mask] *= rng.uniform(6, 10, int(mask.sum())).astype(np.float32)
        yield x


def build(out: Path, seed: int = 0) -> None:
    from quant.quantizers import quantize
    from gguf import GGMLQuantizationType as T

    import export_hf
    from qcpu.gguf_file import GGUFFile
    from qcpu.models import fetch_default_model

    facts = json.loads(FACTS.read_text())
    c = dict(facts["config"])
    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "config.json").write_text(json.dumps({**c, "transformers_version": "4.37.0", "initializer_range": 0.02,
                                                "max_window_layers": 21, "sliding_window": 32768,
                                                "attention_dropout": 0.0, "use_cache": True}, indent=2) + "\n")
    (hf / "generation_config.json").write_text(
        json.dumps({"bos_token_id": c["bos_token_id"], **facts["generation_config"]}, indent=2) + "\n")
    meta = GGUFFile(fetch_default_model()).metadata
    tj = export_hf.tokenizer_json(meta)
    (hf / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (hf / "tokenizer_config.json").write_text(json.dumps(export_hf.tokenizer_config(meta, tj, c["max_position_embeddings"]),
                                                         ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    entries = hf_tensors(c)
    total = sum(math.prod(s) * 2 for _, s in entries)
    n_shards = 4
    per = total / n_shards
    shards, cur, size = [], [], 0
    for e in entries:
        if cur and size >= per * (len(shards) + 1) - 1:
            shards.append(cur)
            cur = []
        cur.append(e)
        size += math.prod(e[1]) * 2
    shards.append(cur)
    rng = np.random.default_rng(seed)
    weight_map = {}
    t0 = time.perf_counter()
    for k, shard in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fn
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(hf / fn, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape in shard:
                for x in fill(name, shape, rng):
                    f.write(quantize(x.reshape(-1, x.shape[-1]), T.BF16).tobytes())
        print(f"  {fn}: {len(shard)} tensors, {(hf / fn).stat().st_size / 2**30:.2f} GiB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    (hf / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    print(f"built {hf}: {sum(math.prod(s) for _, s in entries) / 1e9:.3f} B parameters, {total / 2**30:.2f} GiB")


def run_convert(out: Path, qtype: str, threads: int) -> dict:
    from compare_quantize import run_measured

    dst = out / f"qwen15-4b.{qtype}.gguf"
    wall, rss, rc, tail = run_measured([sys.executable, "-m", "qcpu.cli", "convert", str(out / "hf"), str(dst),
                                        "--type", qtype, "--force", "--quiet", "--threads", str(threads)])
    if rc:
        sys.exit(f"qcpu convert --type {qtype} failed: {tail}")
    r = {"type": qtype, "qcpu_convert_s": round(wall, 1), "qcpu_convert_peak_rss_MiB": round(rss),
         "out_GiB": round(dst.stat().st_size / 2**30, 3)}
    print(json.dumps(r), flush=True)
    return r


def run_compare(out: Path, qtype: str, threads: int) -> dict:
    """llama.cpp's quantizer and ours on the same BF16 GGUF; ours (quantize and convert) vs theirs."""
    from compare_quantize import LLAMA_SNIPPET, compare_files, run_measured
    from quant.recipes import file_type

    src = out / "qwen15-4b.BF16.gguf"
    theirs, ours = out / f"llama.{qtype}.gguf", out / f"qcpu-quantize.{qtype}.gguf"
    r = {"type": qtype}
    wall, rss, rc, tail = run_measured([sys.executable, "-c", LLAMA_SNIPPET, str(src), str(theirs),
                                        str(int(file_type(qtype).ftype)), str(threads)])
    if rc:
        sys.exit(f"llama_model_quantize failed: {tail}")
    r.update(llama_quantize_s=round(wall, 1), llama_quantize_peak_rss_MiB=round(rss))
    wall, rss, rc, tail = run_measured([sys.executable, "-m", "qcpu.cli", "quantize", str(src), str(ours), qtype,
                                        "--force", "--quiet", "--threads", str(threads)])
    if rc:
        sys.exit(f"qcpu quantize failed: {tail}")
    r.update(qcpu_quantize_s=round(wall, 1), qcpu_quantize_peak_rss_MiB=round(rss))
    for label, path in (("qcpu_quantize", ours), ("qcpu_convert", out / f"qwen15-4b.{qtype}.gguf")):
        if path.exists():
            cmp = compare_files(path, theirs)
            r[f"{label}_byte_equal"] = f"{cmp['same_bytes']}/{cmp['tensors']}"
            r[f"{label}_diffs"] = cmp["diffs"][:5]
            r[f"{label}_metadata_diffs"] = cmp["metadata_diffs"]
    theirs.unlink()
    ours.unlink()
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--steps", default="build,convert,compare")
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q8_0"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    steps = args.steps.split(",")
    args.dir.mkdir(parents=True, exist_ok=True)
    results_path = args.dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "build" in steps:
        t0 = time.perf_counter()
        build(args.dir)
        results["build_s"] = round(time.perf_counter() - t0, 1)
    if "convert" in steps:
        results["convert"] = {t: run_convert(args.dir, t, args.threads) for t in ["BF16", *args.types]}
    if "compare" in steps:
        results["compare"] = {t: run_compare(args.dir, t, args.threads) for t in args.types}
    results["threads"] = args.threads
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results in {results_path}")


if __name__ == "__main__":
    main()
