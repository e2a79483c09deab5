"""Record llama.cpp's rope scaling (YaRN, linear) as goldens, so tests/test_rope.py needs no llama.cpp.

Everything here comes out of llama.cpp's own code, through llama-cpp-python's bundled libraries:

  1. The arguments llama.cpp passes to ggml_rope_ext (freq_base, freq_scale, ext_factor, attn_factor,
     beta_fast/slow, n_ctx_orig), read from the op_params of the first ROPE node of its real graph (an
     eval callback on llama_decode), for the default model with YaRN metadata in the file, with the same
     settings on the command line (llama_context_params), with linear scaling, without scaling, and for the
     tiny test model with YaRN and rope.scaling.attn_factor metadata. The node's input and output (the
     first heads of Q at the prompt's positions) are recorded too.
  2. With those arguments, ggml_rope_ext itself (libggml, CPU backend) run on unit vectors: out[i] =
     cos(theta_i) * mscale, out[i + n_dims/2] = sin(theta_i) * mscale, at positions up to 131071 and at
     negative ones (a context shift's deltas), with and without freq factors (rope_freqs); and
     ggml_rope_yarn_corr_dims.
  3. llama.cpp's greedy chat continuations on a copy of the default model with YaRN metadata (factor 4,
     original context 32768), teacher-forced top-64 logits per position, as tools/record_llama_goldens.py
     records them; and a check that the same settings given as context parameters (--rope-scaling yarn
     --rope-scale 4 --yarn-orig-ctx 32768) give bit-identical logits.

    python tools/record_rope_goldens.py [--model MODEL.gguf] [--only tables|greedy]

Writes tests/golden/rope_yarn.json and tests/golden/yarn_greedy.json. The model copy (~490 MB) is written
to a temporary directory and deleted.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from record_llama_goldens import (
    DEFAULT_MODEL,
    EOT_IDS,
    N_THREADS,
    TOP_K,
    _compact,
    common_info,
    greedy_run,
    render_chatml,
    sha256_file,
)

from tests.rope_support import YARN_4X, write_with_metadata
from tests.tiny_model import write_tiny_qwen2

TABLES_OUT = ROOT / "tests" / "golden" / "rope_yarn.json"
GREEDY_OUT = ROOT / "tests" / "golden" / "yarn_greedy.json"

GGML_ROPE_TYPE_NEOX = 2
GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26
POSITIONS = [0, 1, 2, 3, 5, 17, 100, 1000, 4095, 4096, 32767, 32768, 65536, 100003, 131071,
             -1, -7, -4096, -100000]
TINY_YARN = {"rope.scaling.type": "yarn", "rope.scaling.factor": 8.0,
             "rope.scaling.original_context_length": 64, "rope.scaling.attn_factor": 0.875}
TINY_FREQ_FACTORS = [1.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]  # synthetic rope_freqs for head_dim 16

# ---------------------------------------------------------------------------------------------------------
# ggml through ctypes
# ---------------------------------------------------------------------------------------------------------


class GgmlTensor(ctypes.Structure):  # ggml.h struct ggml_tensor (GGML_MAX_DIMS 4, MAX_SRC 10, MAX_OP_PARAMS 64)
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _libs():
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"))
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"))
    vp, f, i = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    base.ggml_init.restype, base.ggml_init.argtypes = vp, [InitParams]
    base.ggml_free.argtypes = [vp]
    base.ggml_new_tensor_1d.restype, base.ggml_new_tensor_1d.argtypes = vp, [vp, i, ctypes.c_int64]
    base.ggml_new_tensor_3d.restype = vp
    base.ggml_new_tensor_3d.argtypes = [vp, i, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    base.ggml_get_data.restype, base.ggml_get_data.argtypes = vp, [vp]
    base.ggml_rope_ext.restype = vp
    base.ggml_rope_ext.argtypes = [vp, vp, vp, vp, i, i, i, f, f, f, f, f, f]
    base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = vp, [vp]
    base.ggml_build_forward_expand.argtypes = [vp, vp]
    base.ggml_rope_yarn_corr_dims.argtypes = [i, i, f, f, f, ctypes.POINTER(f)]
    base.ggml_op_name.restype, base.ggml_op_name.argtypes = ctypes.c_char_p, [i]
    cpu.ggml_graph_compute_with_ctx.restype, cpu.ggml_graph_compute_with_ctx.argtypes = i, [vp, vp, i]
    if hasattr(cpu, "ggml_cpu_init"):
        cpu.ggml_cpu_init()
    return base, cpu


def ggml_corr_dims(base, p: dict) -> list[float]:
    dims = (ctypes.c_float * 2)()
    base.ggml_rope_yarn_corr_dims(p["n_dims"], p["n_ctx_orig"], p["freq_base"], p["beta_fast"], p["beta_slow"], dims)
    return [float(dims[0]), float(dims[1])]


def ggml_rope_table(base, cpu, p: dict, positions: list[int], freq_factors: list[float] | None):
    """ggml_rope_ext (NEOX) on unit vectors (1 in the first half, 0 in the second): float32[n, n_dims] whose
    first half is cos * mscale and second half sin * mscale."""
    n_dims, n = p["n_dims"], len(positions)
    ctx = base.ggml_init(InitParams(64 << 20, None, False))
    try:
        a = base.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_dims, 1, n)
        pos = base.ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n)
        c = None
        if freq_factors is not None:
            c = base.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, len(freq_factors))
            np.ctypeslib.as_array((ctypes.c_float * len(freq_factors)).from_address(base.ggml_get_data(c)))[:] = \
                freq_factors
        x = np.ctypeslib.as_array((ctypes.c_float * (n_dims * n)).from_address(base.ggml_get_data(a)))
        x[:] = np.tile(np.r_[np.ones(n_dims // 2), np.zeros(n_dims // 2)], n)
        np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(base.ggml_get_data(pos)))[:] = positions
        out = base.ggml_rope_ext(ctx, a, pos, c, n_dims, GGML_ROPE_TYPE_NEOX, p["n_ctx_orig"], p["freq_base"],
                                 p["freq_scale"], p["ext_factor"], p["attn_factor"], p["beta_fast"], p["beta_slow"])
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        if cpu.ggml_graph_compute_with_ctx(ctx, graph, 1) != 0:
            raise SystemExit("ggml_graph_compute_with_ctx failed")
        y = np.ctypeslib.as_array((ctypes.c_float * (n_dims * n)).from_address(base.ggml_get_data(out)))
        return y.reshape(n, n_dims).copy()
    finally:
        base.ggml_free(ctx)


def _strided(t: GgmlTensor, heads: int) -> np.ndarray:
    """An F32 tensor's [ne2, min(ne1, heads), ne0] elements, read through its strides."""
    ne, nb = list(t.ne), list(t.nb)
    extent = sum((ne[k] - 1) * nb[k] for k in range(4)) + 4
    buf = np.ctypeslib.as_array((ctypes.c_uint8 * extent).from_address(t.data))
    arr = np.lib.stride_tricks.as_strided(buf.view(np.float32) if nb[0] == 4 and extent % 4 == 0 else buf,
                                          shape=(ne[2], ne[1], ne[0]), strides=(nb[2], nb[1], nb[0]))
    return np.array(arr[:, :heads, :], dtype=np.float32)


