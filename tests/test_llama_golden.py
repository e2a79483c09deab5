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
NEAR_TIE = 0.1  # logits; see test_greedy_continuation_equals_llama_cpp


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

    diverged = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    print(f"{name}: {sum(a == b for a, b in zip(got, want))}/{len(want)} greedy tokens equal, "
          f"first divergence at {diverged}")
    # Our logits sit within ~1e-3 relative of llama.cpp's (the same distance as llama.cpp's own batched
    # vs one-token paths), so a step where llama.cpp's top two logits are closer than NEAR_TIE may go
    # either way; everything before the first such step must be identical, and where no such step
    # exists the whole continuation must be.
    margins = case["step_top1_top2_margin"]
    first_tie = next((i for i, m in enumerate(margins) if m < NEAR_TIE), len(want))
    if diverged is not None:
        assert diverged >= first_tie, f"diverged at {diverged}, llama.cpp margin {margins[diverged]:.3f}"
        assert margins[diverged] < NEAR_TIE
    for where, ours in (("first", first), ("after_16", after_16)):
        ref = case[where]
        if ref is None or ours is None:
            continue
        ids = np.array(ref["ids"])
        diff = np.abs(ours[ids] - np.array(ref["logits"])).max()
        record_property(f"{where}_max_abs_logit_diff", float(diff))
        print(f"{name} {where}: max |logit - llama.cpp| over its top-64 = {diff:.4f}")
        assert int(np.argmax(ours)) == ids[0]  # top-1 agrees
        # llama.cpp's own batched and one-token paths differ by up to ~0.5 on this model (measured:
        # n_batch 512 vs 1 on one prompt), from summation order and fp16 rounding in attention.
        assert diff < 0.4
        assert abs(float(ours.mean()) - ref["mean"]) < 0.15  # same noise floor as above
    if diverged is None:
        assert got == want


def test_perplexity_within_one_percent_of_llama_cpp(real_engine):
    ref = json.loads((GOLDEN / "perplexity.json").read_text())
    text = (DATA / "ppl_text.txt").read_text(encoding="utf-8")
    result = perplexity(real_engine, text, ctx=ref["settings"]["n_ctx"])
    assert result["tokens"] == ref["n_tokens"]
    assert result["scored_tokens"] == ref["count"]
    print(f"perplexity: qcpu {result['perplexity']:.4f}, llama.cpp {ref['perplexity']:.4f}")
    assert abs(result["perplexity"] / ref["perplexity"] - 1) < 0.01
