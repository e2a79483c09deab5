"""A hardened Jinja2 sandbox for templates that come from untrusted files (a GGUF's chat template).

The environment is the one transformers renders chat templates with (``transformers.utils.
chat_template_utils``: ImmutableSandboxedEnvironment with trim_blocks/lstrip_blocks and the loopcontrols
extension, a ``tojson`` that does not HTML-escape, ``raise_exception``, ``strftime_now``).

On top of Jinja's immutable sandbox (no ``_private`` attributes, no mutation of lists/dicts)
`SandboxedTemplate` refuses, with a one-line QcpuError, a template that

* names an underscore attribute (``__class__``, ``__globals__``, ...) -- checked when it is loaded, and
  at render time any unsafe attribute raises instead of quietly becoming undefined;
* raises (``raise_exception``, a Python error, a syntax error, unbounded recursion);
* builds any value bigger than the output cap (``1 MiB + 4 x the conversation's size``), measured as its
  printed size *including nesting*, so ``{% set a = [a, a] %}`` doubling or ``[[s] * 1000] * 1000``
  cannot hide a gigabyte-sized ``repr`` / ``tojson`` / ``==`` behind a small object. Every list, tuple
  and dict literal, ``~`` concatenation, ``+ * % **`` operation, filter result, call result and output
  expression is measured (cheaply: the walk stops at the cap), and operations whose result can dwarf
  their inputs (``*``, ``%``/``format`` with widths or many fields, ``replace``, ``join``, ``indent``,
  ``wordwrap``, ``tojson`` indentation, padding, ``batch``/``slice`` counts, big-int products) are
  estimated *before* they run;
* produces more than 8 x the cap over all its output expressions (including captured ``set`` blocks and
  macro bodies), or more than the cap in one buffer;
* iterates absurdly: each ``range`` is capped at 10000 items and all ranges of one render at 1000000,
  and a render running longer than 5 s is stopped (a trace hook on the template's own frames). Since
  every single operation is bounded by the size caps, no untraced C-level step can run for long.

String methods are limited to a list of harmless ones (plus the estimated ones above); ``lipsum`` is
capped.
"""

from __future__ import annotations

import inspect
import json
import re
import string
import sys
import threading
import time
from datetime import datetime
from typing import Any, Mapping

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

from qcpu.errors import QcpuError

MAX_RANGE = 10_000            # items in one range(...)
RANGE_BUDGET = 1_000_000      # items over all range(...) calls of one render
BASE_OUTPUT_CAP = 1 << 20     # characters; plus 4x the size of the conversation
PRODUCED_FACTOR = 8           # all output expressions of one render together: 8 x the cap
MAX_SECONDS = 5.0             # wall-clock per render
MAX_WIDTH = 1000              # a width/precision in a %-format or str.format spec
MAX_INT_BITS = 1 << 16        # operands/results of * and ** on integers

# str methods a template may call. Anything else on a str (translate, encode, ...) is refused.
_STR_METHODS = frozenset({
    "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith", "lower", "upper",
    "title", "capitalize", "casefold", "swapcase", "find", "rfind", "index", "rindex", "count", "partition",
    "rpartition", "isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower",
    "isnumeric", "isprintable", "isspace", "istitle", "isupper", "removeprefix", "removesuffix",
    # estimated before they run:
    "replace", "join", "format", "format_map", "center", "ljust", "rjust", "zfill", "expandtabs",
})
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
_FORMAT_WIDTH = re.compile(r"(\d+)")


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


