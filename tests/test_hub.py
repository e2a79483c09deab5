"""`REPO[:QUANT]` models: name parsing, file choice, and `qcpu pull` / `qcpu list` / `qcpu chat REPO:QUANT`
against a stand-in hub on 127.0.0.1 (HF_ENDPOINT), never the real one."""

import os
import subprocess
import sys

import pytest

from qcpu import hub
from qcpu.errors import QcpuError
from tests.hf_standin import StandInHub
from tests.tiny_model import write_tiny_qwen2

CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


@pytest.mark.parametrize("spec, repo, quant", [
    ("Qwen/Qwen1.5-4B-Chat-GGUF:q4_k_m", "Qwen/Qwen1.5-4B-Chat-GGUF", "Q4_K_M"),
    ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", None),
    ("bartowski/Qwen2.5-7B-Instruct-GGUF:IQ4_XS", "bartowski/Qwen2.5-7B-Instruct-GGUF", "IQ4_XS"),
    ("a/b:fp16", "a/b", "F16"),
])
def test_parse_spec(spec, repo, quant):
    assert hub.looks_like_repo(spec)
    assert hub.parse_spec(spec) == (repo, quant)


@pytest.mark.parametrize("spec", ["model.gguf", "dir/model.gguf", "./a/b", "/abs/path", "~/x/y", "a/b/c", "nope"])
def test_paths_are_not_repos(spec):
    assert not hub.looks_like_repo(spec)


@pytest.mark.parametrize("name, quant", [
    ("qwen1_5-4b-chat-q4_k_m.gguf", "Q4_K_M"),
    ("Qwen2.5-0.5B-Instruct-Q8_0.gguf", "Q8_0"),
    ("sub/dir/model.IQ4_XS.gguf", "IQ4_XS"),
    ("qwen2-0_5b-instruct-fp16.gguf", "F16"),
    ("Qwen2.5-72B-Instruct-Q4_K_M-00001-of-00012.gguf", "Q4_K_M"),
    ("ggml-model.gguf", None),
])
def test_quant_of(name, quant):
    assert hub.quant_of(name) == quant


def test_choose_file():
    files = ["README.md", "m-q2_k.gguf", "m-q4_k_m.gguf", "m-Q8_0.gguf", "big-q6_k-00001-of-00002.gguf",
             "big-q6_k-00002-of-00002.gguf"]
    assert hub.choose_file("o/m", files, None) == "m-q4_k_m.gguf"  # the default quant
    assert hub.choose_file("o/m", files, "Q8_0") == "m-Q8_0.gguf"
    with pytest.raises(QcpuError, match=r"o/m has no Q5_K_M file; available: Q2_K, Q4_K_M, Q6_K, Q8_0"):
        hub.choose_file("o/m", files, "Q5_K_M")
    with pytest.raises(QcpuError, match="split into several files"):
        hub.choose_file("o/m", files, "Q6_K")
    with pytest.raises(QcpuError, match="no .gguf files"):
        hub.choose_file("o/m", ["README.md"], None)
    with pytest.raises(QcpuError, match="name one"):
        hub.choose_file("o/m", ["a-q2_k.gguf", "a-q3_k_s.gguf"], None)
    assert hub.choose_file("o/m", ["only.gguf"], None) == "only.gguf"


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_qwen2(path)
    return path.read_bytes()


@pytest.fixture
def standin(tiny_bytes):
    repos = {"acme/Tiny-GGUF": {"tiny-Q8_0.gguf": tiny_bytes, "tiny-Q4_K_M.gguf": b"not used",
                                "README.md": b"# tiny"}}
    with StandInHub(repos) as server:
        yield server


def qcpu(*args, env, stdin=None):
    return subprocess.run([sys.executable, "-m", "qcpu.cli", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=CLOSED_PORT, QCPU_CACHE=str(tmp_path / "qcpu"),
             HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1")
    return e


def one_line_error(proc, contains):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("qcpu: ") and contains in lines[0], lines[0]
    return lines[0]


def test_pull_list_then_chat_offline_from_the_cache(standin, env, tiny_bytes, tmp_path):
    env["HF_ENDPOINT"] = standin.url
    proc = qcpu("pull", "acme/Tiny-GGUF:q8_0", env=env)
    assert proc.returncode == 0, proc.stderr
    cached = tmp_path / "hf" / "hub" / "models--acme--Tiny-GGUF" / "snapshots"
    [path] = list(cached.glob("*/tiny-Q8_0.gguf"))
    assert path.read_bytes() == tiny_bytes and str(path) in proc.stdout
    assert ("HEAD", "/acme/Tiny-GGUF/resolve/main/tiny-Q8_0.gguf") in standin.requests

    listed = qcpu("list", env=env)
    assert listed.returncode == 0 and "acme/Tiny-GGUF:Q8_0" in listed.stdout and str(path) in listed.stdout

    # With the hub gone, the cached copy serves `chat REPO:QUANT` (piped: replies only).
    env["HF_ENDPOINT"] = CLOSED_PORT
    chat = qcpu("chat", "acme/Tiny-GGUF:Q8_0", "--temp", "0", "--max-tokens", "3", env=env, stdin="hi\nagain\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr == "" and chat.stdout.count("\n") == 2  # one line per reply (random bytes)


def test_chat_fetches_a_missing_model_then_chats(standin, env):
    env["HF_ENDPOINT"] = standin.url
    proc = qcpu("chat", "acme/Tiny-GGUF:q8_0", "--temp", "0", "--max-tokens", "2", env=env, stdin="hi\n")
    assert proc.returncode == 0, proc.stderr
    assert ("GET", "/acme/Tiny-GGUF/resolve/main/tiny-Q8_0.gguf") in standin.requests
    assert proc.stdout.count("\n") == 1


def test_offline_is_one_line_saying_what_to_do(env):
    line = one_line_error(qcpu("chat", "acme/Other-GGUF:q4_k_m", env=env), "cannot reach the Hugging Face hub")
    assert "connection refused" in line and "qcpu pull acme/Other-GGUF:q4_k_m" in line
    one_line_error(qcpu("pull", "acme/Other-GGUF", env=env), "cannot reach the Hugging Face hub")
    env["HF_HUB_OFFLINE"] = "1"
    one_line_error(qcpu("chat", "acme/Other-GGUF:q4_k_m", env=env), "HF_HUB_OFFLINE is set")


def test_hub_errors_are_one_line(standin, env):
    env["HF_ENDPOINT"] = standin.url
    one_line_error(qcpu("pull", "acme/Missing-GGUF", env=env), "acme/Missing-GGUF: not a local file, nor a model repository")
    one_line_error(qcpu("pull", "acme/Tiny-GGUF:q5_k_m", env=env), "has no Q5_K_M file; available: Q4_K_M, Q8_0")
    proc = qcpu("pull", "not-a-repo", env=env)
    assert proc.returncode == 2 and "expected REPO[:QUANT]" in proc.stderr
    one_line_error(qcpu("chat", "missing.gguf", env=env), "missing.gguf: no such file")
