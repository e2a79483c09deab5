"""`qcpu.conversation.Chat` in-process: the conversation and the KV cache stay in step through every command.

Most tests run on the tiny random model (milliseconds, float32 weights, so greedy replies are exactly
reproducible); the prefill count is also checked on the default model.
"""

import json
import os
import re

import numpy as np
import pytest

from qcpu.config import RopeOverrides
from qcpu.errors import QcpuError
from qcpu.generate import Engine
from qcpu.conversation import Chat
from qcpu.repl import Repl
from qcpu.sampling import SamplingParams
from tests.tiny_model import write_tiny_qwen2

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_qwen2(path)
    return path


def new_chat(path, ctx=256, max_tokens=6, system="be terse"):
    engine = Engine.load(path, ctx=ctx)
    if engine.model.config.n_layers <= 2:
        plain_letters(engine)
    chat = Chat(engine, GREEDY, max_tokens, system)
    chat.refill()
    return chat


def plain_letters(engine):
    """Let the random tiny model write only the letters a-d (and end its turn): text that tokenizes back to
    the very tokens it wrote, as a real model's replies do (random bytes would not: broken UTF-8, merges)."""
    tok = engine.tokenizer
    allowed = [tok.encode(c)[0] for c in "abcd"] + sorted(tok.eot_ids)
    mask = np.full(engine.model.config.vocab_size, -np.inf, dtype=np.float32)
    mask[allowed] = 0.0
    forward = engine.model.forward

    def wrapped(tokens, cache, all_logits=False, exact=False):
        return forward(tokens, cache, all_logits=all_logits, exact=exact) + mask

    engine.model.forward = wrapped


def say(chat, text):
    turn = chat.send(text)
    for _ in turn:
        pass
    turn.finish()
    return turn


def counting(engine):
    """Record how many tokens each forward pass sees."""
    seen = []
    forward = engine.model.forward

    def wrapped(tokens, cache, all_logits=False, exact=False):
        seen.append(len(tokens))
        return forward(tokens, cache, all_logits=all_logits, exact=exact)

    engine.model.forward = wrapped
    return seen


def fresh_tokens(chat):
    """What the cache should hold: the rendered conversation, up to the last reply's text."""
    return chat.engine.tokenizer.encode(chat.engine.template.render(chat.conversation(), add_generation_prompt=False))


def assert_cache_matches_conversation(chat):
    held, want = chat.engine.tokens, fresh_tokens(chat)
    assert held == want[:len(held)]
    assert len(want) - len(held) <= 2  # only the reply's closing <|im_end|>\n is not fed yet
    assert chat.engine.n_seen == len(held)


def test_start_holds_the_system_prefix(tiny_path):
    chat = new_chat(tiny_path)
    prefix = chat.prefix_tokens()
    assert chat.engine.tokens == prefix and chat.engine.n_kept == len(prefix) > 0
    text = chat.engine.tokenizer.decode(prefix)
    assert text.startswith("<|im_start|>system\nbe terse<|im_end|>")


def test_second_turn_feeds_only_the_new_tokens(tiny_path):
    chat = new_chat(tiny_path)
    say(chat, "hello there")
    held = list(chat.engine.tokens)
    seen = counting(chat.engine)
    turn = chat.send("and now?")
    full = chat.engine.tokenizer.encode(chat.engine.template.render(chat.conversation(), add_generation_prompt=True))
    assert turn.prompt == full[len(held):]  # exactly what the cache lacked
    for _ in turn:
        pass
    turn.finish()
    assert seen[0] == len(turn.prompt) < len(full) // 2
    assert all(n == 1 for n in seen[1:])  # then one token per decode step
    assert sum(seen) == len(turn.prompt) + turn.stats.generated_tokens
    assert turn.stats.prompt_tokens == len(turn.prompt)
    assert_cache_matches_conversation(chat)


def test_undo_and_retry_rewind_the_cache_to_a_fresh_runs_state(tiny_path):
    chat = new_chat(tiny_path)
    first = say(chat, "one").text
    second = say(chat, "two").text
    chat.undo()
    assert [m["content"] for m in chat.messages] == ["one", first]
    assert_cache_matches_conversation(chat)
    again = say(chat, "two").text
    assert again == second  # the same state gives the same greedy reply
    retried = chat.retry()
    for _ in retried:
        pass
    retried.finish()
    assert retried.text == second and len(retried.prompt) == 1  # only the last prompt token is fed again
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    assert_cache_matches_conversation(chat)
    stopped = chat.retry()  # Ctrl-C before the new reply's first piece: the old reply stays
    stopped.stopped = True
    stopped.finish()
    assert [m["content"] for m in chat.messages] == ["one", first, "two", second]
    chat.reset()
    assert chat.messages == [] and chat.engine.tokens == chat.prefix_tokens()
    with pytest.raises(QcpuError, match="nothing to undo"):
        chat.undo()