def _weight(x: Any, limit: int, indent: int = 0) -> int:
    """Roughly how many characters ``str``/``repr``/``tojson`` of x would print, counting shared
    sub-objects every time they appear (as printing does). Stops as soon as the count passes `limit`,
    so it costs at most ~limit steps whatever x is. With `indent`, adds what JSON indentation would:
    a newline plus depth x indent characters per element."""
    total = 0
    stack = [(x, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            n = len(v)
            total += 2 + 2 * n + (n * (1 + (depth + 1) * indent) if indent else 0)
            if total > limit:
                return total
            if isinstance(v, dict):
                for k, item in v.items():
                    push((k, depth + 1))
                    push((item, depth + 1))
            else:
                for item in v:
                    push((item, depth + 1))
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, Namespace):
            push((v._Namespace__attrs, depth))  # noqa: SLF001 -- our own accounting, not the template's
        elif isinstance(v, (bytes, bytearray)):
            total += 4 * len(v) + 3
        else:
            total += 24
        if total > limit:
            return total
    return total


class _State(threading.local):
    def __init__(self):
        self.active = False
        self.cap = BASE_OUTPUT_CAP
        self.range_left = RANGE_BUDGET
        self.produced_left = PRODUCED_FACTOR * BASE_OUTPUT_CAP


class _GuardedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with every list/tuple/dict literal and every ``~`` concatenation passed
    through the environment's size guard (plain Jinja builds those with bare Python syntax)."""

    def _guarded(self, visit, node, frame):
        self.write("environment.guard_value(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame):
        self._guarded(super().visit_List, node, frame)

    def visit_Dict(self, node, frame):
        self._guarded(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame):
        if node.ctx == "load":
            self._guarded(super().visit_Tuple, node, frame)
        else:  # an assignment target
            super().visit_Tuple(node, frame)

    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.guarded_concat({func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _GuardedCodeGenerator

    def __init__(self, **kw):
        super().__init__(finalize=self.guard_output, **kw)
        self.state = _State()
        self.concat = self.guarded_buffer_concat  # the generated code's `concat` (blocks, macros, set)

    # -- size accounting ---------------------------------------------------------------------------

    def _size(self, value, indent: int = 0) -> int:
        if isinstance(value, str) and not indent:
            return len(value)
        return _weight(value, self.state.cap, indent)

    def guard_value(self, value):
        """Refuse a value whose printed size would pass the cap."""
        if isinstance(value, (str, list, tuple, dict, set, frozenset, Namespace)):
            n = self._size(value)
            if n > self.state.cap:
                raise _Refused(f"builds a value of more than {self.state.cap} characters")
        elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _Refused("builds a huge number")
        return value

    def guard_output(self, value):
        """Jinja's `finalize`: every ``{{ expression }}`` output, into the stream or a buffer."""
        if isinstance(value, Undefined):
            return value
        n = self._size(value)
        if n > self.state.cap:
            raise _Refused(f"outputs a value of more than {self.state.cap} characters")
        self.state.produced_left -= n
        if self.state.produced_left < 0:
            raise _Refused(f"produces more than {PRODUCED_FACTOR * self.state.cap} characters in all")
        return value

    def guarded_concat(self, join, parts):
        """``a ~ b ~ c``."""
        total = 0
        for p in parts:
            total += self._size(p)
            if total > self.state.cap:
                raise _Refused(f"concatenates more than {self.state.cap} characters")
        return join(parts)

    def guarded_buffer_concat(self, parts):
        """Joining a captured buffer (set block, macro, call block, filter block)."""
        parts = parts if isinstance(parts, list) else list(parts)
        if sum(map(len, parts)) > self.state.cap:
            raise _Refused(f"captures more than {self.state.cap} characters in a block")
        return "".join(parts)

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"accesses unsafe attribute {attribute!r} of a {type(obj).__name__!r} object")

    # -- estimates before the operation --------------------------------------------------------------

    def _check_percent(self, fmt: str, args) -> None:
        """``fmt % args``: widths/precisions sane, and (#specs x biggest argument) under the cap."""
        n_specs = 0
        for m in _PRINTF_SPEC.finditer(fmt):
            width, precision, conv = m.groups()
            if conv == "%":
                continue
            n_specs += 1
            for num in (width, precision):
                if num == "*" or num is not None and int(num) > MAX_WIDTH:
                    raise _Refused("formats with a huge or computed width")
        values = args.values() if isinstance(args, Mapping) else args if isinstance(args, tuple) else (args,)
        biggest = max((self._size(v) for v in values), default=0)
        if len(fmt) + n_specs * biggest > self.state.cap:
            raise _Refused(f"formats more than {self.state.cap} characters")

    def _check_str_format(self, fmt: str, args, kwargs) -> None:
        """``fmt.format(*args, **kwargs)``: no nested fields, sane widths, bounded size."""
        n_fields = 0
        try:
            for _, field, spec, _ in string.Formatter().parse(fmt):
                if field is None:
                    continue
                n_fields += 1
                if spec and ("{" in spec or any(int(d) > MAX_WIDTH for d in _FORMAT_WIDTH.findall(spec))):
                    raise _Refused("formats with a huge or computed width")
        except ValueError:
            return  # malformed: str.format itself raises
        biggest = max((self._size(v) for v in (*args, *kwargs.values())), default=0)
        if len(fmt) + n_fields * biggest > self.state.cap:
            raise _Refused(f"formats more than {self.state.cap} characters")

    def _check_replace(self, s, old, new, count=None) -> None:
        if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
            return
        hits = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        if len(s) + hits * (len(new) - len(old)) > self.state.cap:
            raise _Refused(f"replaces its way past {self.state.cap} characters")

    def _joined(self, items, sep) -> list:
        """Materialise what ``join`` joins and check the result's size first."""
        items = list(items)
        if self._size(items) + len(items) * len(str(sep)) > self.state.cap:
            raise _Refused(f"joins more than {self.state.cap} characters")
        return items

    def _check_width(self, width, what: str) -> None:
        if isinstance(width, int) and width > self.state.cap:
            raise _Refused(f"pads a string to {width} characters ({what})")

    def call_binop(self, context, operator, left, right):
        cap = self.state.cap
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise _Refused("multiplies huge numbers")
            else:
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n > 0 \
                            and self._size(seq) * n > cap:
                        raise _Refused(f"repeats a value {n} times (over {cap} characters)")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                    and abs(left).bit_length() * right > MAX_INT_BITS:
                raise _Refused("computes a huge power")
        elif operator == "%" and isinstance(left, str):
            self._check_percent(left, right)
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                    and self._size(left) + self._size(right) > cap:
                raise _Refused(f"builds a value over {cap} characters")
        return self.guard_value(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (mirrors SandboxedEnvironment.call)
        name = getattr(__obj, "__name__", "")
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format arrives wrapped
        if isinstance(owner, str):
            if name not in _STR_METHODS:
                raise _Refused(f"calls str.{name}()")
            if name in ("ljust", "rjust", "center", "zfill") and args:
                __self._check_width(args[0], f"str.{name}")
            elif name == "expandtabs":
                size = args[0] if args else kwargs.get("tabsize", 8)
                if isinstance(size, int) and len(owner) + owner.count("\t") * size > __self.state.cap:
                    raise _Refused("expands tabs past the cap")
            elif name == "format":
                __self._check_str_format(owner, args, kwargs)
            elif name == "format_map" and args and isinstance(args[0], Mapping):
                __self._check_str_format(owner, (), args[0])
            elif name == "replace" and len(args) >= 2:
                __self._check_replace(owner, *args[:3])
            elif name == "join" and len(args) == 1:
                args = (__self._joined(args[0], owner),)
        return __self.guard_value(super().call(__context, __obj, *args, **kwargs))

    def guarded_range(self, *args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise _Refused(f"asks for range() of {len(r)} items (cap {MAX_RANGE})")
        self.state.range_left -= len(r)
        if self.state.range_left < 0:
            raise _Refused(f"iterates over more than {RANGE_BUDGET} range() items")
        return r


# Checks run before a builtin filter, on its bound arguments (by parameter name); may replace them.
def _pre_replace(env, a):
    env._check_replace(a.get("s"), a.get("old"), a.get("new"), a.get("count"))


def _pre_join(env, a):
    a["value"] = env._joined(a["value"], a.get("d", ""))


def _pre_center(env, a):
    env._check_width(a.get("width", 80), "center")


def _pre_indent(env, a):
    s, width = a.get("s"), a.get("width", 4)
    w = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
    if isinstance(s, str) and len(s) + (s.count("\n") + 1) * max(w, 0) > env.state.cap:
        raise _Refused(f"indents past {env.state.cap} characters")


def _pre_wordwrap(env, a):
    s, width, wrap = a.get("s"), a.get("width", 79), a.get("wrapstring")
    if not isinstance(s, str) or not isinstance(width, int):
        return
    lines = len(s) // max(width, 1) + s.count("\n") + 1
    # textwrap re-slices a long word once per output line: ~len(s)^2 / width character copies.
    if len(s) * len(s) // max(width, 1) > 2_000_000_000 or \
            isinstance(wrap, str) and len(s) + lines * len(wrap) > env.state.cap:
        raise _Refused("word-wraps absurdly")


def _pre_format(env, a):
    value = a.get("value")
    if isinstance(value, str):
        kwargs = a.get("kwargs") or {}
        env._check_percent(value, kwargs if kwargs else tuple(a.get("args") or ()))


def _pre_count(param: str, limit: int):
    def check(env, a):
        n = a.get(param)
        if isinstance(n, int) and n > limit:
            raise _Refused(f"asks for {param} {n} (cap {limit})")
    return check


def _pre_sum(env, a):
    if not isinstance(a.get("start", 0), (int, float)):
        raise _Refused("sums non-numbers")


def _pre_tojson(env, a):
    indent, seps = a.get("indent"), a.get("separators")
    ind = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if ind > 16 or seps is not None and any(isinstance(x, str) and len(x) > 16 for x in seps):
        raise _Refused("asks tojson for absurd indentation or separators")
    if _weight(a.get("x"), env.state.cap, max(ind, 0)) > env.state.cap:
        raise _Refused(f"serialises more than {env.state.cap} characters")


def _pre_pprint(env, a):
    if _weight(a.get("value"), 200_000) > 200_000:  # pprint is pure Python: keep it small
        raise _Refused("pretty-prints a huge value")


def _pre_urlize(env, a):
    if any(isinstance(a.get(k), str) and len(a[k]) > 100 for k in ("target", "rel")):
        raise _Refused("asks urlize for absurd attributes")


def _pre_truncate(env, a):
    if isinstance(a.get("end"), str) and len(a["end"]) > env.state.cap:
        raise _Refused("truncates with a huge ending")


_FILTER_PRE = {
    "replace": _pre_replace, "join": _pre_join, "center": _pre_center, "indent": _pre_indent,
    "wordwrap": _pre_wordwrap, "format": _pre_format, "batch": _pre_count("linecount", 100_000),
    "slice": _pre_count("slices", 10_000), "sum": _pre_sum, "tojson": _pre_tojson, "pprint": _pre_pprint,
    "urlize": _pre_urlize, "truncate": _pre_truncate,
}


def _guard_filter(env: _GuardedEnvironment, name: str, fn):
    """Wrap a filter: its estimate (if any) before, the size guard on its result after."""
    pre = _FILTER_PRE.get(name)
    sig = inspect.signature(fn)
    # Jinja's async_variant filters take an eval context first but report the signature of the function
    # they wrap (without it): skip that argument when binding.
    first = next(iter(sig.parameters), "")
    skip = 1 if hasattr(fn, "jinja_pass_arg") and first not in ("eval_ctx", "context", "environment", "env") else 0

    def guarded(*args, **kwargs):
        if pre is not None:
            bound = sig.bind(*args[skip:], **kwargs)
            pre(env, bound.arguments)
            args, kwargs = args[:skip] + bound.args, bound.kwargs
        return env.guard_value(fn(*args, **kwargs))

    guarded.__name__ = getattr(fn, "__name__", name)
    if hasattr(fn, "jinja_pass_arg"):  # keep Jinja's (environment / context / eval_ctx) first argument
        guarded.jinja_pass_arg = fn.jinja_pass_arg
    return guarded


def _lipsum(env: _GuardedEnvironment, lipsum):
    def capped(n=5, html=True, min=20, max=100):  # noqa: A002 -- lipsum's own parameter names
        if n > 20 or max > 1000 or min > 1000:
            raise _Refused("asks lipsum for too much text")
        return lipsum(n, html, min, max)
    return capped


def _make_env() -> _GuardedEnvironment:
    env = _GuardedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_AssistantTracker, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    for name, fn in list(env.filters.items()):
        env.filters[name] = _guard_filter(env, name, fn)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = env.guarded_range
    env.globals["lipsum"] = _lipsum(env, env.globals["lipsum"])
    return env


def _static_check(ast: nodes.Template, what: str, hint: str) -> None:
    """Refuse templates that name private/dunder attributes at all (``x.__class__``, ``x['__init__']``,
    ``x|attr('__globals__')``, ``x|map(attribute='__class__')``)."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name)):
        if isinstance(node, nodes.Getattr):
            bad = node.attr
        elif isinstance(node, nodes.Getitem):
            bad = node.arg.value if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) else ""
        elif isinstance(node, nodes.Filter):
            consts = [a.value for a in node.args if isinstance(a, nodes.Const) and isinstance(a.value, str)] \
                if node.name == "attr" else []
            consts += [k.value.value for k in node.kwargs if k.key == "attribute"
                       and isinstance(k.value, nodes.Const) and isinstance(k.value.value, str)]
            bad = next((c for c in consts if c.startswith("_")), "")
        else:
            bad = node.name if node.name.startswith("__") else ""
        if bad.startswith("_"):
            raise QcpuError(f"{what} touches Python internals ({bad!r}); refusing it{hint}")


class SandboxedTemplate:
    """``SandboxedTemplate(source).render(**variables) -> str`` under the guards above.

    Errors (compile, refusal, the template's own exceptions) are one-line QcpuErrors that start with
    `what` and end with `hint` (e.g. what to do instead). Not re-entrant within one thread."""

    def __init__(self, source: str, what: str = "the template", hint: str = ""):
        self.what, self.hint = what, f", {hint}" if hint else ""
        self._env = _make_env()
        try:
            ast = self._env.parse(source)
            _static_check(ast, self.what, self.hint)
            self._template = self._env.from_string(ast)
        except QcpuError:
            raise
        except Exception as e:
            raise QcpuError(f"{what} does not compile ({_one_line(e)}){self._semi()}") from None

    def _semi(self) -> str:
        return f"; {self.hint[2:]}" if self.hint else ""

    def render(self, input_size: int = 0, **variables: Any) -> str:
        """Render with `variables`; `input_size` (characters, e.g. the conversation's JSON size) raises
        the output cap to BASE_OUTPUT_CAP + 4 x input_size."""
        what = self.what
        state = self._env.state
        if state.active:  # re-entrant use from the same thread: not expected
            raise QcpuError(f"{what} render re-entered")
        state.active, state.cap, state.range_left = True, BASE_OUTPUT_CAP + 4 * input_size, RANGE_BUDGET
        state.produced_left = PRODUCED_FACTOR * state.cap
        tracer = _Deadline(MAX_SECONDS)
        try:
            with tracer:
                out, n = [], 0
                for chunk in self._template.generate(**variables):
                    n += len(chunk)
                    if n > state.cap:
                        raise _Refused(f"produced more than {state.cap} characters")
                    out.append(chunk)
            return "".join(out)
        except _Refused as e:
            raise QcpuError(f"{what} {e}; refusing it{self.hint}") from None
        except SecurityError as e:
            raise QcpuError(f"{what} {_one_line(e)}; refusing it{self.hint}") from None
        except jinja2.exceptions.TemplateError as e:
            raise QcpuError(f"{what} raised an error: {_one_line(e)}{self._semi()}") from None
        except Exception as e:
            raise QcpuError(f"{what} failed ({type(e).__name__}: {_one_line(e)}){self._semi()}") from None
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