def capture_graph_rope(base, model_path: Path, tokens: list[int], heads: int = 1, **overrides) -> dict:
    """Decode `tokens` with llama.cpp and return the first ROPE node's arguments (its op_params), positions,
    input and output (the first `heads` heads). `overrides`: llama_context_params fields."""
    import llama_cpp

    captured: dict = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def callback(t_ptr, ask, user_data):
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        is_rope = base.ggml_op_name(t.op) == b"ROPE"
        if ask:
            return is_rope and not captured
        if is_rope and not captured:
            op = list(t.op_params)
            fl = np.array(op, dtype=np.int32).view(np.float32)
            src0 = ctypes.cast(t.src[0], ctypes.POINTER(GgmlTensor)).contents
            src1 = ctypes.cast(t.src[1], ctypes.POINTER(GgmlTensor)).contents
            n_pos = src1.ne[0]
            positions = np.ctypeslib.as_array((ctypes.c_int32 * n_pos).from_address(src1.data)).tolist()
            captured.update(
                node=t.name.decode(), n_dims=op[1], mode=op[2], n_ctx_orig=op[4], freq_base=float(fl[5]),
                freq_scale=float(fl[6]), ext_factor=float(fl[7]), attn_factor=float(fl[8]),
                beta_fast=float(fl[9]), beta_slow=float(fl[10]), has_freq_factors=bool(t.src[2]),
                positions=positions, x_in=_strided(src0, heads), x_out=_strided(t, heads))
        return True

    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {model_path}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 256, 64, 64
    cparams.n_threads = cparams.n_threads_batch = N_THREADS
    for k, v in overrides.items():
        setattr(cparams, k, v)
    cparams.cb_eval = callback
    cparams.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
        raise SystemExit("llama_decode failed")
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    if not captured:
        raise SystemExit(f"no ROPE node seen for {model_path}")
    return captured


PARAM_KEYS = ("n_dims", "mode", "n_ctx_orig", "freq_base", "freq_scale", "ext_factor", "attn_factor",
              "beta_fast", "beta_slow")


