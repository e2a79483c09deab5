"""Chat template tests: the real model's template against hand-written ChatML, transformers' Jinja
conventions, the ChatML fallback, and refusal of hostile templates."""

from __future__ import annotations

import json

import pytest

import qcpu.jinja_sandbox as sandbox_mod
from qcpu.chat_template import ChatTemplate
from qcpu.errors import QcpuError

CONVO = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2? Answer with <b>bold</b> & 'quotes'."},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def meta(real_model_path):
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(real_model_path).fields.items()}


# -- the real model's template --------------------------------------------------------------------------

@pytest.mark.model
def test_real_template_system_user_assistant(meta):
    t = ChatTemplate.from_metadata(meta)
    assert not t.is_chatml_fallback
    assert t.eos_token == "<|im_end|>" and t.bos_token == "<|endoftext|>"
    expected = (
        "<|im_start|>system\n"
        "You are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "What is 2+2? Answer with <b>bold</b> & 'quotes'.<|im_end|>\n"
        "<|im_start|>assistant\n"
        "4<|im_end|>\n"
    )
    assert t.render(CONVO, add_generation_prompt=False) == expected
    assert t.render(CONVO) == expected + "<|im_start|>assistant\n"
    # the built-in ChatML fallback writes the same conversation identically
    assert ChatTemplate("chatml").render(CONVO, add_generation_prompt=False) == expected


@pytest.mark.model
def test_real_template_default_system_prompt_and_tools(meta):
    t = ChatTemplate.from_metadata(meta)
    out = t.render([{"role": "user", "content": "hi"}])
    assert out == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    tool = {"type": "function", "function": {"name": "grep", "description": "find <text> & more",
                                              "parameters": {"type": "object", "properties": {}}}}
    out = t.render([{"role": "user", "content": "hi"}], tools=[tool])
    assert "\n" + json.dumps(tool, ensure_ascii=False) + "\n</tools>" in out  # tojson: no HTML escaping
    assert ChatTemplate.from_metadata(meta, source="chatml").is_chatml_fallback


# -- fallback and transformers conventions --------------------------------------------------------------

@pytest.mark.parametrize("source", [None, "", "   ", "chatml", "ChatML"])
def test_chatml_fallback(source):
    t = ChatTemplate(source, "<s>", "</s>")
    assert t.is_chatml_fallback
    assert t.render([{"role": "user", "content": "hé 你好"}]) == "<|im_start|>user\nhé 你好<|im_end|>\n<|im_start|>assistant\n"
    assert t.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == "<|im_start|>user\nx<|im_end|>\n"


def test_from_metadata_without_template():
    meta = {"tokenizer.ggml.tokens": ["a", "<s>", "</s>"], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}
    t = ChatTemplate.from_metadata(meta)
    assert t.is_chatml_fallback and t.bos_token == "<s>" and t.eos_token == "</s>"


def test_hf_conventions():
    src = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "    [{{ m.role }}|{{ m.content | tojson }}]\n"
        "{% endfor %}\n"
        "{% generation %}{{ tools | tojson(indent=None) }}{% endgeneration %}"
        "{{ strftime_now('%Y') | length }}{{ eos_token }}{% if add_generation_prompt %}>{% endif %}"
    )
    t = ChatTemplate(src, "<B>", "<E>")
    msgs = [{"role": "user", "content": "a<b>&'é"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "z"}]
    out = t.render(msgs, tools=[{"n": "<t>"}])
    # trim_blocks + lstrip_blocks: block lines leave no whitespace behind
    assert out == '<B>\n    [user|"a<b>&\'é"]\n    [assistant|"x"]\n[{"n": "<t>"}]4<E>>'
    assert t.render(msgs, add_generation_prompt=False).endswith("<E>")


def test_extra_variables_reach_template():
    t = ChatTemplate("{% if enable_thinking is defined and not enable_thinking %}no-think{% endif %}")
    assert t.render([], enable_thinking=False) == "no-think"
    assert t.render([]) == ""


def test_raise_exception_is_refused_with_hint():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok")
    assert t.render([{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(QcpuError, match="Conversation must start with user.*--chat-template chatml"):
        t.render([{"role": "assistant", "content": ""}])


# -- hostile templates ----------------------------------------------------------------------------------

HOSTILE = {
    "dunder attr": "{{ messages.__class__ }}",
    "func globals": "{{ raise_exception.__globals__ }}",
    "dunder item": "{{ messages['__class__'] }}",
    "attr filter": "{{ messages | attr('__class__') }}",
    "mro chain": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "builtins name": "{{ __builtins__ }}",
    "computed dunder": "{% set a = '__cla' ~ 'ss__' %}{{ messages | attr(a) }}",
    "computed dunder in if": "{% set a = '__cla' + 'ss__' %}{% if messages[a] %}x{% endif %}",
    "mutation": "{{ messages.append(1) }}",
    "raises": "{{ raise_exception('nope') }}",
    "python error": "{{ 1 / 0 }}",
    "undefined call": "{{ foo() }}",
    "syntax error": "{% for %}",
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "nested ranges": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "string repeat": "{{ 'x' * 10**9 }}",
    "list repeat": "{% set l = [1] * 10**9 %}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "huge power": "{{ 2 ** 100000000 }}",
    "center filter": "{{ 'x' | center(10**9) }}",
    "ljust method": "{{ 'x'.ljust(10**9) }}",
    "percent width": "{{ '%0999999999d' % 1 }}",
    "format filter width": "{{ '%0999999999d' | format(1) }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "huge output": "{% for i in range(10000) %}{% for j in range(100) %}xxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_refused(name):
    with pytest.raises(QcpuError) as ei:
        ChatTemplate(HOSTILE[name]).render(CONVO)
    msg = str(ei.value)
    assert "--chat-template chatml" in msg and "\n" not in msg


def test_endless_loop_stopped_by_deadline(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "MAX_SECONDS", 0.3)
    src = "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
    with pytest.raises(QcpuError, match="ran longer than.*--chat-template chatml"):
        ChatTemplate(src).render(CONVO)


def test_template_usable_after_refusal():
    t = ChatTemplate("{% if messages|length > 5 %}{{ 'x' * 10**9 }}{% endif %}{% for i in range(3) %}{{ i }}{% endfor %}")
    with pytest.raises(QcpuError):
        t.render(CONVO * 2)
    assert t.render(CONVO) == "012"


def test_long_conversation_within_caps():
    t = ChatTemplate("chatml")
    msgs = [{"role": "user", "content": "word " * 100_000}] * 5  # 2.5 MB of conversation: over the base cap
    assert len(t.render(msgs)) > 2_500_000
