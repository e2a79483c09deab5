"""Constrained decoding (qcpu/grammar.py): replies held to a JSON schema, any JSON object, or a grammar.

The reference is independent of llguidance: every reply is parsed with `json` and validated with the
`jsonschema` package against the schema it was constrained by (tests/data/json_schemas.json: nested
objects, arrays with min/max items, enums, bounded numbers, optional and nullable fields, `$ref` /
`$defs` / `definitions`, anyOf, string patterns), greedy and sampled; grammars are checked with `re`.
The server's side (response_format through the openai client) is in test_server.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from qcpu.errors import QcpuError
from qcpu.grammar import Grammar
from qcpu.sampling import SamplingParams, make_sampler

CASES = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
MAX_TOKENS = 200


def constrained_reply(engine, prompt: str, grammar: Grammar, params: SamplingParams) -> tuple[str, str]:
    """(text, why it stopped) of one chat reply under `grammar`."""
    from qcpu.generate import Stats

    engine.reset()
    stats = Stats()
    tokens = engine.chat_prompt_tokens([{"role": "user", "content": prompt + " Answer in JSON."}])
    text = "".join(p.text for p in engine.stream(tokens, replace(params, grammar=grammar), MAX_TOKENS, stats))
    return text, stats.stop_reason


@pytest.fixture
def cli_on_loaded_engine(real_engine, monkeypatch):
    """`qcpu generate` run in this process on the session's engine (its loading is what the subprocess
    tests below cover): the options, the schema file, the check and the stream to stdout are the CLI's."""
    from typer.testing import CliRunner

    from qcpu import cli

    def loaded(*args, **kwargs):
        real_engine.reset()
        return real_engine

    monkeypatch.setattr(cli, "_load_engine", loaded)
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(cli.app, ["generate", *args])
        assert r.exit_code == 0, r.output
        return r.stdout

    return run


@pytest.mark.parametrize("case", CASES, ids=[f"schema{i}" for i in range(len(CASES))])
def test_every_reply_validates_against_its_schema(cli_on_loaded_engine, real_engine, tmp_path, case):
    """Through `qcpu generate --json-schema FILE`, greedy and sampled (temperature 1.2, no top-k/top-p:
    the most adversarial): the reply parses and validates."""
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(case["schema"]))
    for sampling in (["--temp", "0"], ["--temp", "1.2", "--top-k", "0", "--top-p", "1", "--seed", "11"]):
        out = cli_on_loaded_engine(case["prompt"] + " Answer in JSON.", "--json-schema", str(schema_file),
                                   "-n", str(MAX_TOKENS), "--repeat-penalty", "1.1", *sampling)
        jsonschema.validate(json.loads(out), case["schema"])  # a reply cut at -n would not parse


def test_any_json_object(real_engine):
    """Sampled replies held to any JSON object close it and end the turn. A reply cut at MAX_TOKENS would
    not parse, and any JSON allows an endless array: asked to "describe a cat", one seed in eight (seed
    1) listed breeds until the cut. Asked for one short sentence, all eight seeds closed their object."""
    for seed in (1, 2):
        text, why = constrained_reply(real_engine, "Describe a cat in one short sentence.", Grammar.any_json(),
                                      SamplingParams(temperature=0.9, seed=seed))
        assert why == "end of turn", text
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("grammar, pattern", [
    ('root ::= "yes" | "no"', r"(yes|no)"),  # GBNF, llama.cpp's format
    ('root ::= [0-9]{3} "-" [0-9]{4}', r"[0-9]{3}-[0-9]{4}"),
    ('start: WORD (" " WORD)~2\nWORD: /[a-z]{2,8}/', r"[a-z]{2,8}( [a-z]{2,8}){2}"),  # Lark, llguidance's
])
def test_grammars(real_engine, grammar, pattern):
    g = Grammar.from_text(grammar)
    g.check(real_engine.tokenizer)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3)):
        text, why = constrained_reply(real_engine, "Say something.", g, params)
        assert re.fullmatch(pattern, text) and why == "end of turn", text