def _floats(a):
    """Nested lists of the float32 values, each as its shortest decimal that reads back as the same float32."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 0:
        return float(str(a))
    return [_floats(x) for x in a]


def record_tables(model_path: Path, yarn_path: Path, tiny_path: Path, info: dict) -> dict:
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    base, cpu = _libs()
    prompt = [151644, 8948, 198, 2610, 525, 264]  # "<|im_start|>system\nYou are a" (any ids will do)
    yarn, linear, none = (llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR,
                          llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE)
    third = float(np.float32(1) / np.float32(3))
    yarn_file = "default model + qwen2.rope.scaling.{type=yarn, factor=4, original_context_length=32768} in the file"
    yarn3 = "default model, --rope-scaling yarn --rope-scale 3 --yarn-orig-ctx 8192 --rope-freq-base 500000"
    tiny = ("tests/tiny_model.py's model + qwen2.rope.scaling.{type=yarn, factor=8, original_context_length=64, "
            "attn_factor=0.875} in the file")
    runs = {  # name: (file, what it is, llama_context_params overrides)
        "qwen05_yarn4_file": (yarn_path, yarn_file, {}),
        "qwen05_yarn4_cli": (model_path, "default model, --rope-scaling yarn --rope-scale 4 --yarn-orig-ctx 32768",
                             {"rope_scaling_type": yarn, "rope_freq_scale": 0.25, "yarn_orig_ctx": 32768}),
        "qwen05_yarn3_cli": (model_path, yarn3, {"rope_scaling_type": yarn, "rope_freq_scale": third,
                                                 "yarn_orig_ctx": 8192, "rope_freq_base": 500000.0}),
        "qwen05_linear2_cli": (model_path, "default model, --rope-scaling linear --rope-scale 2",
                               {"rope_scaling_type": linear, "rope_freq_scale": 0.5}),
        "qwen05_none": (model_path, "default model as it is (no scaling)", {}),
        "qwen05_none_cli_scale": (model_path, "default model, --rope-scaling none --rope-scale 4 (none wins)",
                                  {"rope_scaling_type": none, "rope_freq_scale": 0.25}),
        "tiny_yarn8_file": (tiny_path, tiny, {}),
    }
    graphs = {}
    for name, (path, what, overrides) in runs.items():
        with suppress_stdout_stderr(disable=False):  # llama.cpp's load log
            g = capture_graph_rope(base, path, prompt if "qwen05" in name else [1, 2, 3, 4, 5], **overrides)
        print(f"  graph {name:<22} " + " ".join(f"{k}={g[k]}" for k in PARAM_KEYS))
        graphs[name] = {"what": what, "context_params": {k: float(v) for k, v in overrides.items()},
                        **{k: g[k] for k in (*PARAM_KEYS, "node", "has_freq_factors", "positions")},
                        "x_in": _floats(g["x_in"]), "x_out": _floats(g["x_out"])}
    tables = []
    for name, ff in [(n, None) for n in runs] + [("tiny_yarn8_file", TINY_FREQ_FACTORS)]:
        p = {k: graphs[name][k] for k in PARAM_KEYS}
        y = ggml_rope_table(base, cpu, p, POSITIONS, ff)
        half = p["n_dims"] // 2
        tables.append({"graph": name, "params": p, "freq_factors": ff, "corr_dims": ggml_corr_dims(base, p),
                       "positions": POSITIONS, "cos": _floats(y[:, :half]), "sin": _floats(y[:, half:])})
        print(f"  table {name:<22} ff={ff is not None} corr_dims={tables[-1]['corr_dims']} mscale={y[0, 0]!r}")
    return {
        "description": "llama.cpp's rope arguments and tables. graphs[name]: the op_params of the first ROPE "
        "node (Qcur of layer 0) of llama.cpp's graph for that file/context parameters, its positions, and its "
        "input/output x_in/x_out[position][head 0][n_dims] (float32 values). tables[i]: ggml_rope_ext (mode "
        "NEOX, CPU backend) with graphs[graph]'s arguments (and freq_factors as src2 when given) applied to "
        "unit vectors, so cos[p][i] = cos(theta_i(p)) * mscale and sin likewise; corr_dims from "
        "ggml_rope_yarn_corr_dims. All numbers come from llama-cpp-python's bundled libllama/libggml.",
        **info,
        "graphs": graphs,
        "tables": tables,
    }


# ---------------------------------------------------------------------------------------------------------
# Greedy continuations on the YaRN copy
# ---------------------------------------------------------------------------------------------------------

GREEDY_N_CTX = 1024
MAX_NEW_TOKENS = 32
PROMPTS = [
    {"name": "coding", "messages": [{"role": "user", "content": "Write a Python function that reverses a string."}]},
    {"name": "factual", "messages": [{"role": "user", "content": "What is the boiling point of water at sea level?"}]},
    {"name": "system_user", "messages": [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why do leaves change colour in autumn?"}]},
]


def _llm(path: Path, **overrides):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=GREEDY_N_CTX, n_batch=512, n_ubatch=512, n_threads=N_THREADS,
                           n_threads_batch=N_THREADS, logits_all=False, flash_attn=False, seed=0, verbose=False,
                           **overrides)


def _greedy(llm, n_vocab: int, prompt_ids: list[int]) -> tuple[list[int], list[dict], list[np.ndarray]]:
    run = greedy_run(llm, n_vocab, prompt_ids, MAX_NEW_TOKENS)
    return run["gen"], run["steps"], run["raw"]


def record_greedy(model_path: Path, yarn_path: Path, info: dict) -> dict:
    import llama_cpp

    llm = _llm(yarn_path)
    cli = _llm(model_path, rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, rope_freq_scale=0.25,
               yarn_orig_ctx=32768)
    plain = _llm(model_path)
    n_vocab = llm.n_vocab()
    cases, identical = [], True
    for p in PROMPTS:
        ids = llm.tokenize(render_chatml(p["messages"]).encode("utf-8"), add_bos=False, special=True)
        gen, steps, raw = _greedy(llm, n_vocab, ids)
        gen2, _, raw2 = _greedy(cli, n_vocab, ids)
        same = gen == gen2 and all(np.array_equal(a, b) for a, b in zip(raw, raw2))
        identical &= same
        plain_gen, _, plain_raw = _greedy(plain, n_vocab, ids)
        moved = float(np.abs(raw[0] - plain_raw[0]).max())
        cases.append({"name": p["name"], "messages": p["messages"], "prompt_ids": [int(i) for i in ids],
                      "generated_ids": gen, "generated_text": llm.detokenize(gen, special=True).decode("utf-8", "replace"),
                      "unscaled_generated_ids": plain_gen, "max_abs_logit_change_vs_unscaled_step0": round(moved, 4),
                      "steps": steps})
        print(f"  greedy {p['name']:<12} prompt={len(ids)} gen={len(gen)} cli_identical={same} "
              f"yarn-vs-plain step0 max diff {moved:.3f}  {cases[-1]['generated_text'][:60]!r}")
    for m in (llm, cli, plain):
        m.close()
    return {
        "description": "llama.cpp greedy chat continuations (argmax of raw logits) on a copy of the default model "
        "with qwen2.rope.scaling.type=yarn, factor=4, original_context_length=32768 added to its metadata. "
        "steps as in greedy.json (top-64 logits rounded to 4 decimals, margin, mean; step 0 after the prompt in "
        "one llama_decode, then one token per llama_decode). cli_override_identical: the unmodified model with "
        "rope_scaling_type=yarn, rope_freq_scale=0.25, yarn_orig_ctx=32768 as context parameters gave "
        "bit-identical logits at every step. unscaled_generated_ids: the unmodified model's greedy tokens, for "
        "contrast.",
        **info,
        "metadata_added": {f"qwen2.{k}": v for k, v in YARN_4X.items()},
        "settings": {"n_ctx": GREEDY_N_CTX, "n_batch": 512, "n_threads": N_THREADS, "flash_attn": False,
                     "kv_cache_type": "f16", "max_new_tokens": MAX_NEW_TOKENS, "eot_ids": list(EOT_IDS),
                     "top_k_recorded": TOP_K},
        "cli_override_identical": identical,
        "n_vocab": n_vocab,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--only", choices=["tables", "greedy"])
    args = ap.parse_args(argv)
    info = common_info(args.model, sha256_file(args.model))
    info["recorded_by"] = "tools/record_rope_goldens.py"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        yarn_path = write_with_metadata(args.model, Path(tmp) / "yarn4.gguf", YARN_4X)
        tiny_plain = Path(tmp) / "tiny.gguf"
        write_tiny_qwen2(tiny_plain)
        tiny_path = write_with_metadata(tiny_plain, Path(tmp) / "tiny_yarn.gguf", TINY_YARN)
        print(f"  wrote the YaRN copies in {time.time() - t0:.1f}s")
        if args.only in (None, "tables"):
            out = record_tables(args.model, yarn_path, tiny_path, info)
            out["tiny_metadata_added"] = {f"qwen2.{k}": v for k, v in TINY_YARN.items()}
            TABLES_OUT.write_text(_compact(json.dumps(out, indent=1)) + "\n", encoding="utf-8")
            print(f"tables -> {TABLES_OUT.relative_to(ROOT)} ({TABLES_OUT.stat().st_size / 1024:.0f} KiB)")
        if args.only in (None, "greedy"):
            out = record_greedy(args.model, yarn_path, info)
            GREEDY_OUT.write_text(_compact(json.dumps(out, ensure_ascii=False, indent=1)) + "\n", encoding="utf-8")
            print(f"greedy -> {GREEDY_OUT.relative_to(ROOT)} ({GREEDY_OUT.stat().st_size / 1024:.0f} KiB), "
                  f"cli_override_identical={out['cli_override_identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
