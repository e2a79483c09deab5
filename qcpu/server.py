"""`qcpu serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn, SSE for streams).

Endpoints as OpenAI's API reference defines them: POST /v1/chat/completions (messages through the GGUF's
chat template), POST /v1/completions (a raw prompt), GET /v1/models, GET /health. llama-server's
extensions `top_k`, `min_p` and `repeat_penalty` are accepted too; unknown fields are ignored, as OpenAI's
clients expect. Errors are OpenAI's body, `{"error": {"message", "type", "param", "code"}}`.

Slots (llama-server's): each is an `Engine` over the one shared model, with its own KV cache and the
tokens it holds, so a client that resends a conversation pays only for what is new; a request goes to the
free slot whose cached tokens share the longest prefix with its prompt. One thread runs the model
(`Batcher`): the slots' replies decode together, one pass per step for all of them (continuous
batching: a request joins or leaves between steps), and a new prompt rides in those passes a chunk at a
time.
Requests beyond the free slots wait in a bounded queue; a full queue answers 503 at once. A client that
disconnects stops its reply at the next step.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qcpu.errors import QcpuError
from qcpu.generate import Engine, common_prefix
from qcpu import tool_calls
from qcpu.grammar import Grammar
from qcpu.sampling import SEED_MAX, SamplingParams, make_sampler
from qcpu.speculative import PassCosts, SpecStats, check
from qcpu.tokenizer import StreamDecoder

MAX_BODY = 16 << 20  # bytes of a request body: a full 32K-token conversation is well under 1 MB
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class ApiError(Exception):
    """An error answered as OpenAI's error body with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- request parsing -------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _number(body: dict, name: str, lo: float, hi: float, default, lo_open: bool = False, hi_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        lo_s, hi_s = ("(" if lo_open else "[") + f"{lo:g}", f"{hi:g}" + (")" if hi_open else "]")
        raise ApiError(400, f"'{name}' must be a number in {lo_s}, {hi_s}, got {v!r}", code="invalid_value",
                       param=name)
    return v


def _integer(body: dict, name: str, lo: int, hi: int | None, default):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, f"'{name}' must be an integer {bound}, got {v!r}", code="invalid_value", param=name)
    return v


def _boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {v!r}", code="invalid_type", param=name)
    return v


