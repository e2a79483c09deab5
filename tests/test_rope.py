"""Rope scaling (YaRN, linear) against llama.cpp, through goldens recorded from its own code
(tools/record_rope_goldens.py): the ggml_rope_ext arguments llama.cpp derives from a file's metadata or its
command line, the angle tables (cos and sin times mscale) ggml_rope_ext computes with them, and greedy
chat continuations of the default model with YaRN metadata. Also: how the metadata is read and refused,
and which --ctx an engine accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcpu.config import ModelConfig, RopeOverrides
from qcpu.errors import QcpuError
from qcpu.gguf_file import GGUFFile
from qcpu.rope import Rope, apply_rope, rope_qkv
from tests.rope_support import YARN_4X, write_with_metadata
from tests.tiny_model import write_tiny_qwen2

GOLDEN = Path(__file__).parent / "golden"
ROPE = json.loads((GOLDEN / "rope_yarn.json").read_text())
GREEDY = json.loads((GOLDEN / "yarn_greedy.json").read_text())
TINY_YARN = {k.removeprefix("qwen2."): v for k, v in ROPE["tiny_metadata_added"].items()}

# The default model's shape (tests/test_memory.py's QWEN05), for configs that need no file.
QWEN05 = ModelConfig(n_layers=24, dim=896, ffn_dim=4864, n_heads=14, n_kv_heads=2, vocab_size=151936,
                     context_length=32768, rope_theta=1e6, rms_eps=1e-6)
# The graphs' command-line settings, as qcpu's options (the file ones are read from files below).
CLI = {"qwen05_yarn4_cli": RopeOverrides("yarn", 4.0, 32768), "qwen05_linear2_cli": RopeOverrides("linear", 2.0),
       "qwen05_yarn3_cli": RopeOverrides("yarn", 3.0, 8192, 500000.0), "qwen05_none": None,
       "qwen05_none_cli_scale": RopeOverrides("none", 4.0)}


def _rope_of(params: dict, freq_factors=None) -> Rope:
    """A Rope holding exactly the ggml_rope_ext arguments llama.cpp recorded."""
    return Rope(head_dim=params["n_dims"], theta=params["freq_base"], freq_scale=params["freq_scale"],
                ext_factor=params["ext_factor"], attn_factor=params["attn_factor"], beta_fast=params["beta_fast"],
                beta_slow=params["beta_slow"], n_ctx_orig=params["n_ctx_orig"],
                freq_factors=tuple(freq_factors) if freq_factors else None)


def _arguments(rope: Rope) -> dict:
    return {"n_dims": rope.head_dim, "mode": 2, "n_ctx_orig": rope.n_ctx_orig, "freq_base": rope.theta,
            "freq_scale": rope.freq_scale, "ext_factor": rope.ext_factor, "attn_factor": rope.attn_factor,
            "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow}


@pytest.fixture(scope="module")
def tiny_yarn(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("yarn")
    write_tiny_qwen2(d / "tiny.gguf")
    return write_with_metadata(d / "tiny.gguf", d / "tiny_yarn.gguf", TINY_YARN)


@pytest.fixture(scope="module")
def qwen05_yarn_header(real_model_path, tmp_path_factory) -> Path:
    """The default model's header with YaRN metadata, its tensor data a sparse (unwritten) tail."""
    return write_with_metadata(real_model_path, tmp_path_factory.mktemp("yarn") / "yarn4.gguf", YARN_4X,
                               data=False)


