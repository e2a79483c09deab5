"""`qcpu chat` driven like a person would: the real program in a pseudo-terminal (pexpect) on the default
model, greedy (--temp 0) so every assertion is exact. The conversation's exact text is read back through
/save (the screen has the live region's redraws in it).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.model

QCPU = [sys.executable, "-m", "qcpu.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]|\r")
PROMPT = ">>>"  # (the trailing space may be drawn as a cursor move)
FINAL_STATUS = r"prompt \d+ tok in [0-9.]+s · context \d+/\d+[^\n]*\n"
TIMEOUT = 600  # generous: the decode kernels' speed is not what this file tests


def plain(text: str) -> str:
    return ANSI.sub("", text)


class Session:
    def __init__(self, model: Path, tmp: Path, *args: str, history: list[str] = ()):
        self.tmp = tmp
        cache = tmp / "qcpu-cache"
        cache.mkdir(exist_ok=True)
        if history:  # prompt_toolkit's FileHistory format
            (cache / "chat_history").write_text("".join(f"\n# old\n+{h}\n" for h in history))
        env = dict(os.environ, QCPU_CACHE=str(cache), PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color",
                   COLUMNS="160", LINES="48")
        env.pop("NO_COLOR", None)
        self.child = pexpect.spawn(QCPU[0], [*QCPU[1:], "chat", str(model), "--temp", "0", *args],
                                   env=env, encoding="utf-8", dimensions=(48, 160), timeout=TIMEOUT,
                                   cwd=str(tmp))
        self.child.expect(r"context \d+ tokens")
        self.banner = plain(self.child.before + self.child.after)
        self.child.expect_exact(PROMPT)
        self.saves = 0

    def ask(self, text: str) -> str:
        """Send a message; the screen text of the reply and its status line."""
        self.child.sendline(text)
        self.child.expect(FINAL_STATUS)
        screen = plain(self.child.before + self.child.after)
        self.child.expect_exact(PROMPT)
        return screen

    def command(self, text: str, until: str) -> str:
        self.child.sendline(text)
        self.child.expect(until)
        out = plain(self.child.before + self.child.after)
        self.child.expect_exact(PROMPT)
        return out

    def save(self) -> dict:
        self.saves += 1
        path = self.tmp / f"save{self.saves}.json"
        self.command(f"/save {path.name}", r"saved \d+ messages")
        return json.loads(path.read_text())

    def close(self) -> int:
        if self.child.isalive():
            self.child.sendcontrol("d")
            self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def contents(saved: dict) -> list[str]:
    return [m["content"] for m in saved["messages"]]


def test_conversation_commands_and_ctrl_c(real_model_path, tmp_path):
    s = Session(real_model_path, tmp_path, "--max-tokens", "24", "--ctx", "1024",
                "--system", "You are a terse assistant.", history=["an old question from yesterday"])
    try:
        assert re.search(r"Q4_K_M · context 1024 tokens", s.banner), s.banner
        # Up recalls the previous session's line; Ctrl-C on a non-empty line clears it, the program stays.
        s.child.send("\x1b[A")
        s.child.expect_exact("an old question from yesterday")
        s.child.sendcontrol("c")

        # Two turns: the second answer needs the first (the cache holds it; only the new tokens are read).
        first = s.ask("My favourite colour is teal. Reply with just OK.")
        assert re.search(r"\d+ tok · [0-9.]+ tok/s · prompt \d+ tok in", first)
        second = s.ask("What is my favourite colour? One word.")
        assert "teal" in second.lower()
        new_tokens = int(re.search(r"prompt (\d+) tok in", second).group(1))
        stats = s.command("/stats", r"settings[^\n]*\n")
        held = int(re.search(r"context\s+(\d+)/1024 tokens held", stats).group(1))
        assert new_tokens < 30 < held  # turn two read its own ~20 tokens, not the whole conversation
        a = s.save()
        assert a["system"] == "You are a terse assistant." and len(a["messages"]) == 4
        assert "teal" in a["messages"][3]["content"].lower()

        # /undo drops the last exchange; /retry writes the (greedy, so identical) last reply again.
        s.command("/undo", r"last exchange dropped; 1 left")
        assert contents(s.save()) == contents(a)[:2]
        s.child.sendline("/retry")
        s.child.expect(FINAL_STATUS)
        s.child.expect_exact(PROMPT)
        assert contents(s.save()) == contents(a)[:2]

        # /save, /reset, /load: the round trip is equal and the loaded conversation is back in the cache.
        s.command("/reset", "conversation cleared")
        assert s.save()["messages"] == []
        s.command("/load save1.json", r"loaded 4 messages")
        assert s.save() == a
        assert "teal" in s.ask("Remind me: what is my favourite colour? One word.").lower()

        # Ctrl-C while the model writes stops that reply, keeps what was written, and the chat goes on.
        s.command("/set max_tokens 200", "max_tokens = 200")
        s.child.sendline("Write a long story about a dragon who learns to code.")
        s.child.expect(r"● (?:[3-9]|\d\d+) tok · ")  # the live status line: tokens are streaming
        s.child.sendintr()
        s.child.expect(r"(\d+) tok · [^\n]*· stopped")
        written = int(s.child.match.group(1))
        s.child.expect_exact(PROMPT)
        partial = s.save()["messages"][-1]
        assert partial["role"] == "assistant" and partial["content"].strip()
        assert 3 <= written < 200
        s.command("/set max_tokens 12", "max_tokens = 12")
        assert "4" in s.ask("What is 2+2? Answer with the number only.")
    finally:
        code = s.close()
    assert code == 0


def test_piped_session_prints_only_the_replies(real_model_path):
    proc = subprocess.run(
        [*QCPU, "chat", str(real_model_path), "--temp", "0", "--max-tokens", "12", "--system", "Be terse."],
        input="My favourite number is 7. Reply with just OK.\nWhat is my favourite number? Answer with the number only.\n",
        capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    replies = proc.stdout.splitlines()
    assert len(replies) == 2 and "\x1b" not in proc.stdout
    assert "7" in replies[1]


def test_conversation_past_the_context_keeps_the_system_prompt(real_model_path, tmp_path):
    s = Session(real_model_path, tmp_path, "--ctx", "512", "--max-tokens", "16", "--markdown", "--no-color",
                "--system", "Your name is Zorblax. Always answer briefly.")
    try:
        assert "\x1b[1m" not in s.banner  # --no-color: no styles at all
        filler = " ".join(f"item{i}" for i in range(60))
        notices = []
        for i in range(4):
            # a multi-line message, typed as a \"\"\" block
            s.child.sendline('"""')
            s.child.sendline(f"Here is list {i}:")
            s.child.sendline(f'{filler}"""')
            s.child.expect(FINAL_STATUS)
            after = s.child.before
            s.child.expect_exact(PROMPT)
            notices += re.findall(r"context full \(512 tokens\)[^\n]*", plain(after + s.child.before))
        stats = s.command("/stats", r"settings[^\n]*\n")
        dropped = int(re.search(r"(\d+) dropped so far", stats).group(1))
        assert dropped > 0 and notices, stats
        assert "system prompt kept" in notices[0]
        assert "Zorblax" in s.ask("What is your name?")
        saved = s.save()
        assert len(saved["messages"]) == 10 and saved["messages"][0]["content"].startswith("Here is list 0:\nitem0")
    finally:
        code = s.close()
    assert code == 0
