"""`qcpu chat`: the multi-turn terminal REPL (first version).

Reads a line, renders the conversation through the chat template, feeds only the new tokens (the KV cache
holds the earlier turns), and streams the reply. Ctrl-C during a reply stops it and keeps what was said;
Ctrl-D, or Ctrl-C at the prompt, leaves.
"""

from __future__ import annotations

import sys

from rich.console import Console

from qcpu.errors import QcpuError

HELP = """commands:
  /help            this text
  /system TEXT     set the system prompt (starts a new conversation)
  /reset           forget the conversation
  /exit            leave (also Ctrl-D)
Ctrl-C stops a reply in progress."""


def system_prefix_tokens(engine, messages: list[dict]) -> int:
    """Tokens of the conversation's preamble (system prompt, default or given): what the ring keeps."""
    head = [m for m in messages if m["role"] == "system"]
    a = engine.template.render(head + [{"role": "user", "content": "a"}], add_generation_prompt=False)
    b = engine.template.render(head + [{"role": "user", "content": "b"}], add_generation_prompt=False)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    prefix = a[:n]
    cut = prefix.rfind("\n")  # the common text ends inside the user header; keep whole lines
    prefix = prefix[:cut + 1] if cut >= 0 else ""
    return len(engine.tokenizer.encode(prefix)) if prefix else 0


def run_repl(engine, params, max_tokens: int, system: str | None) -> None:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    err = Console(stderr=True, highlight=False, no_color=not interactive)
    out = sys.stdout
    messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def start_conversation() -> None:
        engine.reset()
        engine.cache.keep = system_prefix_tokens(engine, messages)

    start_conversation()
    read = _line_reader(interactive)
    if interactive:
        err.print(f"[bold]{engine.model.config.name}[/bold] · context {engine.cache.capacity} · /help for commands")
    while True:
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                err.print()
            return
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                return
            if cmd == "/help":
                err.print(HELP)
            elif cmd == "/reset":
                messages = [m for m in messages if m["role"] == "system"]
                start_conversation()
                err.print("[dim]conversation cleared[/dim]")
            elif cmd == "/system":
                messages = [{"role": "system", "content": arg.strip()}] if arg.strip() else []
                start_conversation()
                err.print("[dim]system prompt set; new conversation[/dim]")
            else:
                err.print(f"unknown command {cmd}; /help lists them")
            continue
        messages.append({"role": "user", "content": text})
        try:
            prompt = engine.chat_prompt_tokens(messages)
        except QcpuError as e:
            err.print(f"qcpu: {e}")
            messages.pop()
            continue
        evicted_before = engine.cache.n_evicted
        reply = []
        try:
            for piece in engine.stream(prompt, params, max_tokens):
                out.write(piece.text)
                out.flush()
                reply.append(piece.text)
        except KeyboardInterrupt:
            err.print("\n[dim][reply stopped][/dim]" if interactive else "")
        except QcpuError as e:
            err.print(f"qcpu: {e}")
            messages.pop()
            continue
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if engine.cache.n_evicted > evicted_before and interactive:
            err.print("[dim]context full: the oldest turns were dropped (system prompt kept)[/dim]")


def _line_reader(interactive: bool):
    if not interactive:
        def read_piped():
            line = sys.stdin.readline()
            return line if line else None
        return read_piped
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    from qcpu.models import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(str(cache_dir() / "chat_history")))
    return lambda: session.prompt(">>> ")