# -- the angles -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ROPE["tables"], ids=lambda t: t["graph"] + ("+freqs" if t["freq_factors"] else ""))
def test_angle_tables_match_ggml_rope_ext(table):
    """cos/sin * mscale at positions 0..131071 and negative ones (a shift's deltas) equal ggml_rope_ext's.
    The angles are the same float32 numbers; cos/sin may differ in the last bit or two, as glibc's cosf/sinf
    are not always correctly rounded (llama.cpp's values lie within 1.05 float32 ulps of the exact ones
    here, ours within 0.5, each then rounded again by the mscale product)."""
    rope = _rope_of(table["params"], table["freq_factors"])
    assert list(rope.corr_dims) == table["corr_dims"]  # ggml_rope_yarn_corr_dims
    positions = np.array(table["positions"])
    want_cos, want_sin = np.array(table["cos"], np.float32), np.array(table["sin"], np.float32)
    # mscale: at position 0, cos(0) * mscale is mscale itself
    assert positions[0] == 0 and np.float32(rope.mscale) == want_cos[0, 0]
    cos, sin = rope.cos_sin(positions)
    for ours, want in ((cos, want_cos), (sin, want_sin)):
        ulp = np.spacing(np.abs(want))
        assert (np.abs(ours - want) <= 2 * ulp).all(), float((np.abs(ours - want) / ulp).max())
        assert (ours == want).mean() > 0.97
    # a context shift's tables: the same angles, as a pure rotation (no mscale: see Rope.shift_cos_sin)
    m = np.float32(rope.mscale)
    shift_cos, shift_sin = rope.shift_cos_sin(positions)
    for ours, want in ((shift_cos, want_cos / m), (shift_sin, want_sin / m)):
        assert (np.abs(ours - want) <= 4 * np.spacing(np.abs(want))).all()
    assert np.allclose(shift_cos**2 + shift_sin**2, 1.0, atol=2e-6)


def test_yarn_changes_the_angles_where_llama_cpp_does():
    """A check of the goldens' sense: with YaRN x4 the fast pairs (below corr_dims[0]) keep their angles,
    the slow ones (above corr_dims[1]) turn 4x slower, and every value is scaled by mscale 1 + 0.1 ln 4."""
    table = next(t for t in ROPE["tables"] if t["graph"] == "qwen05_yarn4_file")
    plain = next(t for t in ROPE["tables"] if t["graph"] == "qwen05_none")
    low, high = table["corr_dims"]
    assert (low, high) == (11.0, 20.0)
    mscale = np.float32(table["cos"][0][0])
    assert abs(mscale - (1 + 0.1 * np.log(4))) < 1e-6
    p = table["positions"].index(100)
    yarn = np.arctan2(table["sin"][p], table["cos"][p])
    base = np.arctan2(plain["sin"][p], plain["cos"][p])
    assert np.allclose(yarn[: int(low)], base[: int(low)], atol=1e-5)
    rope = Rope(head_dim=64, theta=1e6)
    angles = 100 * 1e6 ** (-np.arange(32) / 32)
    slow = slice(int(high) + 1, 32)
    assert np.allclose(yarn[slow], angles[slow] / 4, rtol=1e-4)
    assert np.allclose(rope.cos_sin(np.array([100]))[0][0], plain["cos"][p], atol=1e-7)


@pytest.mark.parametrize("name", [n for n in ROPE["graphs"] if n.startswith("qwen05")])
def test_graph_rotation_matches_llama_cpp(name):
    """llama.cpp's own rotation of layer 0's queries (its graph's ROPE node, input and output recorded):
    ours, with the arguments of our Rope, gives the same numbers."""
    g = ROPE["graphs"][name]
    x = np.array(g["x_in"], np.float32)  # [positions, 1 head, n_dims]
    cos, sin = _rope_of(g).cos_sin(np.array(g["positions"]))
    out = apply_rope(x, cos, sin)
    want = np.array(g["x_out"], np.float32)
    assert np.abs(out - want).max() <= 4e-6 * np.abs(want).max()


# -- the arguments: from a file's metadata, or the command line -----------------------------------------

@pytest.mark.parametrize("name", list(CLI))
def test_command_line_settings_give_llama_cpp_arguments(name):
    """--rope-scaling/--rope-scale/--yarn-orig-ctx/--rope-freq-base give the ggml_rope_ext arguments that
    llama.cpp's context parameters of the same meaning give (attn_factor's float32 arithmetic included)."""
    g = ROPE["graphs"][name]
    rope = Rope.from_config(QWEN05.with_rope_overrides(CLI[name]))
    assert _arguments(rope) == {k: g[k] for k in _arguments(rope)}


