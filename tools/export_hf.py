"""Export a qwen2 GGUF (default: the default model) to a Hugging Face checkpoint directory.

    /work/venv/bin/python tools/export_hf.py [MODEL.gguf] OUT_DIR [--dtype bf16|f16|f32] [--layers N]
                                             [--shard-size BYTES] [--force]
    /work/venv/bin/python tools/export_hf.py --check [WORK_DIR]     # the round trip, against llama.cpp

Writes what `transformers` / convert_hf_to_gguf.py expect of a Qwen2ForCausalLM checkpoint:
  config.json, generation_config.json,
  model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json with --shard-size),
  tokenizer.json (byte-level BPE with Qwen2's pre-tokenizer regex, NFC normalizer, added tokens; loaded
  back with the `tokenizers` package as a check) and tokenizer_config.json (special tokens, chat template).
Weights are the GGUF's tensors dequantized with qcpu's kernels (exact in f32; rounded to nearest even
in bf16 / f16), streamed tensor by tensor. --layers N keeps only the first N blocks (small test models).

--check: export the default model (bf16, 2 shards), `qcpu convert` it to F16 and Q8_0, then generate
greedily from the 5 chat prompts of tools/record_llama_goldens.py with qcpu and with llama.cpp
(llama-cpp-python) on each converted file, and report whether the tokens are the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The exporter itself lives with the tests, which use it and must not import tools/; tools/build_qwen15_4b.py
# uses tokenizer_json and tokenizer_config through this module.
from tests.hf_export import (DTYPES, QWEN2_SPLIT, export, f32, hf_name, tokenizer_config,  # noqa: E402,F401
                             tokenizer_json, write_safetensors)


def _ours_greedy(engine, prompt_ids: list[int], max_new: int) -> list[int]:
    engine.reset()
    logits = engine.feed(prompt_ids)
    got = []
    while len(got) < max_new:
        token = int(np.argmax(logits))
        got.append(token)
        if token in engine.tokenizer.eot_ids:
            break
        logits = engine.feed([token])
    return got


def check(work: Path) -> bool:
    """The round trip: export -> qcpu convert (F16, Q8_0) -> greedy tokens, qcpu vs llama.cpp."""
    import subprocess
    import time

    import llama_cpp

    sys.path.insert(0, str(ROOT / "tools"))
    import record_llama_goldens as rec

    from qcpu.generate import Engine
    from qcpu.models import fetch_default_model

    work.mkdir(parents=True, exist_ok=True)
    hf = work / "qwen2.5-coder-0.5b-instruct-hf"
    t0 = time.perf_counter()
    export(fetch_default_model(), hf, "bf16", shard_size=600_000_000, force=True)
    print(f"exported {hf} (bf16, {len(list(hf.glob('*.safetensors')))} shards) in {time.perf_counter() - t0:.0f} s")
    all_equal = True
    for qtype in ("f16", "q8_0"):
        out = work / f"converted.{qtype}.gguf"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qcpu.cli", "convert", str(hf), str(out), "--type", qtype, "--force",
                        "--quiet"], check=True)
        print(f"qcpu convert --type {qtype}: {time.perf_counter() - t0:.0f} s, {out.stat().st_size / 2**20:.0f} MiB")
        engine = Engine.load(out, ctx=rec.GREEDY_N_CTX)
        llm = llama_cpp.Llama(str(out), n_ctx=rec.GREEDY_N_CTX, n_batch=rec.GREEDY_N_BATCH,
                              n_ubatch=rec.GREEDY_N_BATCH, n_threads=rec.N_THREADS, n_threads_batch=rec.N_THREADS,
                              flash_attn=False, seed=0, verbose=False)
        for p in rec.PROMPTS:
            ids = llm.tokenize(rec.render_chatml(p["messages"]).encode(), add_bos=False, special=True)
            assert engine.tokenizer.encode(rec.render_chatml(p["messages"])) == ids
            want = rec.greedy_run(llm, llm.n_vocab(), ids)["gen"]
            got = _ours_greedy(engine, ids, len(want))
            same = got == want
            all_equal &= same
            div = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            print(f"  {qtype:5} {p['name']:<12} {len(want):3d} tokens: {'equal' if same else f'diverge at {div}'}"
                  f"  {llm.detokenize(want).decode(errors='replace')[:50]!r}")
        del llm, engine
    print("round trip: greedy tokens " + ("equal on every prompt" if all_equal else "DIFFER"))
    return all_equal


def main() -> None:
    if sys.argv[1:2] == ["--check"]:
        ok = check(Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/qcpu-roundtrip"))
        sys.exit(0 if ok else 1)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="[MODEL.gguf] OUT_DIR")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--layers", type=int, help="keep only the first N blocks")
    ap.add_argument("--shard-size", type=int, default=0, help="bytes per safetensors shard (0: one file)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if len(args.paths) == 1:
        from qcpu.models import fetch_default_model

        model, out = fetch_default_model(), Path(args.paths[0])
    elif len(args.paths) == 2:
        model, out = Path(args.paths[0]), Path(args.paths[1])
    else:
        ap.error("give [MODEL.gguf] OUT_DIR")
    export(model, out, args.dtype, args.layers, args.shard_size, args.force)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
