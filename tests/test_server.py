"""`qcpu serve` as a process on 127.0.0.1, driven by the official `openai` client (unmodified but for
base_url) and by httpx for what a client library would not send. Replies are checked against the engine
run in this process on the same prompt (greedy), so the server adds nothing and loses nothing."""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from openai import OpenAI

from qcpu.sampling import SamplingParams

CTX = 1024
MESSAGE = "Write a Python function that returns the square of a number."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, path, *extra):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from qcpu.cli import main; main()", "serve", str(path), "--port",
             str(self.port), "--ctx", str(CTX), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError("the server did not start")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def server(real_model_path):
    running = Running(real_model_path, "--parallel", "2", "--queue", "2")
    yield running
    code, err = running.stop()
    assert code == 0 and "Traceback" not in err, err  # SIGTERM: a clean exit
    assert "POST /v1/chat/completions 200" in err  # one log line per request


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def greedy_reference(real_engine):
    """What the engine in this process writes for MESSAGE, greedy (the server's sampling defaults but
    temperature 0), up to 40 tokens: (text, token count, finished by end of turn)."""
    from qcpu.generate import Stats

    real_engine.reset()
    prompt = real_engine.chat_prompt_tokens([{"role": "user", "content": MESSAGE}])
    stats = Stats()
    text = "".join(p.text for p in real_engine.stream(prompt, SamplingParams(temperature=0.0), 40, stats))
    return text, stats.generated_tokens, stats.stop_reason == "end of turn"


def chat(client, model_id, **kw):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": MESSAGE}], **kw)


def test_models_lists_the_file(client, real_model_path):
    ids = [m.id for m in client.models.list().data]
    assert ids == [real_model_path.name]


def test_chat_greedy_equals_the_engine(client, model_id, greedy_reference):
    text, n, ended = greedy_reference
    r = chat(client, model_id, temperature=0, max_tokens=40)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == n and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + n
    assert r.choices[0].finish_reason == ("stop" if ended else "length")


def test_streamed_chat_is_the_same_text(client, model_id, greedy_reference):
    text, n, _ = greedy_reference
    chunks = list(chat(client, model_id, temperature=0, max_tokens=40, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_max_tokens_and_finish_reason(client, model_id, greedy_reference):
    r = chat(client, model_id, temperature=0, max_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert greedy_reference[0].startswith(r.choices[0].message.content)
    r = chat(client, model_id, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_reply_and_are_never_sent(client, model_id, greedy_reference, stream):
    text = greedy_reference[0]
    stop = text[len(text) // 2:len(text) // 2 + 4]  # something the greedy reply certainly writes
    assert stop.strip()
    r = chat(client, model_id, temperature=0, max_tokens=40, stop=["<never>", stop], stream=stream)
    if stream:
        chunks = list(r)
        got = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        got, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert got == text[:text.find(stop)] and finish == "stop"


def test_seed_reproduces_a_sampled_reply(client, model_id):
    a, b = (chat(client, model_id, temperature=1.0, top_p=0.95, seed=1234, max_tokens=12).choices[0].message.content
            for _ in range(2))
    assert a == b


def test_logprobs_are_the_models_distribution(client, model_id, greedy_reference):
    r = chat(client, model_id, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and np.exp(tops).sum() <= 1 + 1e-6
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_completions_take_a_raw_prompt(client, model_id, real_engine):
    prompt = "def fibonacci(n):"
    real_engine.reset()
    want = "".join(p.text for p in real_engine.stream(real_engine.tokenizer.encode(prompt, parse_special=False),
                                                      SamplingParams(temperature=0.0), 12))
    r = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=12)
    assert r.choices[0].text == want and r.usage.completion_tokens <= 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt=prompt, temperature=0, max_tokens=12, stream=True))
    assert streamed == want


def test_concurrent_replies_are_batched_and_still_the_engines(client, model_id, real_engine, greedy_reference):
    """Two requests at once on two slots decode in one pass per step (Batcher); each reply is still what
    the engine writes for it alone."""
    import threading

    from qcpu.generate import Stats

    count = "Count from 1 to 15, separated by commas."
    real_engine.reset()
    prompt = real_engine.chat_prompt_tokens([{"role": "user", "content": count}])
    stats = Stats()
    want_count = "".join(p.text for p in real_engine.stream(prompt, SamplingParams(temperature=0.0), 40, stats))
    got = {}

    def ask(name, message):
        got[name] = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": message}],
                                                   temperature=0, max_tokens=40).choices[0].message.content

    threads = [threading.Thread(target=ask, args=a) for a in (("square", MESSAGE), ("count", count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {"square": greedy_reference[0], "count": want_count}


# ---- structured output ------------------------------------------------------------------------------

def test_response_format_json_schema_for_every_schema(client, model_id):
    """response_format json_schema through the openai client, for the whole schema set of
    test_grammar.py: greedy and sampled, whole and streamed, two requests at a time (both slots); every
    reply parses and validates with jsonschema."""
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema

    from tests.test_grammar import CASES

    def ask(job):
        i, (temperature, stream) = job
        case = CASES[i]
        fmt = {"type": "json_schema", "json_schema": {"name": f"case{i}", "schema": case["schema"], "strict": True}}
        kwargs = dict(model=model_id, messages=[{"role": "user", "content": case["prompt"] + " Answer in JSON."}],
                      temperature=temperature, seed=i, max_tokens=200, response_format=fmt)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            return case, text, finish[-1]
        r = client.chat.completions.create(**kwargs)
        return case, r.choices[0].message.content, r.choices[0].finish_reason

    jobs = [(i, mode) for i in range(len(CASES)) for mode in ((0.0, False), (0.8, True))]
    with ThreadPoolExecutor(2) as pool:
        for case, text, finish in pool.map(ask, jobs):
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), case["schema"])


def test_json_object_and_llama_server_fields(server, client, model_id):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Describe a cat in JSON."}],
                                       temperature=0.7, seed=1, max_tokens=150, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # llama-server's own fields: json_schema and grammar (GBNF), on both endpoints
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    r = post(server, {"messages": [{"role": "user", "content": "Pick a number."}], "json_schema": schema, "max_tokens": 50})
    assert r.status_code == 200 and set(json.loads(r.json()["choices"][0]["message"]["content"])) == {"n"}
    r = post(server, {"prompt": "Is the sky blue? Answer:", "grammar": 'root ::= " yes" | " no"', "max_tokens": 5},
             "/v1/completions")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in (" yes", " no")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}, "json_schema"),
    ({"grammar": 'root ::= ("a" | '}, "grammar"),
    ({"grammar": 5}, "grammar"),
    ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}}, "grammar"),
])
def test_a_schema_that_cannot_compile_is_a_400_before_decoding(server, extra, param):
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "\n" not in err["message"], err