def test_file_metadata_gives_llama_cpp_arguments(tiny_yarn):
    """rope.scaling.{type, factor, original_context_length, attn_factor} read from a file."""
    cfg = ModelConfig.from_gguf(GGUFFile(tiny_yarn))
    assert (cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_scaling_orig_ctx,
            cfg.rope_scaling_attn_factor) == ("yarn", 8.0, 64, 0.875)
    g = ROPE["graphs"]["tiny_yarn8_file"]
    rope = Rope.from_config(cfg)
    assert _arguments(rope) == {k: g[k] for k in _arguments(rope)}
    assert rope.describe() == "yarn, factor 8, original context 64"
    assert cfg.rope_scaled and cfg.max_context == 512  # 64 * 8 (above the file's trained 256)


@pytest.mark.model
def test_default_model_with_yarn_metadata_gives_llama_cpp_arguments(qwen05_yarn_header, real_model_path):
    """The default model with Qwen2.5's 128K recipe in its metadata: llama.cpp's arguments, and the same
    Rope as the command-line override the greedy test below uses."""
    cfg = ModelConfig.from_gguf(GGUFFile(qwen05_yarn_header))
    g = ROPE["graphs"]["qwen05_yarn4_file"]
    rope = Rope.from_config(cfg)
    assert _arguments(rope) == {k: g[k] for k in _arguments(rope)}
    plain = ModelConfig.from_gguf(GGUFFile(real_model_path))
    assert Rope.from_config(plain.with_rope_overrides(RopeOverrides("yarn", 4.0, 32768))) == rope
    assert cfg.max_context == 131072 and plain.max_context == 32768
    assert GREEDY["cli_override_identical"]  # in llama.cpp too, file metadata and options agree bit for bit


def test_no_scaling_is_the_plain_rope(tiny_yarn, tmp_path):
    write_tiny_qwen2(tmp_path / "plain.gguf")
    cfg = ModelConfig.from_gguf(GGUFFile(tmp_path / "plain.gguf"))
    rope = Rope.from_config(cfg)
    assert (rope.freq_scale, rope.ext_factor, rope.mscale, rope.describe()) == (1.0, 0.0, 1.0, "none")
    assert not cfg.rope_scaled and cfg.max_context == cfg.context_length
    # llama.cpp's old key: rope.scale_linear (type defaults to linear)
    old = write_with_metadata(tmp_path / "plain.gguf", tmp_path / "old.gguf", {"rope.scale_linear": 2.0})
    rope = Rope.from_config(ModelConfig.from_gguf(GGUFFile(old)))
    assert (rope.scaling_type, rope.freq_scale, rope.ext_factor) == ("linear", 0.5, 0.0)
    # type none ignores a factor, from the file or the command line
    none = write_with_metadata(tmp_path / "plain.gguf", tmp_path / "none.gguf",
                               {"rope.scaling.type": "none", "rope.scaling.factor": 4.0})
    assert Rope.from_config(ModelConfig.from_gguf(GGUFFile(none))).freq_scale == 1.0


@pytest.mark.parametrize("kind", ["longrope", "su", "", "YARN"])
def test_unknown_scaling_type_is_refused_in_one_line(tmp_path, kind):
    write_tiny_qwen2(tmp_path / "plain.gguf")
    bad = write_with_metadata(tmp_path / "plain.gguf", tmp_path / "bad.gguf", {"rope.scaling.type": kind})
    with pytest.raises(QcpuError) as e:
        ModelConfig.from_gguf(GGUFFile(bad))
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and repr(kind) in msg and "rope scaling type" in msg


@pytest.mark.parametrize("keys", [{"rope.scaling.factor": -4.0}, {"rope.scaling.factor": "4"},
                                  {"rope.scaling.attn_factor": 0.0}, {"rope.scaling.type": 3}])
