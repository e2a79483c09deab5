"""Passkey retrieval on the default model, against llama.cpp's answers on the same prompts (recorded by
tools/passkey.py --llama-cpp --record; the long runs, 4K to 30K tokens, are that tool's job)."""

import json
from pathlib import Path

import pytest

from tests.passkey import found, passkey_messages

GOLDEN = json.loads((Path(__file__).parent / "golden" / "passkey.json").read_text())


@pytest.fixture(scope="module")
def engine(real_model_path):
    from qcpu.generate import Engine

    return Engine.load(real_model_path, ctx=4096)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['n_tokens']}@{c['depth']}")
def test_passkey_found_where_llama_cpp_finds_it(engine, case):
    from qcpu.sampling import SamplingParams

    messages = passkey_messages(engine.tokenizer, case["n_tokens"], case["depth"], GOLDEN["key"])
    prompt = engine.tokenizer.encode(engine.template.render(messages, add_generation_prompt=True))
    assert len(prompt) == case["prompt_tokens"]  # the same prompt llama.cpp answered
    engine.reset()
    reply = engine.tokenizer.decode(list(engine.generate_tokens(prompt, SamplingParams(temperature=0, repeat_penalty=1.0), 16)))
    assert found(reply, GOLDEN["key"]) == case["llama_found"], (reply, case["llama"])
    assert case["llama_found"], "llama.cpp itself should find it at this length"