@dataclass(eq=False)
class Job:
    """One validated request: what to feed and how to sample."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    chat: bool
    tools: frozenset[str] = frozenset()  # the functions the template listed: calls to them become tool_calls
    parallel_tool_calls: bool = True  # False: at most one call (OpenAI's parallel_tool_calls)
    cancel: threading.Event = field(default_factory=threading.Event)


def _common(body: dict, defaults: SamplingParams, chat: bool) -> dict:
    """The fields both endpoints share, validated."""
    if body.get("n") is not None and body.get("n") != 1:
        raise ApiError(400, "only n = 1 is supported", code="invalid_value", param="n")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", code="invalid_type", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    max_tokens = _integer(body, "max_completion_tokens", 1, None, None)
    max_tokens = _integer(body, "max_tokens", 1, None, max_tokens)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them",
                       code="invalid_value", param="stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", code="invalid_type", param="seed")
    params = replace(
        defaults,
        temperature=_number(body, "temperature", 0.0, 2.0, defaults.temperature),
        top_p=_number(body, "top_p", 0.0, 1.0, defaults.top_p, lo_open=True),
        top_k=_integer(body, "top_k", 0, None, defaults.top_k),
        min_p=_number(body, "min_p", 0.0, 1.0, defaults.min_p, hi_open=True),
        repeat_penalty=_number(body, "repeat_penalty", 0.0, 10.0, defaults.repeat_penalty, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, defaults.presence_penalty),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, defaults.frequency_penalty),
        seed=(seed % (SEED_MAX + 1)) if seed is not None else None,
    )
    if chat:
        logprobs = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
        if top and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:  # the legacy completions API: logprobs is how many alternatives to list
        top = _integer(body, "logprobs", 0, 5, None)
        logprobs = top is not None
        top = top or 0
    return dict(params=params, max_tokens=max_tokens, stop=stop, stream=stream, include_usage=include_usage,
                logprobs=logprobs, top_logprobs=top, chat=chat)


def _grammar(body: dict) -> Grammar | None:
    """The constraint a request asks for: OpenAI's `response_format` ({"type": "json_object"}, or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}), or llama-server's `json_schema`
    (a schema) and `grammar` (GBNF or Lark text). At most one. Not yet compiled against the vocabulary
    (Grammar.check)."""
    asked = [k for k in ("response_format", "json_schema", "grammar") if body.get(k) is not None]
    if len(asked) > 1:
        raise ApiError(400, f"give at most one of 'response_format', 'json_schema' and 'grammar' (got {asked})",
                       param=asked[1])
    try:
        if body.get("grammar") is not None:
            if not isinstance(body["grammar"], str) or not body["grammar"].strip():
                raise ApiError(400, "'grammar' must be a non-empty string", code="invalid_type", param="grammar")
            return Grammar.from_text(body["grammar"])
        if body.get("json_schema") is not None:
            if not isinstance(body["json_schema"], dict):
                raise ApiError(400, "'json_schema' must be an object", code="invalid_type", param="json_schema")
            return Grammar.json_schema(body["json_schema"])
        fmt = body.get("response_format")
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":  # llama-server also takes a schema here
            schema = fmt.get("schema")
            return Grammar.any_json() if schema is None else Grammar.json_schema(schema)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                               param="response_format.json_schema.schema")
            return Grammar.json_schema(schema)
        raise ApiError(400, "'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                       code="invalid_value", param="response_format")
    except QcpuError as e:
        raise ApiError(400, str(e), code="invalid_value", param=asked[0]) from None


_ROLES = {"system", "user", "assistant", "tool", "developer"}


def _messages(body: dict) -> list[dict]:
    """OpenAI messages -> the template's {"role", "content"} dicts (text parts joined; "developer" is a
    system message)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", code="invalid_value", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"{where} must be an object with a 'role' in {sorted(_ROLES)}", param=where)
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}: only text content parts are supported", param=where)
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=where)
        role = "system" if m["role"] == "developer" else m["role"]
        message = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            try:
                message["tool_calls"] = tool_calls.history(m, where)
            except ValueError as e:
                raise ApiError(400, str(e), param=where) from None
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def _tools(body: dict, parallel: bool) -> tuple[list | None, Grammar | None]:
    """OpenAI's `tools` and `tool_choice`: the tools for the template to render (None: none, or
    tool_choice "none") and, for tool_choice "required" or a named function, the grammar that forces the
    call (one call unless `parallel`)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice is not None:
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None, None
    try:
        tools = tool_calls.check_tools(tools)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_value", param="tools") from None
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return None, None
    if choice == "required":
        return tools, tool_calls.calls_grammar(tools, parallel=parallel)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', "
                            "'function': {'name': ...}}", code="invalid_value", param="tool_choice")
    try:
        return tools, tool_calls.calls_grammar(tools, fn["name"], parallel)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_value", param="tool_choice") from None


# ---- slots -----------------------------------------------------------------------------------------

class SlotPool:
    """The engines (one KV cache each) and the requests waiting for one."""

    def __init__(self, engines: list[Engine], max_queue: int):
        self.free = list(engines)
        self.max_queue = max_queue
        self.waiting = 0
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # made in the server's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self, prompt: list[int]) -> Engine:
        """The free engine whose cached tokens share the longest prefix with `prompt` (waiting for one).
        Raises ApiError(503) at once when the queue is full."""
        cond = self._cond()
        async with cond:
            if not self.free and self.waiting >= self.max_queue:
                raise ApiError(503, "the server is busy: every slot is in use and the queue is full; retry later",
                               type_="server_error", code="overloaded")
            self.waiting += 1
            try:
                await cond.wait_for(lambda: self.free)
            finally:
                self.waiting -= 1
            best = max(self.free, key=lambda e: common_prefix(prompt, e.tokens))
            self.free.remove(best)
            return best

    async def release(self, engine: Engine) -> None:
        cond = self._cond()
        async with cond:
            self.free.append(engine)
            cond.notify_all()


# ---- generation (the batcher's thread) -------------------------------------------------------------

def _logprob_entries(tokenizer, logits: np.ndarray, token: int, top: int) -> dict:
    """OpenAI's logprobs entry for `token` under the model's distribution `logits` (float32[vocab])."""
    x = logits.astype(np.float64)
    lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))

    def entry(t: int) -> dict:
        b = tokenizer.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": float(lp[t]), "bytes": list(b)}

    out = entry(token)
    out["top_logprobs"] = []
    if top:
        ids = np.argpartition(-lp, top - 1)[:top]
        out["top_logprobs"] = [entry(int(t)) for t in ids[np.argsort(-lp[ids], kind="stable")]]
    return out


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could start a stop string (kept until the next piece)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class Run:
    """One request's generation on its slot: its prompt fed in chunks, then one token per batch step.
    Events go to `emit`: ("delta", text, logprob_entries) as text becomes final (stop strings never
    sent), then ("done", finish_reason, prompt_tokens, completion_tokens) or ("error", ApiError); `done`
    is called once at the end, whatever happened. With tools offered, ("tools", [ToolCall]) comes before
    "done" when the reply called them (tool_calls.parse); that text is never sent as content."""

    def __init__(self, engine: Engine, job: Job, emit: Callable[[tuple], None], done: Callable[[], None]):
        self.engine, self.job, self.emit, self._done = engine, job, emit, done
        room = engine.capacity - len(job.prompt)
        self.max_tokens = room if job.max_tokens is None else min(job.max_tokens, room)
        self.sampler = make_sampler(job.params, tokenizer=engine.tokenizer)
        self.decoder = StreamDecoder(engine.tokenizer)
        self.pending, self.entries, self.n = "", [], 0
        self.calls: str | None = None  # the reply from its first <tool_call> on (job.tools)
        self.sent = False  # some of the reply's text has been sent
        self.logits: np.ndarray | None = None  # set once the prompt is fed: the next token's distribution
        self.forced: int | None = None  # the next token, already drawn by speculative checking
        self.drafted = None  # the Draft in the pass being run
        self.finished = False
        # the slot's speculator (speculative.py), unless a grammar constrains the reply
        self.spec = engine.speculator if job.params.grammar is None else None
        if self.spec is not None:
            self.spec.start(job.params, self.sampler.rng)
        self.rest = engine.sync(job.prompt)  # the prompt tokens the slot's cache does not hold yet

    def next_chunk(self) -> list[int]:
        """The next piece of the prompt to feed (Engine.prefill_chunk tokens), taken off `rest`; `fed` gets
        its logits. Raises QcpuError when the kept prefix leaves no room."""
        n = self.engine.prefill_chunk()
        part, self.rest = self.rest[:n], self.rest[n:]
        return part

    def fed(self, logits: np.ndarray) -> None:
        """The logits float32[vocab] of the chunk's last token: the first token's, once the prompt is in."""
        if not self.rest:
            self.logits = logits
            if self.spec is not None:
                self.spec.prepare(self.engine.tokens)

    def next_token(self) -> int | None:
        """Sample the next token (or take the one speculative checking drew) and send what text it
        completes; the token to feed, or None when the reply is over (end of turn, a stop string,
        max_tokens, or the client left)."""
        if self.job.cancel.is_set():
            return self.finish("cancelled")
        if self.forced is not None:
            token, self.forced = self.forced, None
        else:
            token = self.sampler(self.logits, self.engine.recent_tokens(self.job.params.repeat_last_n))
        if self.spec is not None:
            self.spec.drawn(token)
        return self.take(token)

    def draft(self, token: int, base: int, others: int = 0) -> list[int]:
        """Tokens drafted after `token` (about to be fed) for the pass to check; base: rows the pass has
        so far, this run's token included; others: the other runs decoding in the pass. Never past
        max_tokens, nor enough to make the slot's cache shift."""
        if self.spec is None:
            self.drafted = None
            return []
        limit = min(self.max_tokens - self.n, self.engine.capacity - self.engine.n_held - 1)
        self.drafted = self.spec.propose(self.engine.tokens + [token], limit, base, others) if limit > 0 else None
        return self.drafted.tokens if self.drafted else []

    def checked(self, rows: np.ndarray) -> None:
        """The pass's logits rows float32[1 + drafts, vocab] for this run's token and drafts: take the drafts
        the acceptance rule allows (sending their text), rewind the slot's cache past the others, and keep
        the next token's distribution (and the token itself when the rule drew it)."""
        draft = self.drafted
        if not draft or not draft.tokens:
            self.logits = rows[-1]
            return
        e = self.engine
        base = e.n_seen - len(draft.tokens)  # the stream after the pending token
        taken, nxt = check(self.sampler, rows, draft, e.tokens[:base], e.tokenizer.eot_ids)
        self.spec.checked(len(draft.tokens), len(taken))
        e.rewind(base + len(taken))
        for j, d in enumerate(taken):
            self.logits = rows[j]
            if self.take(d) is None:
                return
        self.logits, self.forced = rows[len(taken)], nxt

    def take(self, token: int) -> int | None:
        """Send what text `token` completes; the token, or None when the reply is over."""
        if token in self.engine.tokenizer.eot_ids:
            return self.finish("stop")
        self.n += 1
        if self.job.logprobs:
            self.entries.append(_logprob_entries(self.engine.tokenizer, self.logits, token, self.job.top_logprobs))
        piece = self.decoder.feed(token)
        if self.calls is not None:  # inside the tool calls: kept for parse() at the end, never streamed
            self.calls += piece
            return self._after(token)
        self.pending += piece
        hit = [i for i in (self.pending.find(s) for s in self.job.stop) if i >= 0]
        if hit:
            self.pending = self.pending[:min(hit)]
            return self.finish("stop", flush=False)
        keep = _held_back(self.pending, self.job.stop)
        if self.job.tools:
            if tool_calls.OPEN in self.pending:
                at = self.pending.find(tool_calls.OPEN)
                self.pending, self.calls = self.pending[:at], self.pending[at:]
                keep = 0
            elif not self.sent and tool_calls.may_be_call(self.pending):
                keep = len(self.pending)  # a bare or fenced call, perhaps: held until the reply ends
            else:
                keep = max(keep, _held_back(self.pending, [tool_calls.OPEN]))
        if len(self.pending) > keep:
            self.emit(("delta", self.pending[:len(self.pending) - keep], self.entries))
            self.pending, self.entries, self.sent = self.pending[len(self.pending) - keep:], [], True
        return self._after(token)

    def _after(self, token: int) -> int | None:
        if self.n >= self.max_tokens:
            return self.finish("length")
        return token

    def finish(self, reason: str, flush: bool = True) -> None:
        if flush:
            tail = self.decoder.flush()
            if self.calls is not None:
                self.calls += tail
            else:
                self.pending += tail
        calls = None
        if self.calls is not None:  # <tool_call> blocks after the text already streamed
            calls = tool_calls.parse(self.calls)
            if calls is None:  # none that parses: the whole reply is text
                self.pending += self.calls
        elif self.job.tools and not self.sent:  # perhaps the whole reply is one bare or fenced call
            calls = tool_calls.parse(self.pending, self.job.tools)
            if calls is not None:
                self.pending = ""
        if self.pending or self.entries:
            self.emit(("delta", self.pending, self.entries))
        if calls is not None:
            self.emit(("tools", calls[1] if self.job.parallel_tool_calls else calls[1][:1]))
            reason = "tool_calls" if reason == "stop" else reason
        self.emit(("done", reason, len(self.job.prompt), self.n))
        self.close()

    def fail(self, error: ApiError) -> None:
        self.emit(("error", error))
        self.close()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._done()


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, QcpuError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")