def test_bad_scaling_values_are_refused_in_one_line(tmp_path, keys):
    write_tiny_qwen2(tmp_path / "plain.gguf")
    bad = write_with_metadata(tmp_path / "plain.gguf", tmp_path / "bad.gguf", keys)
    with pytest.raises(QcpuError) as e:
        ModelConfig.from_gguf(GGUFFile(bad))
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_rope_freqs_tensor_divides_the_angles(tmp_path):
    """rope_freqs.weight (F32[head_dim / 2]) is read and applied as ggml_rope_ext applies freq factors
    (the table test above checks the numbers against ggml with these factors); a bad one is refused."""
    table = next(t for t in ROPE["tables"] if t["freq_factors"])
    write_tiny_qwen2(tmp_path / "plain.gguf")
    ff = np.array(table["freq_factors"], np.float32)
    path = write_with_metadata(tmp_path / "plain.gguf", tmp_path / "ff.gguf", TINY_YARN, tensors={"rope_freqs.weight": ff})
    rope = Rope.from_config(ModelConfig.from_gguf(GGUFFile(path)))
    assert rope.freq_factors == tuple(float(v) for v in ff)
    cos, sin = rope.cos_sin(np.array(table["positions"]))
    assert np.allclose(cos, table["cos"], atol=2e-7) and np.allclose(sin, table["sin"], atol=2e-7)
    for bad in (np.zeros(8, np.float32), np.ones(5, np.float32)):
        p = write_with_metadata(tmp_path / "plain.gguf", tmp_path / "bad.gguf", {}, tensors={"rope_freqs.weight": bad})
        with pytest.raises(QcpuError, match="rope_freqs"):
            ModelConfig.from_gguf(GGUFFile(p))


def test_overrides_out_of_range_are_refused():
    for o in (RopeOverrides("bogus"), RopeOverrides(scale=0.0), RopeOverrides(scale=float("nan")),
              RopeOverrides(yarn_orig_ctx=0), RopeOverrides(freq_base=-1.0)):
        with pytest.raises(QcpuError):
            QWEN05.with_rope_overrides(o)
    assert QWEN05.with_rope_overrides(None) is QWEN05 and QWEN05.with_rope_overrides(RopeOverrides()) is QWEN05


# -- which --ctx an engine takes ------------------------------------------------------------------------

def test_ctx_above_trained_needs_rope_scaling(tmp_path, tiny_yarn):
    from qcpu.generate import Engine

    write_tiny_qwen2(tmp_path / "plain.gguf")  # trained context 256
    with pytest.raises(QcpuError) as e:
        Engine.load(tmp_path / "plain.gguf", ctx=1000)
    msg = str(e.value)
    assert "\n" not in msg and "trained context of 256" in msg and "--rope-scaling yarn --rope-scale 4" in msg
    engine = Engine.load(tmp_path / "plain.gguf", ctx=1000, rope=RopeOverrides("yarn", 4.0))
    assert engine.capacity == 1000 and engine.model.rope.describe() == "yarn, factor 4, original context 256"
    assert engine.model.config.max_context == 1024
    with pytest.raises(QcpuError, match="raise --rope-scale"):
        Engine.load(tmp_path / "plain.gguf", ctx=1025, rope=RopeOverrides("yarn", 4.0))
    assert Engine.load(tiny_yarn, ctx=512).capacity == 512  # the file's own scaling: 64 x 8
    with pytest.raises(QcpuError):
        Engine.load(tiny_yarn, ctx=513)
    assert Engine.load(tmp_path / "plain.gguf", ctx=256).capacity == 256


# -- llama.cpp's greedy tokens on the default model with YaRN -------------------------------------------

@pytest.fixture(scope="module")
def yarn_engine(real_model_path):
    from qcpu.generate import Engine

    return Engine.load(real_model_path, ctx=1024, rope=RopeOverrides("yarn", 4.0, 32768))


