"""`qcpu bench`'s measuring function on the tiny model: edge sizes run or fail in one line."""

import pytest

from qcpu.bench import bench_qcpu
from qcpu.errors import QcpuError
from tests.tiny_model import write_tiny_qwen2


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_qwen2(path)  # trained context: 256 tokens
    return path


def test_one_token_prompt(tiny_path):
    # -p 1 used to index the prompt's second token for tg (IndexError).
    result = bench_qcpu(tiny_path, n_prompt=1, n_gen=2, repeats=1, threads=1)
    assert result["pp_tps"] > 0 and result["tg_tps"] > 0


@pytest.mark.parametrize("n_prompt,n_gen", [(10**12, 1), (2**62, 4), (250, 7)])
def test_beyond_the_trained_context_is_one_line(tiny_path, n_prompt, n_gen):
    # Used to try to allocate the KV cache (MemoryError / "array is too big" tracebacks).
    with pytest.raises(QcpuError, match="trained for"):
        bench_qcpu(tiny_path, n_prompt=n_prompt, n_gen=n_gen, repeats=1, threads=1)


def test_the_whole_trained_context_runs(tiny_path):
    assert bench_qcpu(tiny_path, n_prompt=250, n_gen=6, repeats=1, threads=1)["n_prompt"] == 250


def test_depth_runs_after_that_many_tokens_and_counts_in_the_context(tiny_path):
    result = bench_qcpu(tiny_path, n_prompt=8, n_gen=4, repeats=2, threads=1, depth=200)
    assert result["depth"] == 200 and result["pp_tps"] > 0 and result["tg_tps"] > 0
    with pytest.raises(QcpuError, match="--depth 250"):
        bench_qcpu(tiny_path, n_prompt=8, n_gen=4, repeats=1, threads=1, depth=250)


def test_llama_cpp_runs_without_qcpus_thread_pool_settings(monkeypatch):
    """The environment handed to llama.cpp drops what qcpu set for its own OpenMP/OpenBLAS pools (inherited,
    they changed llama.cpp's speed), but keeps whatever the user set, including those names."""
    import qcpu
    from qcpu.bench import foreign_env

    assert set(qcpu.ENV_DEFAULTS) <= {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT"}
    monkeypatch.setattr(qcpu, "ENV_DEFAULTS", {"GOMP_SPINCOUNT": "2000", "OMP_WAIT_POLICY": "passive"})
    monkeypatch.setenv("GOMP_SPINCOUNT", "2000")  # qcpu's value: dropped
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")  # the user's own value: kept
    monkeypatch.setenv("QCPU_TEST_OTHER", "x")
    env = foreign_env()
    assert "GOMP_SPINCOUNT" not in env
    assert env["OMP_WAIT_POLICY"] == "active" and env["QCPU_TEST_OTHER"] == "x"


def test_thread_list_runs_each_count(tiny_path):
    """`-t 1,2` (llama-bench's form) measures once per thread count, in order."""
    import json
    import platform
    import subprocess
    import sys

    import numba

    counts = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1, 1]
    proc = subprocess.run([sys.executable, "-m", "qcpu.cli", "bench", str(tiny_path), "-p", "4", "-n", "2", "-r", "1",
                           "-t", ",".join(map(str, counts)), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [r["threads"] for r in json.loads(proc.stdout)] == counts
    assert all(r["n_gen"] == 2 for r in json.loads(proc.stdout))  # -n: llama-bench's name for it
    # the pool the kernels ran on, as Numba reports it: TBB on x86-64, where pyproject.toml installs it
    want = {"tbb"} if platform.machine() in ("x86_64", "AMD64") else {"omp", "workqueue"}
    assert {r["threading_layer"] for r in json.loads(proc.stdout)} <= want
    bad = subprocess.run([sys.executable, "-m", "qcpu.cli", "bench", str(tiny_path), "-t", "1,x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_speculative_bench_on_the_tiny_model(tiny_path, tmp_path):
    """`qcpu bench --lookup` / `--draft`: both modes on every prompt that fits, replies identical to plain
    decoding's, the JSON fields; the tiny model's 256-token context skips the long code-edit prompts."""
    import json

    from typer.testing import CliRunner

    from qcpu.cli import app

    runner = CliRunner()
    for extra, modes in ((["--lookup"], {"plain", "lookup", "lookup always"}), (["--draft", str(tiny_path)], {"plain", "draft"})):
        r = runner.invoke(app, ["bench", str(tiny_path), "-n", "6", "--json", *extra])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout.strip().splitlines()[-1])
        chat, edit = out["sets"]["chat"], out["sets"]["edit"]
        assert chat["prompts"] == 10 and edit["skipped"] == 3 and edit["prompts"] == 0
        assert chat["identical"] and set(chat["modes"]) == modes
        assert all(m["tokens"] == chat["modes"]["plain"]["tokens"] > 0 for m in chat["modes"].values())
        if "--draft" in extra:  # the model drafting for itself: every draft taken
            assert chat["modes"]["draft"]["accepted"] == chat["modes"]["draft"]["drafted"] > 0
