"""Tool calls in the chat templates' (Hermes) format <-> OpenAI's (qcpu/tool_calls.py). The server's side,
with the openai client, is in test_server.py."""

from __future__ import annotations

import json

import jsonschema
import pytest

from qcpu.errors import QcpuError
from qcpu.tool_calls import OPEN, calls_grammar, check_tools, history, may_be_call, parse

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]


def test_parse_blocks_after_text():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse(text)
    assert content == "Let me look." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"} and calls[0].id != calls[1].id
    assert calls[0].openai()["function"]["arguments"] == calls[0].arguments


@pytest.mark.parametrize("text", [
    "no call here",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',  # cut short
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',  # arguments not an object
    '{"name": "delete_everything", "arguments": {}}',  # bare, but not an offered tool
])
def test_what_is_not_a_call_stays_text(text):
    assert parse(text, {"get_weather", "get_time"}) is None


@pytest.mark.parametrize("text", ['{"name": "get_time", "arguments": {"city": "Rome"}}',
                                  '```json\n{"name": "get_time", "arguments": {"city": "Rome"}}\n```'])
def test_bare_and_fenced_calls_of_offered_tools(text):
    """As llama.cpp's parser: small models of the family often write the call without the tags."""
    content, calls = parse(text, {"get_time"})
    assert content == "" and calls[0].name == "get_time" and json.loads(calls[0].arguments) == {"city": "Rome"}
    assert parse(text) is None  # without the offered names, never
    assert may_be_call(text[:1]) and may_be_call("``") and not may_be_call("Sure")


def test_history_turns_openai_arguments_into_objects():
    m = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Rome"}'}}]}
    assert history(m, "messages[1]") == [{"type": "function", "id": "call_1",
                                          "function": {"name": "get_time", "arguments": {"city": "Rome"}}}]
    with pytest.raises(ValueError, match=r"messages\[1\].tool_calls\[0\]"):
        history({"tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}, "messages[1]")


@pytest.mark.parametrize("tools, message", [
    ([], "non-empty"),
    ([{"type": "retrieval"}], r"tools\[0\]"),
    ([{"type": "function", "function": {"name": "has space"}}], "name"),
    ([WEATHER, WEATHER], "twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], "parameters"),
])
def test_bad_tools(tools, message):
    with pytest.raises(ValueError, match=message):
        check_tools(tools)


def test_forced_call_grammar_always_parses(real_engine):
    """tool_choice required / named: greedy and sampled, the reply is calls of the offered functions
    whose arguments validate against their parameters."""
    from dataclasses import replace

    from qcpu.sampling import SamplingParams

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    tok = real_engine.tokenizer
    for name, parallel in ((None, True), ("get_time", False), ("get_weather", True)):
        grammar = calls_grammar(TOOLS, name, parallel)
        grammar.check(tok)
        for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=4)):
            real_engine.reset()
            prompt = tok.encode(real_engine.template.render(
                [{"role": "user", "content": "What's the weather in Lisbon, and the time there?"}],
                add_generation_prompt=True, tools=TOOLS))
            text = "".join(p.text for p in real_engine.stream(prompt, replace(params, grammar=grammar), 200))
            assert text.startswith(OPEN)
            content, calls = parse(text)
            assert content == "" and calls and (parallel or len(calls) == 1)
            for call in calls:
                assert name in (None, call.name)
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    with pytest.raises(ValueError, match="not in 'tools'"):
        calls_grammar(TOOLS, "get_stock_price")


def test_a_tool_whose_parameters_cannot_compile(real_engine):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}
    with pytest.raises(QcpuError):
        calls_grammar([bad]).check(real_engine.tokenizer)
