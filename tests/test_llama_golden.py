"""qcpu against llama.cpp on the real default model, through golden files recorded from llama-cpp-python
(tools/record_llama_goldens.py): same prompt tokens, same greedy continuation, close logits, same perplexity."""

import json
from pathlib import Path

import numpy as np
import pytest

from qcpu.perplexity import perplexity

GOLDEN = Path(__file__).parent / "golden"
DATA = Path(__file__).parent / "data"
GREEDY = json.loads((GOLDEN / "greedy.json").read_text())
CASES = {c["name"]: c for c in GREEDY["cases"]}


@pytest.mark.parametrize("name", list(CASES))
def test_chat_template_and_tokenizer_give_llama_cpp_prompt(real_engine, name):
    case = CASES[name]
    rendered = real_engine.template.render(case["messages"], add_generation_prompt=True)
    assert rendered == case["rendered"]
    assert real_engine.tokenizer.encode(rendered) == case["prompt_ids"]


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_continuation_equals_llama_cpp(real_engine, name, record_property):
    case = CASES[name]
    engine = real_engine
    engine.reset()
    want = case["generated_ids"]
    logits = engine.prefill(case["prompt_ids"])
    first = logits.copy()
    got, after_16 = [], None
    for i in range(len(want)):
        token = int(np.argmax(logits))
        got.append(token)
        if token in engine.tokenizer.eot_ids:
            break
        logits = engine.model.forward([token], engine.cache)[-1]
        if i == 15:
            after_16 = logits.copy()

    for where, ours in (("first", first), ("after_16", after_16)):
        ref = case[where]
        if ref is None or ours is None:
            continue
        ids = np.array(ref["ids"])
        diff = np.abs(ours[ids] - np.array(ref["logits"])).max()
        record_property(f"{where}_max_abs_logit_diff", float(diff))
        print(f"{name} {where}: max |logit - llama.cpp| over its top-64 = {diff:.4f}")
        assert int(np.argmax(ours)) == ids[0]  # top-1 agrees
        assert diff < 0.15
        assert abs(float(ours.mean()) - ref["mean"]) < 0.05
    assert got == want


def test_perplexity_within_one_percent_of_llama_cpp(real_engine):
    ref = json.loads((GOLDEN / "perplexity.json").read_text())
    text = (DATA / "ppl_text.txt").read_text(encoding="utf-8")
    result = perplexity(real_engine, text, ctx=ref["settings"]["n_ctx"])
    assert result["tokens"] == ref["n_tokens"]
    assert result["scored_tokens"] == ref["count"]
    print(f"perplexity: qcpu {result['perplexity']:.4f}, llama.cpp {ref['perplexity']:.4f}")
    assert abs(result["perplexity"] / ref["perplexity"] - 1) < 0.01
