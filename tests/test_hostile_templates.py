"""Hostile chat templates are refused with a one-line QcpuError suggesting `--chat-template chatml`;
ordinary templates render exactly as plain Jinja renders them.

A template lives inside the GGUF: it is code from a stranger. Beyond Python-internals access, the threat
is resource exhaustion: loops, recursion, and values whose printed size explodes (string/list repetition,
formatting widths, `replace`/`join`/`indent` amplification, and shared nested structures whose repr,
tojson or `==` walk is exponential). Each hostile template runs in a subprocess with a 2 GB
address-space limit and a wall-clock timeout, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import qcpu.chat_template as ct_mod
import qcpu.jinja_sandbox as sandbox_mod
from qcpu.chat_template import ChatTemplate
from qcpu.jinja_sandbox import _raise_exception, _tojson
from qcpu.errors import QcpuError

CONVO = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "yo"}]

# A structure that doubles per step while costing O(steps) memory: its printed size is 2**steps.
_DOUBLE = "{% set ns = namespace(a='x', b='x') %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}"

HOSTILE = {
    # Python internals
    "class attr": "{{ messages.__class__ }}",
    "globals of a global": "{{ raise_exception.__globals__ }}",
    "cycler globals": "{{ cycler.__init__.__globals__['os'] }}",
    "subclasses via mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "mro attr": "{{ messages.mro }}{{ (messages|first).__class__.mro() }}",
    "dunder item": "{{ messages['__class__'] }}",
    "attr filter": "{{ messages | attr('__class__') }}",
    "computed attr name": "{% set a = '__cla' ~ 'ss__' %}{{ messages | attr(a) }}",
    "computed item name": "{% set a = '__cla' + 'ss__' %}{% if messages[a] %}x{% endif %}",
    "map attribute": "{{ messages | map(attribute='__class__') | list }}",
    "computed map attribute": "{% set a = '__cla' ~ 'ss__' %}{{ messages | map(attribute=a) | list }}",
    "private namespace attr": "{% set ns = namespace() %}{{ ns | attr('_Namespace__attrs') }}",
    "self internals": "{{ self._TemplateReference__context }}",
    "builtins name": "{{ __builtins__ }}",
    "list mutation": "{{ messages.append(1) }}",
    "dict mutation": "{{ messages[0].update({'role': 'x'}) }}",
    "str.format attribute": "{{ '{0.__class__}'.format(messages) }}",
    "str.format computed attribute": "{% set f = '{0._' ~ '_class__}' %}{{ f.format(messages) }}",
    "format_map attribute": "{{ '{m.__class__}'.format_map({'m': messages}) }}",
    "str.translate": "{{ 'abc'.translate({97: 'x'}) }}",
    "include": "{% include '/etc/passwd' %}",
    "import": "{% import 'os' as os %}{{ os }}",
    # loops and recursion
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "huge range with step": "{% for i in range(0, 10**12, 10**6) %}{% endfor %}",
    "nested ranges": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "loop over a big string": "{% for c in 'x' * 100000 %}{% for d in 'x' * 100000 %}{% endfor %}{% endfor %}",
    "macro recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "mutual recursion": "{% macro f() %}{{ g() }}{% endmacro %}{% macro g() %}{{ f() }}{% endmacro %}{{ f() }}",
    "exponential macro": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(50) }}",
    "recursive loop": "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "caller recursion": ("{% macro g() %}{{ caller() }}{% endmacro %}"
                         "{% macro f() %}{% call g() %}{{ f() }}{% endcall %}{% endmacro %}{{ f() }}"),
    "big-int squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "huge power": "{{ 2 ** 100000000 }}",
    "sum of lists": "{{ ([[1]] * 100000) | sum(start=[]) | length }}",
    # size amplification
    "string repeat": "{{ 'x' * 10**9 }}",
    "list repeat": "{% set l = [1] * 10**9 %}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "nested repeat repr": "{% set a = ['x' * 1000] * 1000 %}{% set b = [a] * 1000 %}{{ b }}",
    "list-literal doubling repr": _DOUBLE + "{{ ns.a }}",
    "list-literal doubling tojson": _DOUBLE + "{{ ns.a | tojson }}",
    "list-literal doubling string": _DOUBLE + "{{ ns.a | string | length }}",
    "list-literal doubling ==": _DOUBLE.replace("{% endfor %}", "{% set ns.b = [ns.b, ns.b] %}{% endfor %}")
                                + "{{ ns.a == ns.b }}",
    "tuple doubling hash": "{% set ns = namespace(a='x') %}{% for i in range(60) %}{% set ns.a = (ns.a, ns.a) %}{% endfor %}{{ ns.a in {} }}",
    "dict doubling": "{% set ns = namespace(d={}) %}{% for i in range(60) %}{% set ns.d = {'l': ns.d, 'r': ns.d} %}{% endfor %}{{ ns.d }}",
    "dict() doubling": "{% set ns = namespace(d=1) %}{% for i in range(60) %}{% set ns.d = dict(l=ns.d, r=ns.d) %}{% endfor %}{{ ns.d }}",
    "replace filter": "{{ ('a' * 100000) | replace('', 'b' * 100000) }}",
    "replace method": "{{ ('a' * 100000).replace('', 'b' * 100000) }}",
    "join filter": "{% set l = ['x' * 100000] * 10 %}{% set m = [l] * 10 %}{{ m | join }}",
    "join separator": "{{ range(10000) | join('x' * 1000000) }}",
    "join method": "{{ ('x' * 100000).join(['y'] * 100000) }}",
    "indent lines": "{{ ('a\\n' * 100000) | indent(100000) }}",
    "center filter": "{{ 'x' | center(10**9) }}",
    "ljust method": "{{ 'x'.ljust(10**9) }}",
    "expandtabs": "{{ ('\\t' * 1000000).expandtabs(64) }}",
    "percent width": "{{ '%0999999999d' % 1 }}",
    "percent mapping width": "{{ '%(a)0999999999d' % {'a': 1} }}",
    "percent precision": "{{ '%.100000f' % 1.0 }}",
    "percent star width": "{{ '%*d' % (999999999, 1) }}",
    "percent many fields": "{{ ('%(a)s' * 100000) % {'a': 'x' * 100000} }}",
    "format filter width": "{{ '%(a)0999999999d' | format(a=1) }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "str.format nested width": "{{ '{:>{w}}'.format(1, w=999999999) }}",
    "str.format many fields": "{{ ('{0}' * 100000).format('x' * 100000) }}",
    "wordwrap": "{{ ('x' * 1000000) | wordwrap(1) }}",
    "wordwrap wrapstring": "{{ ('x ' * 100000) | wordwrap(2, wrapstring='y' * 100000) }}",
    "tojson indent": "{{ range(10000) | list | tojson(indent=1000000) }}",
    "tojson separators": "{{ range(10000) | list | tojson(separators=('x' * 1000000, ':')) }}",
    "batch fill": "{{ [1] | batch(10**9, 0) | list | length }}",
    "slice count": "{{ range(10) | slice(10**8) | list | length }}",
    "lipsum": "{{ lipsum(10**6) }}",
    "huge output": "{% for i in range(10000) %}{% for j in range(100) %}xxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
    "huge set block": "{% set big = 'x' * 1000000 %}{% set out %}{% for i in range(10000) %}{{ big }}{% endfor %}{% endset %}",
    "huge macro body": "{% set big = 'x' * 1000000 %}{% macro m() %}{% for i in range(10000) %}{{ big }}{% endfor %}{% endmacro %}{{ m() | length }}",
    "messages repeated": "{{ messages * 100000 }}",
    # plain errors
    "raises": "{{ raise_exception('nope') }}",
    "python error": "{{ 1 / 0 }}",
    "undefined call": "{{ foo() }}",
    "syntax error": "{% for %}",
}

_RUNNER = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))
    from qcpu.chat_template import ChatTemplate
    from qcpu.errors import QcpuError
    convo = json.loads(sys.argv[2])
    out = []
    for src in json.loads(sys.argv[1]):
        t0 = time.monotonic()
        try:
            ChatTemplate(src).render(convo)
            out.append(["rendered", "", time.monotonic() - t0])
        except QcpuError as e:
            out.append(["refused", str(e), time.monotonic() - t0])
        except BaseException as e:
            out.append(["other", type(e).__name__ + ": " + str(e)[:200], time.monotonic() - t0])
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def hostile_results():
    """Render every hostile template in one subprocess (2 GB address-space limit, 180 s timeout)."""
    names = list(HOSTILE)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps([HOSTILE[n] for n in names]),
                           json.dumps(CONVO)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(zip(names, json.loads(proc.stdout)))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_refused(hostile_results, name):
    status, msg, seconds = hostile_results[name]
    assert status == "refused", (status, msg)
    assert "--chat-template chatml" in msg and "\n" not in msg, msg
    assert seconds < sandbox_mod.MAX_SECONDS + 2, seconds


def test_internals_are_refused_at_load_time():
    """Naming an underscore attribute is refused before anything renders."""
    for src in ("{{ x.__class__ }}", "{{ x|attr('__dict__') }}", "{{ x|map(attribute='__init__')|list }}",
                "{% if false %}{{ cycler.__init__.__globals__ }}{% endif %}"):
        with pytest.raises(QcpuError, match="touches Python internals.*--chat-template chatml"):
            ChatTemplate(src)


def test_deadline_stops_a_long_render(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "MAX_SECONDS", 0.3)
    src = "{% for a in range(10000) %}{% for b in range(100) %}{% endfor %}{% endfor %}"
    with pytest.raises(QcpuError, match="ran longer than 0.3 s.*--chat-template chatml"):
        ChatTemplate(src).render(CONVO)


def test_refusal_leaves_the_template_usable():
    t = ChatTemplate("{% if messages|length > 3 %}{{ ('{0}' * 100000).format('x' * 100000) }}{% endif %}"
                     "{% for m in messages %}{{ m.role[0] }}{% endfor %}")
    with pytest.raises(QcpuError):
        t.render(CONVO * 2)
    assert t.render(CONVO) == "sua"


# -- ordinary templates render exactly as plain Jinja renders them --------------------------------------

_TOOL_TEMPLATE = """\
{%- macro render_args(args) -%}
{%- if args is string %}{{ args }}{% else %}{{ args | tojson }}{% endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{% endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{% endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1, seen=[]) %}
{%- for message in messages[::-1] %}
{%- if ns.last_user < 0 and message.role == 'user' %}{% set ns.last_user = messages|length - 1 - loop.index0 %}{% endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' ~ message.role ~ '\\n' ~ content | trim ~ '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>assistant\\n' }}
{%- if loop.index0 > ns.last_user and reasoning %}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{% endif %}
{{- content }}
{%- for tc in message.tool_calls | default([]) %}
{%- set f = tc.function if tc.function is defined else tc %}
{{- '\\n<tool_call>\\n{"name": "%s", "arguments": ' | format(f.name) }}{{- render_args(f.arguments) }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{% endif %}
{{- '\\n<tool_response>\\n' ~ content ~ '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{% endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{% endif %}
{%- endif %}
"""

_FILTER_TOUR = """\
{%- set roles = messages | map(attribute='role') | list -%}
{{ roles | join(', ') }}|{{ roles | unique | sort | join('/') }}|{{ messages | selectattr('role', 'equalto', 'user') | list | length }}
{{ messages | rejectattr('role', 'in', ['system']) | map(attribute='content') | map('upper') | join(' ') | center(40) }}
{% for k, v in {'b': 2, 'a': 1} | dictsort %}{{ k }}={{ v }};{% endfor %}{{ {'x': [1, 2]} | tojson(indent=2) | indent(2) }}
{{ '%s has %d chars' | format(roles[0], roles[0] | length) }} {{ '{}-{:>5}'.format('a', 'b') }} {{ '%-6s|' % 'ab' }}
{{ (messages | last).content | replace('y', 'Y') | title }} {{ 'a,b,,c'.split(',') | reject('equalto', '') | list }}
{{ range(3) | list | sum }} {{ [3, 1, 2] | max }} {{ 'Hello World' | wordcount }} {{ 'x' * 3 ~ '-' * 2 }}
{{ ('word ' * 30) | wordwrap(20) | length }} {{ ('%.3f' % 3.14159) }} {{ 10 ** 3 }} {{ [1, 2] + [3] }} {{ (1, 2) }}
{% set buf %}{% for m in messages %}[{{ loop.index }}:{{ m.role | first }}]{% endfor %}{% endset %}{{ buf | length }}{{ buf }}
{{ messages | groupby('role') | map(attribute='grouper') | join(',') }} {{ range(10) | batch(4, 0) | list }} {{ range(7) | slice(3) | list }}
{{ 'ab' | reverse }} {{ 'x' is string }} {{ cycler('a', 'b').next() }} {{ joiner(',')() }}
{{ lipsum(1, false, 5, 10) | wordcount > 4 }}
"""

_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <b>now</b> & 'then'",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
_CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    CONVO,
    [{"role": "user", "content": "weather in Paris?"},
     {"role": "assistant", "content": "<think>\nlook it up\n</think>\n\n",
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"},
     {"role": "assistant", "content": "21C and sunny"}, {"role": "system", "content": "late system"},
     {"role": "user", "content": "thanks"},
     {"role": "assistant", "content": "<think>ok</think>You're welcome", "tool_calls": [
         {"name": "log", "arguments": "{\"x\": 1}"}]}],
]


def _plain_jinja(src: str, messages, **kw) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(src).render(messages=messages, bos_token="", eos_token="", **kw)


def _assert_renders_like_plain_jinja(src: str) -> None:
    for convo in _CONVERSATIONS:
        for tools in (None, _TOOLS):
            for extra in ({}, {"enable_thinking": False}):
                for gen in (True, False):
                    got = ChatTemplate(src).render(convo, add_generation_prompt=gen, tools=tools, **extra)
                    want = _plain_jinja(src, convo, add_generation_prompt=gen, tools=tools, **extra)
                    assert got == want


@pytest.mark.parametrize("name", ["chatml", "tool template"])
def test_ordinary_templates_render_like_plain_jinja(name):
    _assert_renders_like_plain_jinja({"chatml": ct_mod.CHATML_TEMPLATE, "tool template": _TOOL_TEMPLATE}[name])


def test_real_model_template_renders_like_plain_jinja(real_model_path):
    from qcpu.gguf_file import GGUFFile

    _assert_renders_like_plain_jinja(GGUFFile(real_model_path).metadata["tokenizer.chat_template"])


def test_filter_tour_renders_like_plain_jinja():
    """Common filters, methods and operators, within the caps, give plain Jinja's output."""
    for convo in _CONVERSATIONS:
        got = ChatTemplate(_FILTER_TOUR).render(convo, add_generation_prompt=False)
        want = _plain_jinja(_FILTER_TOUR, convo, add_generation_prompt=False)
        assert got == want  # (lipsum is random, but its last line only says True)


def test_big_conversation_is_not_refused():
    """Caps scale with the conversation: 2.5 MB of messages through the tool template and tojson."""
    msgs = [{"role": "user", "content": "word " * 100_000}, {"role": "assistant", "content": "ok " * 100_000}] * 3
    out = ChatTemplate(_TOOL_TEMPLATE).render(msgs, tools=_TOOLS)
    assert len(out) > 2_000_000
    assert len(ChatTemplate("{{ messages | tojson }}").render(msgs)) > 2_000_000