def test_save_load_round_trip_refills_the_cache(tiny_path, tmp_path):
    chat = new_chat(tiny_path)
    say(chat, "alpha")
    say(chat, "beta")
    a = tmp_path / "a.json"
    chat.save(a)
    data = json.loads(a.read_text())
    assert data["format"] == "qcpu-chat" and data["system"] == "be terse" and len(data["messages"]) == 4
    held = list(chat.engine.tokens)
    next_reply = say(chat, "gamma").text

    other = new_chat(tiny_path, system=None)
    other.load(a)
    b = tmp_path / "b.json"
    other.save(b)
    assert json.loads(b.read_text()) == data
    assert other.system == "be terse" and other.engine.n_kept == len(chat.prefix_tokens())
    assert other.engine.tokens[:len(held)] == held  # same tokens (plus the last reply's <|im_end|>\n)
    assert say(other, "gamma").text == next_reply
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_save_is_atomic(tiny_path, tmp_path, monkeypatch):
    chat = new_chat(tiny_path)
    say(chat, "alpha")
    target = tmp_path / "c.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        chat.save(target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


@pytest.mark.parametrize("content, message", [
    ("not json", "not a saved conversation"),
    ('{"format": "other"}', "not a conversation saved by qcpu"),
    ('{"format": "qcpu-chat", "messages": [{"role": "assistant", "content": "x"}]}', "message 1 must be"),
    ('{"format": "qcpu-chat", "messages": [{"role": "user", "content": "x"}]}', "has no reply"),
])
def test_load_rejects_bad_files_and_keeps_the_conversation(tiny_path, tmp_path, content, message):
    chat = new_chat(tiny_path)
    say(chat, "alpha")
    before = (list(chat.messages), list(chat.engine.tokens))
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(QcpuError, match=message):
        chat.load(bad)
    assert (chat.messages, chat.engine.tokens) == before
    with pytest.raises(QcpuError, match="no such file"):
        chat.load(tmp_path / "missing.json")


def test_a_long_conversation_drops_old_turns_and_keeps_the_system_prompt(tiny_path):
    chat = new_chat(tiny_path, ctx=64, max_tokens=8)
    keep = chat.engine.n_kept
    notices = []
    for i in range(12):
        turn = say(chat, f"message number {i}")
        notice = chat.eviction_notice(turn)
        if notice:
            notices.append(notice)
    cache = chat.engine._cache  # white-box: the ring's slots
    assert chat.engine.n_evicted > 0 and len(chat.messages) == 24
    assert notices and notices[0].startswith("context full (64 tokens)") and "system prompt kept" in notices[0]
    assert any("oldest" in n and "exchange" in n for n in notices)
    # the system prompt's tokens are still in the cache, at their original stream positions
    assert sorted(cache.slot_seq[(cache.slot_seq >= 0) & (cache.slot_seq < keep)]) == list(range(keep))
    # /undo past the ring's evictions rebuilds the cache from the conversation instead of failing
    chat.undo()
    assert len(chat.messages) == 22 and chat.engine.n_kept == keep
    say(chat, "still here?")


def test_a_message_longer_than_the_context_is_refused_and_forgotten(tiny_path):
    chat = new_chat(tiny_path, ctx=64)
    with pytest.raises(QcpuError, match="more than the context holds"):
        chat.send("word " * 200)
    assert chat.messages == []
    say(chat, "short")


def test_system_change_refills_and_keeps_the_conversation(tiny_path):
    chat = new_chat(tiny_path)
    say(chat, "alpha")
    chat.set_system("be kind")
    assert chat.engine.tokenizer.decode(chat.prefix_tokens()).startswith("<|im_start|>system\nbe kind")
    assert len(chat.messages) == 2
    assert_cache_matches_conversation(chat)


def test_a_system_prompt_that_does_not_fit_keeps_the_old_one(tiny_path):
    import io

    from rich.console import Console

    chat = new_chat(tiny_path, ctx=64)
    say(chat, "alpha")
    before = (chat.system, list(chat.messages), list(chat.engine.tokens), chat.engine.n_kept)
    with pytest.raises(QcpuError, match=r"the system prompt is \d+ tokens, more than the context of 64"):
        chat.set_system("word " * 100)
    assert (chat.system, chat.messages, chat.engine.tokens, chat.engine.n_kept) == before
    # the interactive REPL says so and goes on: the next message is answered with the old system prompt
    repl = Repl(chat, interactive=True, color=False)
    repl.out = Console(file=io.StringIO(), color_system=None, width=80)
    repl.command("/system " + "word " * 100)
    assert "qcpu: the system prompt is" in repl.out.file.getvalue() and repl.exit_code == 0
    say(chat, "beta")
    assert chat.system == "be terse" and len(chat.messages) == 4
    assert_cache_matches_conversation(chat)