class Batcher:
    """The loop that runs the model, on the main thread (`run`; the HTTP server lives in another: kernels
    launched from a secondary thread ran ~30% slower here, each such thread getting its own OpenMP team):
    continuous batching over the slots' runs, as llama-server's update loop does. Each step samples a
    token for every run that has logits and feeds all those tokens, with one prompt chunk of a run still
    reading its prompt (if any), in one pass (Engine.step_together: the weights are read once per step,
    not once per slot). Runs join and leave between steps."""

    def __init__(self, costs: PassCosts | None = None):
        """costs: the seconds of each pass by its rows (the slots' speculators share them, so they price
        their drafts by what a pass of the whole batch costs)."""
        self.inbox: queue.Queue = queue.Queue()
        self.costs = costs or PassCosts()

    def submit(self, engine: Engine, job: Job, emit: Callable[[tuple], None], done: Callable[[], None]) -> None:
        """Queue a job (from any thread)."""
        self.inbox.put((engine, job, emit, done))

    def run(self, keep_going: Callable[[], bool]) -> None:
        """Serve submitted jobs until keep_going() is false with nothing left to do; runs still going
        then are cancelled."""
        runs: list[Run] = []
        while True:
            try:
                while True:  # wait only when there is nothing to do
                    engine, job, emit, done = self.inbox.get(timeout=0.2) if not runs else self.inbox.get_nowait()
                    try:
                        runs.append(Run(engine, job, emit, done))
                    except Exception as e:
                        emit(("error", _api_error(e)))
                        done()
            except queue.Empty:
                if not keep_going():
                    for r in runs:
                        r.finish("cancelled")
                    return
            runs = self.step(runs)

    def step(self, runs: list[Run]) -> list[Run]:
        """One step over the runs; those still going. Every run with logits samples its next token; those
        tokens and one prompt chunk of a run still reading its prompt (if any) go through the model in one
        pass, so a new request's prompt does not stall the replies being written."""
        reading = next((r for r in runs if r.logits is None and not r.finished), None)
        chunk: list[int] = []
        if reading is not None and reading.job.cancel.is_set():  # left while its prompt was being read
            reading.finish("cancelled")
        elif reading is not None:
            try:
                chunk = reading.next_chunk()
            except Exception as e:
                reading.fail(_api_error(e))
        batch: list[tuple[Run, Any]] = []
        rows = len(chunk)
        decoding = sum(1 for r in runs if r.logits is not None and not r.finished)
        for r in runs:
            if r.logits is not None and not r.finished:
                try:
                    token = r.next_token()
                    if token is not None:
                        seq = [token] + r.draft(token, rows + 1, decoding - 1)
                        rows += len(seq)
                        batch.append((r, seq))
                except Exception as e:
                    r.fail(_api_error(e))
        if chunk:
            batch.append((reading, chunk))
        if batch:
            try:
                t0 = time.perf_counter()
                # every row's logits (a run's drafts are checked against them); exact, each row a one-token
                # step's bits, unless a prompt chunk rides along (its rows take the batched products)
                logits = Engine.step_together([r.engine for r, _ in batch], [t for _, t in batch],
                                              all_logits=[not (chunk and r is reading) for r, _ in batch],
                                              exact=not chunk)
                self.costs.timed(rows, time.perf_counter() - t0)
                for (r, fed), out in zip(batch, logits):
                    if r is reading and chunk:
                        r.fed(out[-1])
                    else:
                        r.checked(out)
            except Exception as e:
                for r, _ in batch:
                    r.fail(_api_error(e))
        return [r for r in runs if not r.finished]