def test_tool_calls_with_the_openai_client(client, model_id, real_engine):
    """Two tools offered; the model calls one with arguments valid under its parameters (streamed and
    whole alike); the call and the tool's result go back through the template; then a final text reply.

    This 0.5B model, given a tool result, calls the tool again rather than answering (the prompt is
    rendered as the model's own template does: checked below), so the final turn asks for text with
    tool_choice "none"."""
    import jsonschema

    from tests.test_tool_calls import TOOLS

    question = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    kwargs = dict(model=model_id, messages=question, tools=TOOLS, temperature=0, max_tokens=100)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name in ("get_weather", "get_time") and call.id
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), params)

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [tc for d in deltas if d.tool_calls for tc in d.tool_calls]
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [(call.function.name, call.function.arguments)]
    assert "".join(d.content or "" for d in deltas) == "" and chunks[-1].choices[0].finish_reason == "tool_calls"

    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18, "sky": "cloudy"})}
    history = question + [choice.message.model_dump(exclude_none=True), result]
    rendered = real_engine.template.render(
        [question[0], {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "content": result["content"]}], add_generation_prompt=True, tools=TOOLS)
    assert "<tool_response>\n" + result["content"] in rendered
    again = client.chat.completions.create(model=model_id, messages=history, tools=TOOLS, temperature=0, max_tokens=60)
    assert again.choices[0].finish_reason in ("stop", "tool_calls", "length")
    final = client.chat.completions.create(model=model_id, messages=history, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=60)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_forced_tool_choice(client, model_id):
    """tool_choice "required" and a named function are grammar-constrained: the call always parses."""
    import jsonschema

    from tests.test_tool_calls import TOOLS

    question = [{"role": "user", "content": "Tell me a joke."}]  # nothing a tool is for
    for choice, parallel in (("required", True), ({"type": "function", "function": {"name": "get_time"}}, False)):
        r = client.chat.completions.create(model=model_id, messages=question, tools=TOOLS, tool_choice=choice,
                                           parallel_tool_calls=parallel, temperature=0.9, seed=3, max_tokens=150)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls and (parallel or len(calls) == 1)
        for call in calls:
            assert choice == "required" or call.function.name == "get_time"
            params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), params)