@pytest.mark.parametrize("make, message", [
    (lambda: Grammar.json_schema("{not json"), "not valid JSON"),
    (lambda: Grammar.json_schema("[1, 2]"), "must be a JSON object"),
    (lambda: Grammar.from_text('root ::= ("a" | '), "invalid grammar"),
])
def test_bad_input_is_one_line(make, message):
    with pytest.raises(QcpuError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("schema, message", [
    ({"type": "strin"}, "strin"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "string", "pattern": "(unclosed"}, "invalid JSON schema"),
])
def test_schema_the_library_cannot_compile(real_engine, schema, message):
    grammar = Grammar.json_schema(schema)
    with pytest.raises(QcpuError) as e:
        grammar.check(real_engine.tokenizer)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_mask_allows_exactly_the_grammar(real_engine):
    """The mask of the first token of '"yes" | "no"' allows only tokens that start one of the words, and
    after the whole word only the end-of-turn ids."""
    tok = real_engine.tokenizer
    c = Grammar.from_text('root ::= "yes" | "no"').start(tok)
    n = 151936
    ok = np.flatnonzero(c.allowed(n))
    assert len(ok) > 0
    for t in ok:
        b = tok.token_bytes(int(t))
        assert b and (b"yes".startswith(b) or b"no".startswith(b)), b
    c.accept(tok.encode("yes")[0] if len(tok.encode("yes")) == 1 else ok[0])
    if c.complete:
        assert set(np.flatnonzero(c.allowed(n))) <= set(tok.eot_ids)


def test_sampler_masks_before_drawing(real_engine):
    """Even where every logit favours a forbidden token, the sampler draws an allowed one."""
    tok = real_engine.tokenizer
    sampler = make_sampler(SamplingParams(temperature=0.0, grammar=Grammar.from_text('root ::= "no"')), tokenizer=tok)
    logits = np.zeros(151936, np.float32)
    logits[tok.encode("yes")[0]] = 100.0
    assert tok.token_bytes(sampler(logits, ())).startswith(b"n")
    with pytest.raises(ValueError):
        make_sampler(SamplingParams(grammar=Grammar.any_json()))  # a grammar needs the tokenizer


def _qcpu(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "qcpu.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_json_schema_grammar_and_json(real_model_path, tmp_path):
    """--json-schema (a file, or inline JSON), -jf, --json and --grammar through `qcpu generate`."""
    nested, primes = CASES[8], CASES[5]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(nested["schema"]))
    for case, args in ((nested, ["--json-schema", str(schema_file), "--temp", "0"]),
                       (nested, ["-jf", str(schema_file), "--temp", "0.8", "--seed", "5"]),
                       (primes, ["--json-schema", json.dumps(primes["schema"]), "--temp", "0"])):
        r = _qcpu("generate", str(real_model_path), case["prompt"], *args)
        assert r.returncode == 0, r.stderr
        jsonschema.validate(json.loads(r.stdout), case["schema"])
    r = _qcpu("generate", str(real_model_path), "Describe a dog.", "--json", "--temp", "0")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), dict), r.stderr
    grammar_file = tmp_path / "g.gbnf"
    grammar_file.write_text('root ::= "yes" | "no"\n')
    r = _qcpu("generate", str(real_model_path), "Is water wet?", "--grammar", str(grammar_file), "--temp", "0")
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no"), r.stderr


@pytest.mark.parametrize("args, code, message", [
    (["--json-schema", '{"type": "strin"}'], 1, "invalid JSON schema"),
    (["--json-schema", "{oops"], 2, "not valid JSON"),
    (["--grammar", 'root ::= ("a" | '], 2, "invalid grammar"),
    (["--json", "--grammar", 'root ::= "a"'], 2, "at most one"),
    (["--json-schema-file", "/nonexistent/schema.json"], 2, "no such file"),
])
def test_cli_bad_constraint_is_one_line(real_model_path, args, code, message):
    r = _qcpu("generate", str(real_model_path), "hi", *args)
    assert r.returncode == code and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_chat_holds_every_reply_to_the_schema(real_model_path):
    """`qcpu chat --json-schema` (piped): each turn's reply is a valid document; a bad schema is refused
    at start, before any turn."""
    case = CASES[0]
    r = subprocess.run([sys.executable, "-m", "qcpu.cli", "chat", str(real_model_path), "--json-schema",
                        json.dumps(case["schema"]), "--temp", "0.7", "--seed", "2"],
                       input="Invent a person.\nAnother one, older.\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(replies) == 2
    for line in replies:
        jsonschema.validate(json.loads(line), case["schema"])
    r = subprocess.run([sys.executable, "-m", "qcpu.cli", "chat", str(real_model_path), "--json-schema", '{"type": "strin"}'],
                       input="hi\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "invalid JSON schema" in r.stderr and r.stdout == ""
