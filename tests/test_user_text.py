"""Issue 9's bad-input kinds 1, 2, 6 and 9, through the real `qcpu` program on the tiny model.

1. Text that is not valid UTF-8, wherever user text enters (files, arguments, piped stdin, /load): each
   invalid sequence becomes U+FFFD and one warning line names the source and the count, as llama.cpp's
   `unicode_cpts_from_utf8` replaces and goes on. Expected tokens: those of the same text with U+FFFD.
2. A system prompt that leaves no room in the context: one line naming its size and a --ctx that holds it;
   non-zero exit when piped or one-shot; the interactive conversation keeps the old one (tests/test_repl_chat).
6. Seeds: an unseeded run shows the seed it drew, and that seed replays the text.
9. --ctx above the trained context: refused in one line naming the rope scaling that would allow it.
"""

import json
import re
import subprocess
import sys

import pytest

from qcpu.tokenizer import Tokenizer
from qcpu.gguf_file import GGUFFile
from qcpu.text_input import clean_arg, decode_utf8
from tests.test_errors import assert_one_line_error
from tests.tiny_model import write_tiny_qwen2

BAD = b"ok\xffok \xe2\x82 fin\xc0\xaf"  # a lone byte, a cut 3-byte sequence, an overlong pair
FIXED = "ok\ufffdok \ufffd fin\ufffd\ufffd"  # Unicode's maximal-subpart rule: 4 replacements


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_qwen2(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_path):
    return Tokenizer.from_metadata(GGUFFile(tiny_path).metadata)