@pytest.mark.parametrize("extra, param", [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests(server, extra, param):
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# ---- bad input: OpenAI's error body, and the server unharmed ----------------------------------------

def post(server, body, path="/v1/chat/completions", headers=None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.base + path, content=data, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=120)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "word " * (2 * CTX)}]}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = post(server, body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_more_bad_requests(server):
    assert post(server, {"prompt": ""}, "/v1/completions").status_code == 400
    assert post(server, {"prompt": "x " * (2 * CTX)}, "/v1/completions").json()["error"]["code"] == \
        "context_length_exceeded"
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (17 << 20) + b'"}]}'
    assert post(server, big).status_code == 413
    r = httpx.get(server.base + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.base + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    ok = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "unknown_field": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client, model_id, greedy_reference):
    for _ in range(3):  # more than the slots: each leaver must have given its slot back
        body = {"messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
                "max_tokens": 400, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
    t0 = time.time()
    r = chat(client, model_id, temperature=0, max_tokens=40)
    assert r.choices[0].message.content == greedy_reference[0]
    assert time.time() - t0 < 60  # not behind 3 x 400 abandoned tokens


@pytest.fixture(scope="module")
def guarded(real_model_path):
    running = Running(real_model_path, "--parallel", "1", "--queue", "0", "--api-key", "sesame")
    yield running
    code, err = running.stop()
    assert code == 0, err


def test_api_key_is_required(guarded, model_id):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(guarded, body).status_code == 401
    assert post(guarded, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(guarded.base + "/v1/models").status_code == 401
    assert httpx.get(guarded.base + "/health").status_code == 200
    c = OpenAI(base_url=guarded.base + "/v1", api_key="sesame", max_retries=0)
    assert c.chat.completions.create(model=model_id, messages=body["messages"], max_tokens=2).choices


def test_a_full_queue_answers_503_at_once(guarded):
    auth = {"Authorization": "Bearer sesame"}
    body = {"messages": [{"role": "user", "content": "Count from 1 to 500."}], "max_tokens": 300, "stream": True}
    with httpx.stream("POST", guarded.base + "/v1/chat/completions", json=body, headers=auth, timeout=120) as r:
        lines = r.iter_lines()
        while not next(lines).startswith('data: {"id"'):
            pass
        t0 = time.time()
        busy = httpx.post(guarded.base + "/v1/chat/completions", headers=auth, timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"
        assert time.time() - t0 < 5


def test_sigterm_ends_replies_in_flight_cleanly_and_exits_0(real_model_path):
    running = Running(real_model_path)
    body = {"messages": [{"role": "user", "content": "Count from 1 to 500."}], "max_tokens": 300, "stream": True}
    with httpx.stream("POST", running.base + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        while not next(lines).startswith('data: {"id"'):
            pass
        running.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "stop"
    code, err = running.stop()
    assert code == 0 and "Traceback" not in err and "ERROR" not in err, err


# ---- speculative decoding and /stats ----------------------------------------------------------------

ECHO = ("Add type hints to this code and reply with the code only:\n\n"
        "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
        "    return 2 * (width + height)\n")


def test_stats_reports_slots_counts_and_the_cache(server, client, model_id):
    chat(client, model_id, temperature=0, max_tokens=3)
    s = httpx.get(server.base + "/stats", timeout=10).json()
    assert [slot["id"] for slot in s["slots"]] == [0, 1]
    assert all(slot["n_ctx"] == CTX and not slot["busy"] for slot in s["slots"])
    assert s["queue"] == 0 and s["requests"] >= 1 and s["completion_tokens"] >= 3
    assert s["kv_cache"]["type_k"] == "f16" and s["kv_cache"]["bytes"] > 0
    assert s["speculative"]["drafter"] == "lookup (auto)"  # on by default, by measured acceptance


def test_lookup_speculation_in_the_server_is_plain_decoding(real_model_path, real_engine):
    """With --lookup (drafts always checked), two concurrent greedy replies are the engine's plain ones,
    and /stats counts the accepted drafts."""
    import threading

    from qcpu.generate import Stats

    want = {}
    for name, message in (("echo", ECHO), ("square", MESSAGE)):
        real_engine.reset()
        prompt = real_engine.chat_prompt_tokens([{"role": "user", "content": message}])
        want[name] = "".join(p.text for p in real_engine.stream(prompt, SamplingParams(temperature=0.0), 48, Stats()))
    running = Running(real_model_path, "--lookup", "--parallel", "2", "--draft-max", "8")
    try:
        c = OpenAI(base_url=running.base + "/v1", api_key="unused", max_retries=0, timeout=300)
        got = {}

        def ask(name, message):
            got[name] = c.chat.completions.create(model=c.models.list().data[0].id, temperature=0, max_tokens=48,
                                                  messages=[{"role": "user", "content": message}]
                                                  ).choices[0].message.content

        threads = [threading.Thread(target=ask, args=a) for a in (("echo", ECHO), ("square", MESSAGE))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ask("echo", ECHO)  # alone: the exact pass
        assert got == want
        spec = httpx.get(running.base + "/stats", timeout=10).json()["speculative"]
        assert spec["drafter"] == "lookup" and 0 < spec["accepted"] <= spec["drafted"] and spec["passes"] > 0
    finally:
        code, err = running.stop()
    assert code == 0 and "Traceback" not in err, err
