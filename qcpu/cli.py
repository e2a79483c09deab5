"""The `qcpu` command (Typer + Rich). What the model writes goes to stdout; everything else to stderr.

Bad input is one line on stderr and a non-zero exit (2 for bad arguments, 1 for bad files), never a
traceback.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from qcpu.errors import QcpuError, say
from qcpu.text_input import clean_arg, read_text_file

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run GGUF Qwen2-family chat models on the CPU.")
err = Console(stderr=True, highlight=False)

MODEL_HELP = ("Path to a .gguf file (qwen2 architecture), or REPO[:QUANT] on the Hugging Face hub. "
              "Omitted: the default model, fetched once.")


def _fail(message: str, code: int = 1) -> None:
    say(message)
    raise typer.Exit(code)


def _model_and(first: Optional[str], second: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """`MODEL X` or just `X` (the default model): llama.cpp users name the model first."""
    return (first, second) if second is not None else (None, first)


def _positive(name: str, value: Optional[int]) -> Optional[int]:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{name} must be positive, got {value}")
    return value


def _set_threads(threads: Optional[int]) -> int:
    """--threads for every command (quant's too); a bad value is a usage error (exit 2)."""
    from qcpu.threads import set_threads

    try:
        return set_threads(threads)
    except QcpuError as e:
        raise typer.BadParameter(str(e)) from None


def _load_engine(model: Optional[str], ctx: Optional[int], threads: Optional[int], chat_template: Optional[str] = None,
                 check_tensors: bool = False, rope=None, cache_types: tuple[str, str] = ("f16", "f16")):
    from qcpu.generate import Engine
    from qcpu.models import resolve_model

    _positive("--ctx", ctx)
    _set_threads(threads)
    path = resolve_model(model, err)
    with err.status(f"loading {path.name}", spinner="dots"):
        return Engine.load(path, ctx=ctx, chat_template=chat_template, check_tensors=check_tensors, rope=rope,
                           cache_type_k=cache_types[0], cache_type_v=cache_types[1])


def _cache_types(k: str, v: str) -> tuple[str, str]:
    """-ctk/-ctv values checked (a usage error, exit 2, for an unknown name)."""
    from qcpu.cache import CACHE_TYPES

    for name, value in (("--cache-type-k", k), ("--cache-type-v", v)):
        if value.lower() not in CACHE_TYPES:
            raise typer.BadParameter(f"{name} must be one of {', '.join(CACHE_TYPES)}, got {value!r}")
    return k.lower(), v.lower()


def _rope(scaling: str | None, scale: float | None, orig_ctx: int | None, freq_base: float | None):
    """llama.cpp's --rope-scaling/--rope-scale/--yarn-orig-ctx/--rope-freq-base as RopeOverrides (None: the
    file's); a bad value is a usage error (exit 2)."""
    from qcpu.config import RopeOverrides
    from qcpu.rope import ROPE_SCALING_TYPES

    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise typer.BadParameter(f"--rope-scaling must be one of {', '.join(ROPE_SCALING_TYPES)}, got {scaling!r}")
    for name, value in (("--rope-scale", scale), ("--rope-freq-base", freq_base)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise typer.BadParameter(f"{name} must be a positive number, got {value}")
    _positive("--yarn-orig-ctx", orig_ctx)
    return RopeOverrides(scaling, scale, orig_ctx, freq_base) or None


def _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed):
    from qcpu.sampling import SamplingParams, resolve_seed

    try:
        seed = resolve_seed(seed)
    except QcpuError as e:
        raise typer.BadParameter(str(e)) from None
    params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    try:
        params.validate()
    except QcpuError as e:
        raise typer.BadParameter(str(e)) from None
    return params


# Shared options, llama.cpp's names.
ModelArg = typer.Argument(None, help=MODEL_HELP, show_default=False)
Temp = typer.Option(0.7, "--temp", help="Temperature; 0 = greedy.")
TopK = typer.Option(20, "--top-k", help="Keep the k most likely tokens (0 = off).")
TopP = typer.Option(0.8, "--top-p", help="Keep the smallest set with this much probability.")
MinP = typer.Option(0.0, "--min-p", help="Drop tokens below this fraction of the top probability.")
RepeatPenalty = typer.Option(1.1, "--repeat-penalty", help="Penalty on the last 64 tokens (1 = off).")
Seed = typer.Option(None, "--seed", help="Random seed: same seed, same text (-1 or omitted: drawn at random, "
                                          "shown by --stats and /stats).")
MaxTokens = typer.Option(512, "--max-tokens", "-n", help="Most tokens to generate.")
Ctx = typer.Option(None, "--ctx", "-c", show_default=False,
                   help="Context size in tokens (the KV cache, allocated once). Default 4096, or the model's "
                        "trained context if smaller.")
Threads = typer.Option(None, "--threads", "-t", help="CPU threads (default: all cores).")
System = typer.Option(None, "--system", "-s", help="System prompt.")
ChatTemplateOpt = typer.Option(None, "--chat-template", help="'chatml' to ignore the file's template.")
CheckTensors = typer.Option(False, "--check-tensors",
                            help="Check every tensor for NaN/Inf (block scales, float values) before running.")
RopeScaling = typer.Option(None, "--rope-scaling", metavar="{none,linear,yarn}", show_default=False,
                           help="RoPE scaling method (default: the model file's).")
RopeScale = typer.Option(None, "--rope-scale", metavar="N", show_default=False,
                         help="RoPE context scaling factor: stretches the trained context N times (with "
                              "--rope-scaling yarn or linear; default: the file's).")
YarnOrigCtx = typer.Option(None, "--yarn-orig-ctx", metavar="N", show_default=False,
                           help="YaRN: the model's original training context (default: the file's, else its "
                                "trained context).")
CacheTypeK = typer.Option("f16", "--cache-type-k", "-ctk", metavar="{f16,q8_0,q4_0}",
                          help="KV cache type for keys (llama.cpp's block formats; q8_0 halves the cache).")
CacheTypeV = typer.Option("f16", "--cache-type-v", "-ctv", metavar="{f16,q8_0,q4_0}",
                          help="KV cache type for values.")
RopeFreqBase = typer.Option(None, "--rope-freq-base", metavar="F", show_default=False,
                            help="RoPE base frequency (default: the file's).")


DraftModelOpt = typer.Option(None, "--draft", "-md", "--model-draft", metavar="MODEL", show_default=False,
                             help="Speculative decoding with this smaller model of the same vocabulary as the "
                                  "draft (a .gguf path or REPO[:QUANT]).")
DraftMax = typer.Option(16, "--draft-max", help="Most tokens drafted per pass.")
DraftMin = typer.Option(0, "--draft-min", help="Fewer drafted tokens than this are not checked.")
DraftPMin = typer.Option(0.0, "--draft-p-min", help="A greedy draft stops below this probability.")
LookupOpt = typer.Option(None, "--lookup/--no-lookup", show_default=False,
                         help="Prompt lookup speculation (drafts copied from earlier text): --lookup always, "
                              "--no-lookup never; default: on while its measured acceptance pays.")


def _speculation(draft, draft_max, draft_min, p_min, lookup):
    """SpecOptions from the options (a usage error, exit 2, for bad limits)."""
    from qcpu.speculative import SpecOptions

    if draft_max < 1 or draft_min < 0 or not 0.0 <= p_min <= 1.0:
        raise typer.BadParameter(f"--draft-max must be >= 1, --draft-min >= 0 and --draft-p-min in [0, 1] "
                                 f"(got {draft_max}, {draft_min}, {p_min})")
    if draft is not None and lookup:
        raise typer.BadParameter("--lookup and --draft are two ways to draft: give one")
    return SpecOptions(clean_arg(draft, "--draft"), draft_max, draft_min, p_min, lookup)


def _attach_draft(engine, options) -> None:
    """engine.speculator from the options; a draft model named on the hub or by path is resolved first."""
    from dataclasses import replace

    from qcpu.models import resolve_model
    from qcpu.speculative import attach

    if options.draft is not None:
        path = resolve_model(options.draft, err)
        with err.status(f"loading the draft {path.name}", spinner="dots"):
            attach(engine, replace(options, draft=str(path)))
    else:
        attach(engine, options)


JsonSchema = typer.Option(None, "--json-schema", "-j", metavar="JSON|FILE", show_default=False,
                          help="Constrain replies to JSON valid under this JSON Schema (inline JSON, or a file).")
JsonSchemaFile = typer.Option(None, "--json-schema-file", "-jf", metavar="FILE", show_default=False,
                              help="As --json-schema, from a file.")
GrammarOpt = typer.Option(None, "--grammar", metavar="GRAMMAR|FILE", show_default=False,
                          help="Constrain replies to a GBNF (llama.cpp's) or Lark grammar (inline, or a file).")
GrammarFile = typer.Option(None, "--grammar-file", metavar="FILE", show_default=False, help="As --grammar, from a file.")
JsonOnly = typer.Option(False, "--json", help="Constrain replies to one JSON object.")


def _grammar(json_schema, json_schema_file, grammar, grammar_file, json_only):
    """The constraint the options ask for (at most one), or None. A value of --json-schema / --grammar
    that names an existing file is read from it. Bad JSON, schema or grammar: a usage error, one line."""
    from qcpu.grammar import Grammar

    given = [(n, v) for n, v in (("--json-schema", json_schema), ("--json-schema-file", json_schema_file),
                                 ("--grammar", grammar), ("--grammar-file", grammar_file),
                                 ("--json", json_only or None)) if v is not None]
    if len(given) > 1:
        raise typer.BadParameter(f"give at most one of {', '.join(n for n, _ in given)}")
    if not given:
        return None
    name, value = given[0]
    try:
        if name == "--json":
            return Grammar.any_json()
        value = clean_arg(value, name)
        if name.endswith("-file") or (not value.lstrip().startswith("{") and Path(value).is_file()):
            value = read_text_file(value)
        return Grammar.json_schema(value) if name.startswith("--json") else Grammar.from_text(value)
    except QcpuError as e:
        raise typer.BadParameter(f"{name}: {e}") from None


def _stream_reply(engine, prompt_tokens, params, max_tokens, show_stats: bool) -> str:
    from qcpu.generate import Stats

    stats = Stats()
    parts = []
    try:
        for piece in engine.stream(prompt_tokens, params, max_tokens, stats):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            parts.append(piece.text)
    except BaseException:
        if parts:  # end a reply cut short (Ctrl-C) on its own line; a failure before it wrote nothing
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    if show_stats:
        spec = (f" | drafts: {stats.accepted_tokens}/{stats.drafted_tokens} accepted, "
                f"{stats.accepted_per_pass:.2f} per pass" if stats.draft_passes else "")
        err.print(f"[dim]prompt {stats.prompt_tokens} tok, {stats.prompt_tps:.1f} tok/s | "
                  f"generated {stats.generated_tokens} tok, {stats.generate_tps:.1f} tok/s{spec} | "
                  f"seed {params.seed}[/dim]")
    return "".join(parts)


@app.command()
def generate(
    first: str = typer.Argument(..., metavar="[MODEL] MESSAGE", help="Model path (optional), then the user message."),
    second: Optional[str] = typer.Argument(None, hidden=True),
    system: Optional[str] = System,
    temp: float = Temp, top_k: int = TopK, top_p: float = TopP, min_p: float = MinP,
    repeat_penalty: float = RepeatPenalty, seed: Optional[int] = Seed, max_tokens: int = MaxTokens,
    ctx: Optional[int] = Ctx, threads: Optional[int] = Threads, chat_template: Optional[str] = ChatTemplateOpt,
    stats: bool = typer.Option(False, "--stats", help="Print speed and the seed on stderr at the end."),
    check_tensors: bool = CheckTensors,
    rope_scaling: Optional[str] = RopeScaling, rope_scale: Optional[float] = RopeScale,
    yarn_orig_ctx: Optional[int] = YarnOrigCtx, rope_freq_base: Optional[float] = RopeFreqBase,
    cache_type_k: str = CacheTypeK, cache_type_v: str = CacheTypeV,
    json_schema: Optional[str] = JsonSchema, json_schema_file: Optional[str] = JsonSchemaFile,
    grammar: Optional[str] = GrammarOpt, grammar_file: Optional[str] = GrammarFile, json_only: bool = JsonOnly,
    draft: Optional[str] = DraftModelOpt, draft_max: int = DraftMax, draft_min: int = DraftMin,
    draft_p_min: float = DraftPMin, lookup: Optional[bool] = LookupOpt,
):
    """Render one chat turn through the model's template and stream the reply to stdout."""
    from dataclasses import replace

    model, message = _model_and(first, second)
    message, system = clean_arg(message, "MESSAGE"), clean_arg(system, "--system")
    chat_template = clean_arg(chat_template, "--chat-template")
    params = _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
    params = replace(params, grammar=_grammar(json_schema, json_schema_file, grammar, grammar_file, json_only))
    _positive("--max-tokens", max_tokens)
    rope = _rope(rope_scaling, rope_scale, yarn_orig_ctx, rope_freq_base)
    speculation = _speculation(draft, draft_max, draft_min, draft_p_min, lookup)
    engine = _load_engine(model, ctx, threads, chat_template, check_tensors, rope,
                          _cache_types(cache_type_k, cache_type_v))
    _attach_draft(engine, speculation)
    if params.grammar is not None:
        params.grammar.check(engine.tokenizer)  # before any decoding: one line if it cannot be compiled
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    prompt = engine.chat_prompt_tokens(messages)
    _stream_reply(engine, prompt, params, max_tokens, stats)


@app.command()
def chat(
    model: Optional[str] = ModelArg,
    system: Optional[str] = System,
    temp: float = Temp, top_k: int = TopK, top_p: float = TopP, min_p: float = MinP,
    repeat_penalty: float = RepeatPenalty, seed: Optional[int] = Seed, max_tokens: int = MaxTokens,
    ctx: Optional[int] = Ctx, threads: Optional[int] = Threads, chat_template: Optional[str] = ChatTemplateOpt,
    markdown: bool = typer.Option(False, "--markdown", "-m", help="Render replies as Markdown (as they grow)."),
    no_color: bool = typer.Option(False, "--no-color", help="No colours or styles (also: NO_COLOR=1)."),
    check_tensors: bool = CheckTensors,
    rope_scaling: Optional[str] = RopeScaling, rope_scale: Optional[float] = RopeScale,
    yarn_orig_ctx: Optional[int] = YarnOrigCtx, rope_freq_base: Optional[float] = RopeFreqBase,
    cache_type_k: str = CacheTypeK, cache_type_v: str = CacheTypeV,
    json_schema: Optional[str] = JsonSchema, json_schema_file: Optional[str] = JsonSchemaFile,
    grammar: Optional[str] = GrammarOpt, grammar_file: Optional[str] = GrammarFile, json_only: bool = JsonOnly,
    draft: Optional[str] = DraftModelOpt, draft_max: int = DraftMax, draft_min: int = DraftMin,
    draft_p_min: float = DraftPMin, lookup: Optional[bool] = LookupOpt,
):
    """Multi-turn chat in the terminal.

    MODEL is a .gguf path, REPO[:QUANT] on the Hugging Face hub (fetched once, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m), or omitted for the default model.

    Replies stream with a status line (tokens/s, context used). The KV cache is reused across turns: only the new message is processed. When the conversation outgrows --ctx, the oldest turns are dropped (a one-line notice says so) and the system prompt is kept.

    Keys: Enter sends; Esc Enter starts a new line, or open and close a message with \"\"\". Up/Down walk the history (kept across sessions). Ctrl-C stops a reply and keeps what was written; Ctrl-C on an empty line or Ctrl-D leaves.

    Commands: /help, /system TEXT, /reset, /undo (drop the last exchange), /retry (write the last reply again), /set temp|top_p|top_k|min_p|repeat_penalty|seed|max_tokens VALUE, /stats, /save FILE, /load FILE (JSON), /exit.

    Piped (echo hi | qcpu chat): each line is a message (\"\"\" blocks span lines); only the replies are printed.
    """  # noqa: E501
    from qcpu.models import resolve_model
    from qcpu.repl import run_chat

    from dataclasses import replace

    system, chat_template = clean_arg(system, "--system"), clean_arg(chat_template, "--chat-template")
    params = _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
    params = replace(params, grammar=_grammar(json_schema, json_schema_file, grammar, grammar_file, json_only))
    _positive("--max-tokens", max_tokens)
    _positive("--ctx", ctx)
    rope = _rope(rope_scaling, rope_scale, yarn_orig_ctx, rope_freq_base)
    cache_types = _cache_types(cache_type_k, cache_type_v)
    speculation = _speculation(draft, draft_max, draft_min, draft_p_min, lookup)
    _set_threads(threads)
    path = resolve_model(model, err)
    if speculation.draft is not None:
        from dataclasses import replace as _replace

        speculation = _replace(speculation, draft=str(resolve_model(speculation.draft, err)))
    code = run_chat(path, params=params, max_tokens=max_tokens, system=system, ctx=ctx, chat_template=chat_template,
                    markdown=markdown, color=not no_color, check_tensors=check_tensors, rope=rope,
                    cache_types=cache_types, speculation=speculation)
    if code:
        raise typer.Exit(code)


@app.command()
def serve(
    model: Optional[str] = ModelArg,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    parallel: int = typer.Option(1, "--parallel", "-np",
                                 help="Slots: conversations whose KV caches are kept at once (each --ctx tokens)."),
    queue: int = typer.Option(8, "--queue", help="Requests that may wait for a slot; beyond, 503 at once."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="QCPU_API_KEY", show_default=False,
                                          help="Require 'Authorization: Bearer KEY' (also QCPU_API_KEY)."),
    alias: Optional[str] = typer.Option(None, "--alias", show_default=False,
                                        help="The model's name in the API (default: the file's name)."),
    temp: float = Temp, top_k: int = TopK, top_p: float = TopP, min_p: float = MinP,
    repeat_penalty: float = RepeatPenalty, seed: Optional[int] = Seed,
    ctx: Optional[int] = Ctx, threads: Optional[int] = Threads, chat_template: Optional[str] = ChatTemplateOpt,
    check_tensors: bool = CheckTensors,
    rope_scaling: Optional[str] = RopeScaling, rope_scale: Optional[float] = RopeScale,
    yarn_orig_ctx: Optional[int] = YarnOrigCtx, rope_freq_base: Optional[float] = RopeFreqBase,
    cache_type_k: str = CacheTypeK, cache_type_v: str = CacheTypeV,
    draft: Optional[str] = DraftModelOpt, draft_max: int = DraftMax, draft_min: int = DraftMin,
    draft_p_min: float = DraftPMin, lookup: Optional[bool] = LookupOpt,
    verbose: bool = typer.Option(False, "--verbose", help="uvicorn's own log lines too."),
):
    """An OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health).

    Point any OpenAI client at http://HOST:PORT/v1. The sampling options are the defaults a request's own
    fields override. Ctrl-C stops the server.
    """
    from qcpu.memory import check_memory
    from qcpu.server import serve as run_server

    if not 0 < port < 65536:
        raise typer.BadParameter(f"--port must be in 1..65535, got {port}")
    _positive("--parallel", parallel)
    if queue < 0:
        raise typer.BadParameter(f"--queue must be >= 0, got {queue}")
    chat_template, alias = clean_arg(chat_template, "--chat-template"), clean_arg(alias, "--alias")
    defaults = _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
    if seed is None:  # each request draws its own seed unless it sends one
        from dataclasses import replace

        defaults = replace(defaults, seed=None)
    rope = _rope(rope_scaling, rope_scale, yarn_orig_ctx, rope_freq_base)
    cache_types = _cache_types(cache_type_k, cache_type_v)
    speculation = _speculation(draft, draft_max, draft_min, draft_p_min, lookup)
    first = _load_engine(model, ctx, threads, chat_template, check_tensors, rope, cache_types)
    engines = [first]
    if parallel > 1:  # one KV cache per slot over the one model: check they all fit first
        check_memory(first.model.file.size, parallel * first.cache_bytes, ctx=first.capacity)
        # the slots' caches side by side in one pool: a step reads them in one attention call per layer
        engines = first.slots(parallel)
        first = engines[0]
    _attach_draft(first, speculation)
    if first.speculator is not None:  # every slot its own drafter and acceptance, one table of pass costs
        from qcpu.speculative import attach

        drafter = getattr(first.speculator.drafter, "engine", None)  # the draft model, loaded once
        for e in engines[1:]:
            attach(e, speculation, first.speculator.costs, drafter)
    run_server(engines, alias or first.model.file.path.name, defaults, host, port, api_key, queue, verbose)


def _file_type_name(value) -> str:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except (ValueError, TypeError):
        return "unknown" if value is None else str(value)


@app.command()
def info(model: Optional[str] = ModelArg):
    """Architecture, sizes, quant types and tokenizer facts of a model file."""
    from collections import Counter

    from gguf import GGMLQuantizationType

    from qcpu.config import ModelConfig
    from qcpu.gguf_file import GGUFFile
    from qcpu.models import resolve_model
    from qcpu.rope import Rope

    f = GGUFFile(resolve_model(model, err))
    cfg = ModelConfig.from_gguf(f)
    rope = Rope.from_config(cfg)
    beyond = (f"up to {cfg.max_context} with its rope scaling" if cfg.rope_scaled
              else "a larger --ctx needs --rope-scaling yarn --rope-scale N")
    types = Counter(GGMLQuantizationType(t.ggml_type).name for t in f.tensors.values())
    n_params = sum(int(__import__("numpy").prod(t.shape)) for t in f.tensors.values())
    tokens = f.get("tokenizer.ggml.tokens") or []
    lines = {
        "file": str(f.path), "size": f"{f.size / 2**20:.1f} MiB", "name": cfg.name,
        "architecture": f.get("general.architecture"), "parameters": f"{n_params / 1e9:.3f} B",
        "layers": cfg.n_layers, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "context_length": f"{cfg.context_length} tokens (trained; {beyond})",
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope.describe() + (f" (mscale {rope.mscale:.4f})" if rope.ext_factor else "")
                        + (", rope_freqs" if cfg.rope_freqs else ""),
        "rms_eps": cfg.rms_eps,
        "file_type": _file_type_name(f.get("general.file_type")),
        "tied_embeddings": "output.weight" not in f.tensors,
        "tensor_types": ", ".join(f"{k} x{v}" for k, v in types.most_common()),
        "tokenizer": f"{f.get('tokenizer.ggml.model')} / pre {f.get('tokenizer.ggml.pre') or 'missing (llama.cpp: default)'}, "
                     f"{len(tokens)} tokens",
        "bos / eos": f"{f.get('tokenizer.ggml.bos_token_id')} / {f.get('tokenizer.ggml.eos_token_id')}",
        "chat_template": "yes" if f.get("tokenizer.chat_template") else "no (ChatML fallback)",
    }
    for k, v in lines.items():
        print(f"{k:>16}: {v}")


@app.command()
def tokenize(
    first: Optional[str] = typer.Argument(None, metavar="[MODEL] [TEXT]", help="Model path (optional), then the text."),
    second: Optional[str] = typer.Argument(None, hidden=True),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the text from a file."),
    no_special: bool = typer.Option(False, "--no-special", help="Treat special tokens in text as plain text."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of ids."),
    ids_only: bool = typer.Option(False, "--ids", help="Print ids only, one line."),
):
    """Print the token ids of a text, like llama.cpp's llama-tokenize."""
    from qcpu.gguf_file import GGUFFile
    from qcpu.models import resolve_model
    from qcpu.tokenizer import Tokenizer

    model, text = _model_and(first, second)
    if file is not None and second is None:
        model, text = first, None
    if (text is None) == (file is None):
        raise typer.BadParameter("give TEXT or --file, not both")
    text = read_text_file(file) if file is not None else clean_arg(text, "TEXT")
    tok = Tokenizer.from_metadata(GGUFFile(resolve_model(model, err)).metadata)
    ids = tok.encode(text, parse_special=not no_special)
    if as_json:
        print(json.dumps(ids))
    elif ids_only:
        print(" ".join(map(str, ids)))
    else:
        for i in ids:
            print(f"{i:>6} -> {tok.token_bytes(i).decode('utf-8', errors='backslashreplace')!r}")


@app.command()
def perplexity(
    first: str = typer.Argument(..., metavar="[MODEL] FILE", help="Model path (optional), then a UTF-8 text file."),
    second: Optional[str] = typer.Argument(None, hidden=True),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Chunk size; each chunk is scored on its second half."),
    threads: Optional[int] = Threads,
    as_json: bool = typer.Option(False, "--json", help='Print {"perplexity": ...}.'),
    check_tensors: bool = CheckTensors,
    rope_scaling: Optional[str] = RopeScaling, rope_scale: Optional[float] = RopeScale,
    yarn_orig_ctx: Optional[int] = YarnOrigCtx, rope_freq_base: Optional[float] = RopeFreqBase,
    cache_type_k: str = CacheTypeK, cache_type_v: str = CacheTypeV,
):
    """Perplexity of a text, by llama-perplexity's method."""
    from qcpu.perplexity import perplexity as compute

    model, file_name = _model_and(first, second)
    file = Path(file_name)
    _positive("--ctx", ctx)
    rope = _rope(rope_scaling, rope_scale, yarn_orig_ctx, rope_freq_base)
    text = read_text_file(file)
    engine = _load_engine(model, ctx, threads, check_tensors=check_tensors, rope=rope,
                          cache_types=_cache_types(cache_type_k, cache_type_v))
    result = compute(engine, text, ctx, progress=None if as_json else err)
    if as_json:
        print(json.dumps(result))
    else:
        print(f"perplexity: {result['perplexity']:.4f} over {result['scored_tokens']} tokens "
              f"({result['chunks']} chunks of {ctx})")


@app.command()
def pull(spec: str = typer.Argument(..., metavar="REPO[:QUANT]",
                                    help="A GGUF repo on the Hugging Face hub, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m.")):
    """Fetch a model from the Hugging Face hub into its cache (or update it) without chatting."""
    from qcpu import hub

    if not hub.looks_like_repo(spec):
        raise typer.BadParameter(f"{spec}: expected REPO[:QUANT], e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m")
    path = hub.pull(spec, err)
    print(f"{spec} -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@app.command("list")
def list_models():
    """Show the models on this machine: the default one and those fetched from the hub."""
    from qcpu import hub
    from qcpu.models import DEFAULT_MODEL_SIZE, default_model_path

    rows = []
    default = default_model_path()
    if default.exists() and default.stat().st_size == DEFAULT_MODEL_SIZE:
        rows.append(("(default)", "Q4_K_M", default.stat().st_size, default))
    rows += [(m.repo + (f":{m.quant}" if m.quant else ""), m.quant or "?", m.size, m.path)
             for m in hub.cached_models()]
    if not rows:
        err.print("no models yet: `qcpu chat` fetches the default one, `qcpu pull REPO:QUANT` any GGUF repo")
        return
    width = max(len(r[0]) for r in rows)
    for name, quant, size, path in rows:
        print(f"{name:<{width}}  {size / 2**20:>8.1f} MiB  {path}")


def _thread_list(text: Optional[str]) -> list[Optional[int]]:
    """-t for bench: one count or a comma list, as llama-bench's (-t 1,2); a bad value is a usage error."""
    if text is None:
        return [None]
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--threads takes a count or a comma list of counts (1,2), got {text!r}") from None
    for c in counts:
        _positive("--threads", c)
    return counts


@app.command()
def bench(
    model: Optional[str] = ModelArg,
    threads: Optional[str] = typer.Option(None, "--threads", "-t",
                                          help="CPU threads (default: all cores); a comma list runs each (-t 1,2)."),
    n_prompt: int = typer.Option(512, "--n-prompt", "-p", help="Prompt tokens for pp."),
    n_gen: int = typer.Option(128, "--n-gen", "-n", "-g", help="Generated tokens for tg (llama-bench's -n)."),
    repeats: int = typer.Option(3, "--repeats", "-r", help="Runs; the median is reported."),
    depth: int = typer.Option(0, "--depth", "-d", help="Tokens already in the cache when pp and tg are measured "
                                                       "(llama-bench's -d)."),
    cache_type_k: str = CacheTypeK, cache_type_v: str = CacheTypeV,
    compare_llama_cpp: bool = typer.Option(False, "--compare-llama-cpp",
                                           help="Run llama-cpp-python too, same run and sizes, flash attention off and "
                                                "on; ratios are against the faster."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    draft: Optional[str] = typer.Option(None, "--draft", "-md", "--model-draft", metavar="MODEL", show_default=False,
                                        help="Speculative decoding with this draft model: decode tok/s with and "
                                             "without on fixed chat and code-edit prompts (greedy)."),
    lookup: bool = typer.Option(False, "--lookup", help="The same for prompt lookup (as users get it, and always on)."),
    draft_max: int = DraftMax, draft_min: int = DraftMin, draft_p_min: float = DraftPMin,
):
    """Prompt-processing and generation speed, time to first token and memory (llama-bench's pp/tg).

    With --draft or --lookup: speculative decoding's decode speed against plain decoding instead."""
    import numba

    from qcpu.models import resolve_model

    if draft is not None or lookup:
        if draft is not None and lookup:
            raise typer.BadParameter("--lookup and --draft are two ways to draft: give one")
        speculation = _speculation(draft, draft_max, draft_min, draft_p_min, None)
        _positive("--n-gen", n_gen)
        _set_threads(None if threads is None else _thread_list(threads)[0])
        _bench_speculative(resolve_model(model, err), speculation, n_gen, as_json)
        return

    for name, value in (("--n-prompt", n_prompt), ("--n-gen", n_gen), ("--repeats", repeats)):
        _positive(name, value)
    if depth < 0:
        raise typer.BadParameter(f"--depth must be 0 or more, got {depth}")
    cache_types = _cache_types(cache_type_k, cache_type_v)
    thread_counts = _thread_list(threads)
    if compare_llama_cpp:
        import importlib.util

        from qcpu.bench import llama_bench_binary

        if llama_bench_binary() is None and importlib.util.find_spec("llama_cpp") is None:  # say so before the minutes qcpu's side takes
            _fail("--compare-llama-cpp needs llama.cpp: python tools/build_llama_cpp.py (llama-bench), or pip install -e \".[llama]\"")
    path = resolve_model(model, err)
    results = []
    for count in thread_counts:
        _set_threads(count)
        results.append(_bench_one(path, numba.get_num_threads(), n_prompt, n_gen, repeats, depth, cache_types,
                                  compare_llama_cpp, as_json))
    if as_json:
        print(json.dumps(results[0] if len(results) == 1 else results))


def _bench_speculative(path, speculation, n_gen: int, as_json: bool) -> None:
    from dataclasses import replace

    from rich.table import Table

    from qcpu.bench import bench_speculative

    if speculation.draft is not None:
        speculation = replace(speculation, draft=str(resolve_draft(speculation.draft)))
    with err.status("speculative decoding bench") as status:
        result = bench_speculative(path, speculation, n_gen, progress=lambda text: status.update(text))
    if as_json:
        print(json.dumps(result))
        return
    for set_name, r in result["sets"].items():
        table = Table(title=f"{path.name}, {set_name} prompts ({r['prompts']}), greedy, up to {n_gen} tokens"
                            + (f", draft {Path(speculation.draft).name}" if speculation.draft else ""))
        for col in ("", "tokens", "tok/s", "vs plain", "accepted/drafted", "per pass"):
            table.add_column(col, justify="right" if col else "left")
        for name, m in r["modes"].items():
            table.add_row(name, str(m["tokens"]), f"{m['tok_s']:.2f}", f"{m['ratio']:.2f}x",
                          f"{m['accepted']}/{m['drafted']}" if m["drafted"] else "",
                          f"{m['accepted_per_pass']:.2f}" if m["drafted"] else "")
        Console().print(table)
        Console().print("replies identical to plain decoding: " + ("yes" if r["identical"] else "NO"))


def resolve_draft(name: str):
    from qcpu.models import resolve_model

    return resolve_model(name, err)


def _bench_one(path, n_threads, n_prompt, n_gen, repeats, depth, cache_types, compare_llama_cpp, as_json) -> dict:
    """One `qcpu bench` row set at n_threads: measure, print the table unless as_json, return the result."""
    from rich.table import Table

    from qcpu.bench import bench_qcpu, best_of_llama_cpp, time_to_first_token

    with err.status("benchmarking qcpu"):
        ours = bench_qcpu(path, n_prompt, n_gen, repeats, n_threads, depth, cache_types)
        ours["ttft_s"] = time_to_first_token(path, n_threads)
    result = {"qcpu": ours}
    if compare_llama_cpp:
        with err.status("benchmarking llama.cpp"):
            result["llama_cpp"] = both = best_of_llama_cpp(path, n_prompt, n_gen, repeats, n_threads, depth,
                                                           cache_types)
            ref = both["best"]
        result["ratio"] = {"pp": ours["pp_tps"] / ref["pp_tps"], "tg": ours["tg_tps"] / ref["tg_tps"]}
    result = result if compare_llama_cpp else ours
    if as_json:
        return result
    at = f" @ d{depth}" if depth else ""
    table = Table(title=f"{path.name}, {n_threads} threads ({ours['threading_layer']}), KV {cache_types[0]}/"
                        f"{cache_types[1]}{at} (median of {repeats})")
    table.add_column("")
    table.add_column(f"pp{n_prompt}{at} tok/s", justify="right")
    table.add_column(f"tg{n_gen}{at} tok/s", justify="right")
    table.add_column("RSS MB", justify="right")
    table.add_row("qcpu", f"{ours['pp_tps']:.1f}", f"{ours['tg_tps']:.2f}", f"{ours['rss_mb']:.0f}")
    if compare_llama_cpp:
        for fa in ("fa0", "fa1"):
            if fa not in both:
                continue
            r = both[fa]
            rss = "" if r["rss_mb"] != r["rss_mb"] else f"{r['rss_mb']:.0f}"  # llama-bench does not say
            table.add_row(f"llama.cpp {fa}", f"{r['pp_tps']:.1f}", f"{r['tg_tps']:.2f}", rss)
        table.add_row("ratio to best", f"{result['ratio']['pp']:.2f}", f"{result['ratio']['tg']:.2f}", "")
    Console().print(table)
    gbs = ours["weights_read_per_token_mb"] * ours["tg_tps"] / 1024
    Console().print(f"time to first token {ours['ttft_s']:.2f} s; decode reads {gbs:.1f} GB/s of weights")
    return result


# The quantization tool's commands (convert, quantize) live with it, in quant/.
from quant.cli import register as _register_quant_commands  # noqa: E402

_register_quant_commands(app)


def main() -> None:
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except QcpuError as e:
        say(str(e))
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)
    except Exception as e:
        # Usage errors from Typer's click (vendored in recent Typer, so matched by shape): one line, exit 2.
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            say(e.format_message().replace("\n", " "))
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":  # click's form of Ctrl-C
            say("interrupted")
            sys.exit(130)
        raise

if __name__ == "__main__":
    main()