@pytest.mark.parametrize("case", GREEDY["cases"], ids=lambda c: c["name"])
def test_yarn_greedy_logits_match_llama_cpp(yarn_engine, case):
    """The default model with YaRN x4 (the same Rope as its metadata gives: see above), teacher-forced on
    llama.cpp's greedy tokens for that file: close logits at every position, with test_llama_golden's
    tolerances. Without YaRN the first position alone is off by more than 1.3 (recorded in the golden)."""
    from tests.test_llama_golden import LOGIT_TOL, MEAN_TOL, MEDIAN_TOL, TOP1_MARGIN

    engine = yarn_engine
    text = engine.template.render(case["messages"], add_generation_prompt=True)
    assert engine.tokenizer.encode(text) == case["prompt_ids"]
    gen, steps = case["generated_ids"], case["steps"]
    assert case["max_abs_logit_change_vs_unscaled_step0"] > LOGIT_TOL  # the golden can tell YaRN from none
    engine.reset()
    logits = engine.feed(case["prompt_ids"])
    diffs, means, flips = [], [], []
    for i, step in enumerate(steps):
        ids = np.array(step["ids"])
        diffs.append(float(np.abs(logits[ids] - np.array(step["logits"], np.float32)).max()))
        means.append(abs(float(logits.astype(np.float64).mean()) - step["mean"]))
        if int(np.argmax(logits)) != gen[i]:
            flips.append((i, step["margin"]))
        if i + 1 < len(steps):
            logits = engine.feed([gen[i]])
    print(f"{case['name']}: {len(steps)} positions, max diff {max(diffs):.4f}, median {np.median(diffs):.4f}, "
          f"flips {flips}")
    assert max(diffs) < LOGIT_TOL
    assert np.median(diffs) < MEDIAN_TOL
    assert max(means) < MEAN_TOL
    assert [(i, m) for i, m in flips if m > TOP1_MARGIN] == []


# -- the command line ------------------------------------------------------------------------------------

def _qcpu(capsys, *argv) -> tuple[int, str, str]:
    """Run `qcpu ARGV` in this process, as the entry point does: (exit status, stdout, stderr)."""
    import sys

    import qcpu.cli

    saved = sys.argv
    sys.argv = ["qcpu", *map(str, argv)]
    try:
        qcpu.cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_options_and_info(capsys, tmp_path, tiny_yarn):
    write_tiny_qwen2(tmp_path / "plain.gguf")
    code, out, _ = _qcpu(capsys, "info", tiny_yarn)
    assert code == 0
    assert "rope_scaling: yarn, factor 8, original context 64 (mscale 1.0570)" in out  # 0.875 * (1 + 0.1 ln 8)
    assert "context_length: 256 tokens (trained; up to 512 with its rope scaling)" in out
    code, out, _ = _qcpu(capsys, "info", tmp_path / "plain.gguf")
    assert "rope_scaling: none" in out and "a larger --ctx needs --rope-scaling yarn --rope-scale N" in out

    code, out, err = _qcpu(capsys, "generate", tmp_path / "plain.gguf", "hi", "-n", "1", "--ctx", "1000")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and out == "" and len(lines) == 1 and "--rope-scaling yarn --rope-scale 4" in lines[0]
    code, out, err = _qcpu(capsys, "generate", tmp_path / "plain.gguf", "hi", "-n", "2", "--temp", "0",
                           "--ctx", "1000", "--rope-scaling", "yarn", "--rope-scale", "4")
    assert code == 0, err
    for bad in (["--rope-scaling", "longrope"], ["--rope-scale", "0"], ["--rope-scale", "nan"],
                ["--yarn-orig-ctx", "-5"], ["--rope-freq-base", "-1"]):
        code, out, err = _qcpu(capsys, "generate", tmp_path / "plain.gguf", "hi", "-n", "1", *bad)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (bad, err)


@pytest.mark.parametrize("n", [1, 3])
def test_rope_qkv_is_the_bias_add_then_apply_rope_bit_for_bit(n):
    """The model's one-call epilogue of the Q/K/V projections gives the bits of NumPy's adds and apply_rope."""
    rng = np.random.default_rng(n)
    hd = 64
    q, k, v = (rng.standard_normal((n, rows)).astype(np.float32) * 30 for rows in (4 * hd, 2 * hd, 2 * hd))
    bq, bk, bv = (rng.standard_normal(x.shape[1]).astype(np.float32) * 30 for x in (q, k, v))
    cos, sin = Rope.from_config(QWEN05).cos_sin(np.arange(100, 100 + n) * 37)
    got = rope_qkv(q, k, v, bq, bk, bv, hd, cos, sin)
    want = (apply_rope((q + bq).reshape(n, 4, hd), cos, sin), apply_rope((k + bk).reshape(n, 2, hd), cos, sin),
            (v + bv).reshape(n, 2, hd))
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and np.array_equal(g, w)