def qcpu(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the real program with bytes on stdin (and arguments that may hold undecodable bytes)."""
    proc = subprocess.run([sys.executable, "-m", "qcpu.cli", *map(str, args)], capture_output=True,
                          input=stdin, timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("qcpu: warning:")]


def test_decode_rule_is_unicode_maximal_subpart(capsys):
    assert decode_utf8(BAD, "x") == FIXED == BAD.decode("utf-8", "replace")
    assert capsys.readouterr().err == "qcpu: warning: x: 4 invalid UTF-8 sequences replaced by U+FFFD\n"
    assert decode_utf8("ok \ufffd".encode(), "y") == "ok \ufffd"  # a real U+FFFD is not counted
    assert capsys.readouterr().err == ""
    # argv bytes arrive as lone surrogates (PEP 383): restored and decoded the same way
    assert clean_arg(BAD.decode("utf-8", "surrogateescape"), "--system") == FIXED


def test_tokenize_file_and_argument(tiny_path, tok, tmp_path):
    f = tmp_path / "f.txt"
    f.write_bytes(BAD)
    want = tok.encode(FIXED)
    proc = qcpu("tokenize", tiny_path, "--file", f, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == want
    assert warnings_in(proc.stderr) == [f"qcpu: warning: {f}: 4 invalid UTF-8 sequences replaced by U+FFFD"]
    proc = qcpu("tokenize", tiny_path, BAD.decode("utf-8", "surrogateescape"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == want
    assert len(warnings_in(proc.stderr)) == 1 and "TEXT: 4 invalid" in proc.stderr


def test_perplexity_file(tiny_path, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(BAD * 60)
    proc = qcpu("perplexity", tiny_path, f, "--ctx", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert warnings_in(proc.stderr) == [f"qcpu: warning: {f}: 240 invalid UTF-8 sequences replaced by U+FFFD"]
    assert json.loads(proc.stdout)["perplexity"] > 1


def test_generate_message_and_system_arguments(tiny_path):
    bad = BAD.decode("utf-8", "surrogateescape")
    proc = qcpu("generate", tiny_path, bad, "--system", bad, "-n", "3", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    assert sorted(warnings_in(proc.stderr)) == [
        "qcpu: warning: --system: 4 invalid UTF-8 sequences replaced by U+FFFD",
        "qcpu: warning: MESSAGE: 4 invalid UTF-8 sequences replaced by U+FFFD"]


def test_piped_chat_stdin(tiny_path):
    proc = qcpu("chat", tiny_path, "-n", "3", "--temp", "0", stdin=BAD + b"\nsecond line\n")
    assert proc.returncode == 0, proc.stderr
    assert warnings_in(proc.stderr) == ["qcpu: warning: standard input: 4 invalid UTF-8 sequences replaced by U+FFFD"]
    assert len(proc.stdout.splitlines()) == 2  # both messages answered


def test_load_of_a_saved_conversation_with_bad_bytes(tiny_path, tmp_path):
    saved = tmp_path / "c.json"
    saved.write_bytes(b'{"format": "qcpu-chat", "version": 1, "system": "s", "messages": '
                      b'[{"role": "user", "content": "' + BAD + b'"}, {"role": "assistant", "content": "a"}]}')
    proc = qcpu("chat", tiny_path, "-n", "2", "--temp", "0", stdin=f"/load {saved}\nnext\n".encode())
    assert proc.returncode == 0, proc.stderr
    assert warnings_in(proc.stderr) == [f"qcpu: warning: {saved}: 4 invalid UTF-8 sequences replaced by U+FFFD"]


def test_system_prompt_longer_than_the_context(tiny_path):
    long_system = "word " * 5000
    for ctx in ("128", "124"):
        proc = qcpu("chat", tiny_path, "--system", long_system, "--ctx", ctx, stdin=b"hi\n")
        assert_one_line_error(proc, 1, "the system prompt is")
        assert proc.stdout == ""
    # a system prompt that fits the trained context names the --ctx that holds it
    proc = qcpu("chat", tiny_path, "--system", "ab " * 30, "--ctx", "32", stdin=b"hi\n")
    assert_one_line_error(proc, 1, "--ctx")
    n, want = map(int, re.search(r"is (\d+) tokens.*--ctx (\d+) would hold it", proc.stderr).groups())
    assert want >= n + 4
    # ...and exactly at the limit it is accepted: capacity - 4 tokens (llama-cli's n_ctx - 4 rule)
    proc = qcpu("chat", tiny_path, "--system", "ab " * 30, "--ctx", str(n + 4), "-n", "2", stdin=b"hi\n")
    assert proc.returncode in (0, 1), proc.stderr
    assert "the system prompt is" not in proc.stderr
    # the same prompt set with /system in a piped session: one line, exit 1, the rest not read
    proc = qcpu("chat", tiny_path, "--ctx", "32", "-n", "2", stdin=f"/system {'ab ' * 30}\nhi\n".encode())
    assert_one_line_error(proc, 1, "the system prompt is")
    assert proc.stdout == ""
    # one-shot: generate with a system prompt past the context fails with nothing on stdout
    proc = qcpu("generate", tiny_path, "hi", "--system", long_system, "--ctx", "128")
    assert_one_line_error(proc, 1, "longer than the context")
    assert proc.stdout == ""


def test_unseeded_run_shows_its_seed_and_the_seed_replays(tiny_path):
    args = ("generate", tiny_path, "hello", "-n", "24", "--temp", "1.5", "--top-k", "0", "--top-p", "1",
            "--stats")
    first = qcpu(*args)
    assert first.returncode == 0, first.stderr
    seed = int(re.search(r"seed (\d+)", first.stderr).group(1))
    again = qcpu(*args, "--seed", str(seed))
    assert again.stdout == first.stdout
    assert f"seed {seed}" in again.stderr
    other = qcpu(*args, "--seed", str(seed + 1))
    assert other.stdout != first.stdout  # 24 tokens at temperature 1.5 over ~260 ids: a repeat is ~impossible


def test_bad_seed_is_a_usage_error(tiny_path):
    assert_one_line_error(qcpu("generate", tiny_path, "hi", "--seed", "-5"), 2, "seed must be in")


def test_ctx_above_trained_context_says_so(tiny_path):
    proc = qcpu("generate", tiny_path, "hi", "-n", "2", "--ctx", "100000")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "qcpu: --ctx 100000 is above the model's trained context of 256 tokens; to stretch it, add rope "
        "scaling: --rope-scaling yarn --rope-scale 391 --yarn-orig-ctx 256"]
    # with rope scaling it runs
    ok = qcpu("generate", tiny_path, "hi", "-n", "2", "--ctx", "1024", "--rope-scaling", "yarn", "--rope-scale", "4")
    assert ok.returncode == 0, ok.stderr
    info = qcpu("info", tiny_path)
    assert re.search(r"context_length: 256 tokens \(trained; a larger --ctx needs --rope-scaling", info.stdout)