def sampled_session(path, seed, retry=False):
    engine = Engine.load(path, ctx=256)
    plain_letters(engine)
    chat = Chat(engine, SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=seed), 16)
    chat.refill()
    replies = [say(chat, "one").text, say(chat, "two").text]
    if retry:
        turn = chat.retry()
        for _ in turn:
            pass
        turn.finish()
        replies.append(turn.text)
    return chat, replies


def test_one_random_stream_per_session(tiny_path):
    # llama.cpp seeds a session's sampler once: turns continue the stream, so a fixed seed replays the
    # whole session, and two turns (or a /retry) do not restart it.
    chat, replies = sampled_session(tiny_path, seed=1234, retry=True)
    _, again = sampled_session(tiny_path, seed=1234, retry=True)
    assert replies == again
    assert replies[2] != replies[1]  # /retry draws new numbers even with a fixed seed
    # an unseeded session draws its seed and shows it; replaying that seed gives the same session
    drawn, first = sampled_session(tiny_path, seed=None)
    assert isinstance(drawn.params.seed, int)
    assert sampled_session(tiny_path, seed=drawn.params.seed)[1] == first
    # /set seed N restarts the stream at N, even when N is the current seed
    repl = Repl(chat, interactive=False)
    repl.command("/set seed 1234")
    chat.undo()
    chat.undo()
    assert [say(chat, "one").text, say(chat, "two").text] == replies[:2]


def test_set_command_validates(tiny_path, capsys):
    chat = new_chat(tiny_path)
    repl = Repl(chat, interactive=False)
    repl.command("/set temp 0.5")
    repl.command("/set max_tokens 3")
    repl.command("/set seed none")  # a fresh seed is drawn and shown, so the session can be replayed
    assert chat.params.temperature == 0.5 and chat.max_tokens == 3 and 0 <= chat.params.seed < 2**32
    assert f"seed = {chat.params.seed}" in capsys.readouterr().err
    repl.command("/set top_p 7")
    repl.command("/set bogus 1")
    repl.command("/set top_k x")
    err = capsys.readouterr().err
    assert "top-p must be in (0, 1]" in err and "unknown setting bogus" in err and "not a valid value" in err
    assert chat.params.top_p == GREEDY.top_p


def test_second_turn_on_the_default_model_feeds_only_the_new_tokens(real_model_path):
    chat = new_chat(real_model_path, ctx=1024, max_tokens=4, system="Be brief.")
    say(chat, "My name is Ada.")
    held = len(chat.engine.tokens)
    seen = counting(chat.engine)
    turn = say(chat, "What is my name?")
    full = chat.engine.tokenizer.encode(chat.engine.template.render(
        chat.conversation()[:-1], add_generation_prompt=True))
    # new tokens: <|im_end|>\n<|im_start|>user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n
    assert turn.prompt == full[held:] and len(turn.prompt) < 20 < held
    assert seen[0] == len(turn.prompt) and sum(seen) == len(turn.prompt) + turn.stats.generated_tokens
    assert np.all(np.array(seen[1:]) == 1)


def test_an_empty_reply_is_kept_but_a_stopped_one_is_not(tiny_path):
    chat = new_chat(tiny_path)
    forward = chat.engine.model.forward
    eot = sorted(chat.engine.tokenizer.eot_ids)[0]

    def only_eot(tokens, cache, all_logits=False, exact=False):
        out = forward(tokens, cache, all_logits=all_logits, exact=exact).copy()
        out[..., eot] = 1e9
        return out

    chat.engine.model.forward = only_eot
    turn = say(chat, "say nothing")
    assert turn.completed and chat.messages == [{"role": "user", "content": "say nothing"},
                                                {"role": "assistant", "content": ""}]
    chat.engine.model.forward = forward
    stopped = chat.send("interrupted before the first token")
    stopped.stopped = True
    stopped.finish()
    assert len(chat.messages) == 2


@pytest.mark.parametrize("rope,fix", [
    (None, "more than the model's trained context of 256 tokens: shorten it"),
    (RopeOverrides(scaling_type="yarn", scale=4, yarn_orig_ctx=256), "--ctx 1024 would hold it"),
])
def test_a_too_long_system_prompt_is_told_the_ctx_the_rope_scaling_allows(tiny_path, rope, fix):
    """The --ctx suggestion goes up to what rope scaling stretches the trained context to, never above."""
    engine = Engine.load(tiny_path, ctx=64, rope=rope)
    chat = Chat(engine, GREEDY, 6, "be terse")
    with pytest.raises(QcpuError, match=re.escape(fix)):
        chat.set_system("word " * 60)
