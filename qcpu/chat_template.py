"""Render a conversation to the prompt text the model was trained on, from the GGUF's own chat template.

``tokenizer.chat_template`` is a Jinja2 template written for Hugging Face transformers; we render it the
way transformers does (``transformers.utils.chat_template_utils``: ImmutableSandboxedEnvironment with
trim_blocks/lstrip_blocks and the loopcontrols extension, a ``tojson`` that does not HTML-escape,
``raise_exception``, ``strftime_now``, variables ``messages``, ``tools``, ``add_generation_prompt``,
``bos_token``, ``eos_token``), and fall back to ChatML when the file has none.

A GGUF is untrusted input, so on top of Jinja's sandbox (no ``_private`` attributes, no mutation of
lists/dicts, ``range`` <= 100000 items) we refuse, with a QcpuError pointing at ``--chat-template
chatml``, a template that

* names an underscore attribute (``__class__``, ``__globals__``, ...) -- checked when it is loaded, and
  at render time any unsafe attribute raises instead of quietly becoming undefined;
* raises (``raise_exception``, a Python error, a syntax error);
* produces more than ``1 MiB + 4 x the conversation's size`` of text, or builds an intermediate string /
  list that big with ``*``, ``+``, ``%``, ``**``, padding methods or filters;
* iterates absurdly: each ``range`` is capped at 10000 items and all ranges of one render at 1000000,
  and a render running longer than 5 s is stopped (a trace hook on the template's own frames).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from datetime import datetime
from typing import Any, Mapping

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from qcpu.errors import QcpuError

# The ChatML format Qwen models use (same text as Qwen2.5's template minus its default system prompt).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MAX_RANGE = 10_000            # items in one range(...)
RANGE_BUDGET = 1_000_000      # items over all range(...) calls of one render
BASE_OUTPUT_CAP = 1 << 20     # characters; plus 4x the size of the conversation
MAX_SECONDS = 5.0             # wall-clock per render
_HINT = "try --chat-template chatml"


class _Refused(Exception):
    pass


class _AssistantTracker(Extension):
    """Accept transformers' ``{% generation %}...{% endgeneration %}`` (marks assistant text for
    training masks); here it just renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: plain json.dumps (Jinja's own escapes <, >, &, ' for HTML).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _State(threading.local):
    def __init__(self):
        self.active = False
        self.cap = BASE_OUTPUT_CAP
        self.range_left = RANGE_BUDGET


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **kw):
        super().__init__(**kw)
        self.state = _State()

    def _check_size(self, value):
        if isinstance(value, (str, list, tuple)) and len(value) > self.state.cap:
            raise _Refused(f"builds a value of {len(value)} items (cap {self.state.cap})")
        return value

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"accesses unsafe attribute {attribute!r} of a {type(obj).__name__!r} object")

    def call_binop(self, context, operator, left, right):
        cap = self.state.cap
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > cap:
                    raise _Refused(f"repeats a value {n} times (cap {cap} items)")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                    and abs(left).bit_length() * right > 1 << 16:
                raise _Refused("computes a huge power")
        elif operator == "%" and isinstance(left, str):
            if re.search(r"%[-#0 +]*(\*|\d{5,})|\.(\*|\d{5,})", left):
                raise _Refused("formats with a huge or computed width")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                    and len(left) + len(right) > cap:
                raise _Refused(f"builds a value over {cap} items")
        return self._check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (mirrors SandboxedEnvironment.call)
        name = getattr(__obj, "__name__", "")
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format arrives wrapped
        if isinstance(owner, str):
            if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int) \
                    and args[0] > __self.state.cap:
                raise _Refused(f"pads a string to {args[0]} characters")
            if name == "expandtabs" and args and isinstance(args[0], int) and args[0] > 64:
                raise _Refused("expands tabs absurdly")
            if name in ("format", "format_map") and re.search(r"\d{5,}|\{[^}]*\{", owner):
                raise _Refused("formats with a huge or computed width")
        return __self._check_size(super().call(__context, __obj, *args, **kwargs))

    def guarded_range(self, *args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise _Refused(f"asks for range() of {len(r)} items (cap {MAX_RANGE})")
        self.state.range_left -= len(r)
        if self.state.range_left < 0:
            raise _Refused(f"iterates over more than {RANGE_BUDGET} range() items")
        return r


def _capped_filter(env, name, width_arg):
    """Wrap a builtin filter whose ``width_arg``-th argument is a padding width."""
    orig = env.filters[name]

    def f(*args, **kw):
        w = kw.get("width", args[width_arg] if len(args) > width_arg else None)
        if isinstance(w, int) and w > env.state.cap or isinstance(w, str) and len(w) > 1000:
            raise _Refused(f"asks filter {name!r} for width {w if isinstance(w, int) else len(w)}")
        return env._check_size(orig(*args, **kw))

    f.__name__ = name
    return f


def _make_env() -> _GuardedEnvironment:
    env = _GuardedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_AssistantTracker, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.filters["center"] = _capped_filter(env, "center", 1)
    env.filters["indent"] = _capped_filter(env, "indent", 1)
    fmt = env.filters["format"]

    def _format(value, *args, **kw):
        if isinstance(value, str) and re.search(r"%[-#0 +]*(\*|\d{5,})|\.(\*|\d{5,})", value):
            raise _Refused("formats with a huge or computed width")
        return env._check_size(fmt(value, *args, **kw))

    env.filters["format"] = _format
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = env.guarded_range
    return env


def _static_check(ast: nodes.Template) -> None:
    """Refuse templates that name private/dunder attributes at all (``x.__class__``, ``x['__init__']``,
    ``x|attr('__globals__')``)."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name)):
        if isinstance(node, nodes.Getattr):
            bad = node.attr
        elif isinstance(node, nodes.Getitem):
            bad = node.arg.value if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) else ""
        elif isinstance(node, nodes.Filter):
            bad = next((a.value for a in node.args if isinstance(a, nodes.Const) and isinstance(a.value, str)), "") \
                if node.name == "attr" else ""
        else:
            bad = node.name if node.name.startswith("__") else ""
        if bad.startswith("_"):
            raise QcpuError(f"the model's chat template touches Python internals ({bad!r}); refusing it, {_HINT}")


class ChatTemplate:
    """``ChatTemplate(source, bos_token, eos_token).render(messages)``.  ``source`` None/empty or
    ``"chatml"`` selects the built-in ChatML template."""

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None):
        self.is_chatml_fallback = source is None or not source.strip() or source.strip().lower() == "chatml"
        self.source = CHATML_TEMPLATE if self.is_chatml_fallback else source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self._env = _make_env()
        try:
            ast = self._env.parse(self.source)
            _static_check(ast)
            self._template = self._env.from_string(ast)
        except QcpuError:
            raise
        except Exception as e:
            raise QcpuError(f"the model's chat template does not compile ({_one_line(e)}); {_HINT}") from None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str | None = None) -> "ChatTemplate":
        """The GGUF's template (or ``source`` if given, e.g. "chatml" from --chat-template), with the
        BOS/EOS token texts from its vocabulary."""
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def text(key):
            i = meta.get(key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        return cls(source if source is not None else meta.get("tokenizer.chat_template"),
                   text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
               **extra: Any) -> str:
        """The prompt text for ``messages`` (dicts with "role" and "content").  Extra keyword
        arguments become template variables (e.g. ``enable_thinking`` for Qwen3 templates)."""
        ctx = dict(extra)
        ctx.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                   bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            size = len(json.dumps([messages, tools], default=str))
        except Exception:
            size = 0
        state = self._env.state
        if state.active:  # re-entrant use from the same thread: not expected
            raise QcpuError("chat template render re-entered")
        state.active, state.cap, state.range_left = True, BASE_OUTPUT_CAP + 4 * size, RANGE_BUDGET
        tracer = _Deadline(MAX_SECONDS)
        try:
            with tracer:
                out, n = [], 0
                for chunk in self._template.generate(**ctx):
                    n += len(chunk)
                    if n > state.cap:
                        raise _Refused(f"produced more than {state.cap} characters")
                    out.append(chunk)
            return "".join(out)
        except _Refused as e:
            raise QcpuError(f"the model's chat template {e}; refusing it, {_HINT}") from None
        except SecurityError as e:
            raise QcpuError(f"the model's chat template {_one_line(e)}; refusing it, {_HINT}") from None
        except jinja2.exceptions.TemplateError as e:
            raise QcpuError(f"the model's chat template raised an error: {_one_line(e)}; {_HINT}") from None
        except Exception as e:
            raise QcpuError(f"the model's chat template failed ({type(e).__name__}: {_one_line(e)}); {_HINT}") from None
        finally:
            state.active = False


class _Deadline:
    """Stop a render that runs too long: a trace function that only line-traces frames compiled from
    the template (filename "<template>") and raises once the deadline has passed.  Skipped when another
    tracer (debugger, coverage) is installed, so we never displace it; the other guards still apply."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._prev = None
        self._installed = False

    def __enter__(self):
        if sys.gettrace() is None:
            self.deadline = time.monotonic() + self.seconds
            sys.settrace(self._global)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            sys.settrace(None)
        return False

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename == "<template>":
            return self._local
        return None

    def _local(self, frame, event, arg):
        if time.monotonic() > self.deadline:
            raise _Refused(f"ran longer than {self.seconds:g} s")
        return self._local


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