# ---- responses -------------------------------------------------------------------------------------

def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class Server:
    """The Starlette app over a slot pool (see the module docstring)."""

    def __init__(self, engines: list[Engine], model_id: str, defaults: SamplingParams, api_key: str | None = None,
                 max_queue: int = 8, log: Callable[[str], None] | None = None):
        self.engines = list(engines)
        self.pool = SlotPool(engines, max_queue)
        # the slots' speculators price drafts by the costs of the batcher's passes
        self.batcher = Batcher(next((e.speculator.costs for e in engines if e.speculator is not None), None))
        self.counts = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.active: set[Job] = set()  # jobs handed to the batcher and not done
        self.engine = engines[0]  # tokenizer and template (shared by all slots)
        self.model_id, self.defaults, self.api_key = model_id, defaults, api_key
        self.created = int(time.time())
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/stats", self.stats, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

    # -- plumbing ------------------------------------------------------------------------------------
    async def _not_found(self, request: Request, exc) -> Response:
        return ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found").response()

    async def _not_allowed(self, request: Request, exc) -> Response:
        return ApiError(405, f"method {request.method} is not allowed on {request.url.path}").response()

    def _check_key(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise ApiError(413, f"request body larger than {MAX_BODY} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise ApiError(413, f"request body larger than {MAX_BODY} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"the model '{model}' does not exist (this server has '{self.model_id}')",
                           code="model_not_found", param="model")
        return body

    def _finish(self, request: Request, status: int, t0: float, job: Job | None = None, done=None) -> None:
        """The request's log line: method, path, status, tokens, seconds."""
        tokens = f" prompt {done[2]} tok, completion {done[3]} tok" if done else ""
        if done:
            self.counts["requests"] += 1
            self.counts["prompt_tokens"] += done[2]
            self.counts["completion_tokens"] += done[3]
        if job is not None and done is None and status == 200:
            tokens = " (the client left)"
        self.log(f"{request.method} {request.url.path} {status}{tokens} {time.perf_counter() - t0:.2f}s")

    # -- endpoints -----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def stats(self, request: Request) -> Response:
        """The slots (busy or not, tokens cached), the queue, totals since start, and the KV cache's
        types and bytes (every slot's, allocated at start)."""
        try:
            self._check_key(request)
        except ApiError as e:
            return e.response()
        free = {id(e) for e in self.pool.free}
        slots = [{"id": i, "busy": id(e) not in free, "n_cached": e.n_held, "n_ctx": e.capacity}
                 for i, e in enumerate(self.engines)]
        type_k, type_v = self.engine.cache_types
        spec = SpecStats()
        for e in self.engines:
            if e.speculator is not None:
                spec.add(e.speculator.stats)
        kind = next((e.speculator.kind for e in self.engines if e.speculator is not None), "off")
        return JSONResponse({"slots": slots, "queue": self.pool.waiting, **self.counts,
                             "kv_cache": {"type_k": type_k, "type_v": type_v,
                                          "bytes": sum(e.cache_bytes for e in self.engines)},
                             "speculative": {"drafter": kind, "passes": spec.passes, "drafted": spec.drafted,
                                             "accepted": spec.accepted,
                                             "accepted_per_pass": round(spec.accepted_per_pass, 3)}})

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "qcpu"}]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def _serve(self, request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        try:
            self._check_key(request)
            job = await asyncio.to_thread(self._job, await self._json(request), chat)
            events = await self._start(job)
        except ApiError as e:
            self._finish(request, e.status, t0)
            return e.response()
        if job.stream:
            return StreamingResponse(self._stream(request, job, events, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        deltas, done, error = [], None, None
        async for event in self._events(request, job, events):
            if event[0] in ("delta", "tools"):
                deltas.append(event)
            elif event[0] == "done":
                done = event
            else:
                error = event[1]
        if error is not None:
            self._finish(request, error.status, t0)
            return error.response()
        if done is None:  # the client left: nobody reads this
            self._finish(request, 499, t0)
            return Response(status_code=499)
        self._finish(request, 200, t0, job, done)
        return JSONResponse(self._whole(job, deltas, done))

    def _job(self, body: dict, chat: bool) -> Job:
        common = _common(body, self.defaults, chat)
        tok = self.engine.tokenizer
        parallel = _boolean(body, "parallel_tool_calls", True)
        tools, forced = _tools(body, parallel) if chat else (None, None)
        if chat:
            try:
                text = self.engine.template.render(_messages(body), add_generation_prompt=True, tools=tools)
            except QcpuError as e:
                raise ApiError(400, f"the chat template failed on these messages: {e}") from None
            prompt = tok.encode(text)
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
                p = p[0]
            if not isinstance(p, str) or not p:
                raise ApiError(400, "'prompt' must be a non-empty string", code="invalid_value", param="prompt")
            prompt = tok.encode(p, parse_special=False)
            if not prompt:
                raise ApiError(400, "'prompt' has no tokens", param="prompt")
        if len(prompt) >= self.engine.capacity:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this server's context is "
                                f"{self.engine.capacity} tokens per slot (start it with a larger --ctx)",
                           code="context_length_exceeded", param="messages" if chat else "prompt")
        grammar = _grammar(body)
        if grammar is not None and forced is not None:
            raise ApiError(400, "a forced tool call (tool_choice) cannot be combined with a response format",
                           param="tool_choice")
        grammar = grammar or forced
        if grammar is not None:  # compiled now: a bad schema is a 400 before any decoding
            try:
                grammar.check(tok)
            except QcpuError as e:
                param = next((k for k in ("response_format", "json_schema", "grammar") if body.get(k) is not None),
                             "tools")
                raise ApiError(400, str(e), code="invalid_value", param=param) from None
            common["params"] = replace(common["params"], grammar=grammar)
        names = frozenset(t["function"]["name"] for t in tools or ())
        return Job(prompt=prompt, tools=names, parallel_tool_calls=parallel, **common)

    async def _start(self, job: Job) -> asyncio.Queue:
        """Wait for a slot and hand the job to the batcher; the queue its events arrive on. The slot is
        given back when the run ends, whatever becomes of the response. Raises ApiError(503) when the
        queue is full."""
        engine = await self.pool.acquire(job.prompt)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def later(fn, *args) -> None:  # from the batcher's thread; after shutdown nobody listens
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the event loop is closed
                pass

        def release() -> None:
            self.active.discard(job)
            later(lambda: asyncio.ensure_future(self.pool.release(engine)))

        self.active.add(job)
        self.batcher.submit(engine, job, lambda ev: later(events.put_nowait, ev), release)
        return events

    def cancel_all(self) -> None:
        """End every reply in flight at the next step, cleanly (shutdown)."""
        for job in list(self.active):
            job.cancel.set()

    async def _events(self, request: Request, job: Job, events: asyncio.Queue) -> AsyncIterator[tuple]:
        """The job's events until done or error; cancels the job when the client leaves."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if not job.stream and await request.is_disconnected():
                        return
                    continue
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            job.cancel.set()  # done anyway, or the client left: stop at the next token

    def _header(self, job: Job, stream: bool) -> dict:
        """The fields every response object (or every chunk of one stream) starts with."""
        obj = ("chat.completion.chunk" if stream else "chat.completion") if job.chat else "text_completion"
        return {"id": ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex, "object": obj,
                "created": int(time.time()), "model": self.model_id, "system_fingerprint": None}

    def _whole(self, job: Job, deltas: list, done: tuple) -> dict:
        calls = [c.openai() for d in deltas if d[0] == "tools" for c in d[1]]
        deltas = [d for d in deltas if d[0] == "delta"]
        text = "".join(d[1] for d in deltas)
        entries = [e for d in deltas for e in d[2]]
        if job.chat:
            message = {"role": "assistant", "content": text}
            if calls:
                message = {"role": "assistant", "content": text or None, "tool_calls": calls}
            choice = {"index": 0, "message": message,
                      "logprobs": {"content": entries} if job.logprobs else None, "finish_reason": _finish_reason(done)}
        else:
            choice = {"index": 0, "text": text, "logprobs": _legacy_logprobs(entries) if job.logprobs else None,
                      "finish_reason": _finish_reason(done)}
        return {**self._header(job, stream=False), "choices": [choice], "usage": _usage(done)}

    async def _stream(self, request: Request, job: Job, events: asyncio.Queue, t0: float) -> AsyncIterator[bytes]:
        header = self._header(job, stream=True)

        def chunk(delta_text: str | None, entries: list, finish: str | None, role: bool = False) -> dict:
            if job.chat:
                delta = {"role": "assistant", "content": ""} if role else (
                    {"content": delta_text} if delta_text is not None else {})
                choice = {"index": 0, "delta": delta,
                          "logprobs": {"content": entries} if job.logprobs and entries else None,
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "",
                          "logprobs": _legacy_logprobs(entries) if job.logprobs and entries else None,
                          "finish_reason": finish}
            out = {**header, "choices": [choice]}
            if job.include_usage:
                out["usage"] = None
            return out

        status, done = 200, None
        try:
            if job.chat:
                yield _sse(chunk(None, [], None, role=True))
            async for event in self._events(request, job, events):
                if event[0] == "delta":
                    yield _sse(chunk(event[1], event[2], None))
                elif event[0] == "tools":  # each call whole, in one delta (OpenAI's clients join the pieces)
                    calls = [{"index": i, **c.openai()} for i, c in enumerate(event[1])]
                    yield _sse({**chunk(None, [], None), "choices": [
                        {"index": 0, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}]})
                elif event[0] == "error":
                    status = event[1].status
                    yield _sse(event[1].body())
                    return
                else:
                    done = event
            yield _sse(chunk(None, [], _finish_reason(done)))
            if job.include_usage:
                yield _sse({**header, "choices": [], "usage": _usage(done)})
            yield b"data: [DONE]\n\n"
        finally:
            self._finish(request, status, t0, job, done)


def _finish_reason(done: tuple) -> str:
    """OpenAI's finish_reason for a run's ("done", reason, ...) event: a reply cut short by the client or
    a shutdown ended as "stop" (OpenAI has no other word for it)."""
    return "stop" if done[1] in ("stop", "cancelled") else done[1]


def _usage(done: tuple) -> dict:
    return {"prompt_tokens": done[2], "completion_tokens": done[3], "total_tokens": done[2] + done[3]}


def _legacy_logprobs(entries: list) -> dict:
    """The completions API's logprobs object from chat-style entries."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def serve(engines: list[Engine], model_id: str, defaults: SamplingParams, host: str, port: int,
          api_key: str | None = None, max_queue: int = 8, verbose: bool = False) -> None:
    """Run the server until Ctrl-C or SIGTERM: HTTP (uvicorn) on a thread, the model on this one. On a
    signal, replies in flight end at the next step (finish_reason "stop", [DONE] sent) and the process
    exits 0. Raises QcpuError when the address cannot be bound."""
    import signal

    import uvicorn

    server = Server(engines, model_id, defaults, api_key, max_queue)
    config = uvicorn.Config(server.app, host=host, port=port, log_level="info" if verbose else "warning",
                            access_log=verbose, timeout_graceful_shutdown=5, lifespan="off")

    class Announced(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"qcpu: serving {model_id} on http://{host}:{port}/v1 ({len(engines)} slot(s) of "
                      f"{engines[0].capacity} tokens); Ctrl-C stops", file=sys.stderr, flush=True)

    userver = Announced(config)
    http = threading.Thread(target=userver.run, name="qcpu-http", daemon=True)

    def stop(*_):
        if userver.should_exit:  # a second signal: stop waiting for in-flight requests
            userver.force_exit = True
        userver.should_exit = True
        server.cancel_all()  # replies in flight end now, with their last text, rather than being cut

    previous = signal.signal(signal.SIGINT, stop), signal.signal(signal.SIGTERM, stop)
    try:
        http.start()
        server.batcher.run(http.is_alive)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    if not userver.started:
        raise QcpuError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
