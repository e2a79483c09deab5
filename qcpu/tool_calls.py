"""Tool (function) calls in the format of this model family's chat templates, mapped to OpenAI's.

Qwen2 / Qwen2.5's templates (the Hermes format) list the tools in the system turn and ask for each call as

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

after any text of the reply. This module holds that format's three pieces, so the server stays OpenAI's:
`check_tools` (OpenAI's `tools` -> what the template reads), `calls_grammar` (the constraint that forces a
call when `tool_choice` is "required" or names a function, so the call always parses) and `parse` (a
finished reply -> its text and its calls). `history` turns OpenAI's assistant `tool_calls` (arguments as
JSON text) into the template's (arguments as an object).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from qcpu.grammar import JSON_STYLE, Grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_FENCE = re.compile(r"```(?:json)?\s*(\{.*\})\s*```", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name, its arguments as JSON text (OpenAI's form) and the call's id."""

    name: str
    arguments: str
    id: str

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools) -> list[dict]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description"?, "parameters"?}}]),
    checked; the list the chat template renders. Raises ValueError with a one-line message."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("'tools' must be a non-empty list")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise ValueError(f"tools[{i}]: the function name '{name}' is given twice")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")
    return tools


def calls_grammar(tools: list[dict], name: str | None = None, parallel: bool = True) -> Grammar:
    """Replies that are one call (or, if `parallel`, one or more) of the function `name`, or of any of
    `tools`, in the template's format, arguments valid under each function's parameters schema."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice names the function '{name}', which is not in 'tools'")
    options = [{"type": "object", "properties": {"name": {"const": fn["name"]},
                                                 "arguments": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for fn in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": JSON_STYLE}
    body = json.dumps(OPEN + "\n") + " %json " + json.dumps(schema) + " " + json.dumps("\n" + CLOSE)  # Lark
    start = 'call ("\\n" call)*' if parallel else "call"
    return Grammar.from_lark(f"start: {start}\ncall: {body}\n", "tool call")


def _call(block: str, names: set[str] | None) -> ToolCall | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if (not isinstance(call, dict) or not isinstance(call.get("name"), str)
            or not isinstance(call.get("arguments", {}), dict) or (names is not None and call["name"] not in names)):
        return None
    return ToolCall(call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False), "call_" + uuid.uuid4().hex[:24])


def parse(text: str, names: set[str] | None = None) -> tuple[str, list[ToolCall]] | None:
    """A finished reply -> (its text before the first call, stripped; the calls), or None if it holds no
    call that parses (a block that is not {"name": str, "arguments": object} makes the whole reply text).

    As llama.cpp's parser for this format, a reply that is only a {"name": ..., "arguments": ...} object,
    bare or in a ```json fence, is a call too when `names` (the tools offered) has its name: small models
    of this family often write their call that way."""
    at = text.find(OPEN)
    if at < 0:
        fenced = _FENCE.fullmatch(text.strip())
        call = _call(fenced.group(1) if fenced else text.strip(), names) if names else None
        return ("", [call]) if call is not None else None
    calls = [_call(block, None) for block in _BLOCK.findall(text[at:])]
    if not calls or None in calls:
        return None
    return text[:at].strip(), calls


def may_be_call(text: str) -> bool:
    """Could `text`, the start of a reply, still become a bare or fenced call (see `parse`)? Such a start
    is held back from a stream until the reply ends."""
    t = text.lstrip()
    return t.startswith(("{", "```")) or "```json".startswith(t)


def history(message: dict, where: str) -> list[dict]:
    """An OpenAI assistant message's `tool_calls` as the template reads them (arguments as an object).
    Raises ValueError (one line naming `where`) for a malformed call."""
    out = []
    for j, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}.tool_calls[{j}] must have a 'function' with a 'name'")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except json.JSONDecodeError:
                raise ValueError(f"{where}.tool_calls[{j}].function.arguments is not valid JSON") from None
        out.append({"type": "function", "id": call.get("id"), "function": {"name": fn["name"], "arguments": args}})
    return out
