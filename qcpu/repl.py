"""`qcpu chat`: the terminal. It reads keys and draws; the conversation and its cache live in
`conversation.Chat`.

prompt_toolkit input (line editing, persistent history, multi-line), slash commands, and the reply
streamed through a Rich `Live` region (plain text, or Markdown with --markdown) with a status line
(tokens/s, context used). Not a terminal (stdin piped): read messages, print only the replies, and stop
at the first error with exit status 1.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.text import Text

from qcpu.conversation import Chat, Turn
from qcpu.errors import QcpuError, say
from qcpu.generate import Stats
from qcpu.sampling import resolve_seed
from qcpu.text_input import StdinLines

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MULTILINE = '"""'

HELP = """\
[bold]commands[/bold]
  /help                 this text
  /system [TEXT]        show or set the system prompt (the conversation is kept, the cache re-filled)
  /reset                forget the conversation (the system prompt stays)
  /undo                 drop the last exchange (your message and the reply)
  /retry                write the last reply again
  /set [NAME VALUE]     show or change a setting: temp, top_p, top_k, min_p, repeat_penalty, seed, max_tokens
  /stats                speed, context use and settings
  /save FILE            write the conversation as JSON
  /load FILE            read a conversation saved by /save (re-reads it into the cache)
  /exit                 leave (also /quit, Ctrl-D, or Ctrl-C at an empty prompt)
[bold]keys[/bold]
  Enter sends; Esc Enter (or Alt-Enter) starts a new line; a message that starts with \"\"\" runs until a
  line that ends with \"\"\". Up/Down walk the history (kept across sessions). Ctrl-C stops a reply and
  keeps what was written; at the prompt it clears the line, on an empty line it leaves.
  Start a message with // to send text that begins with /."""

# /set NAME -> (SamplingParams field or "max_tokens", parser)
def _seed(value: str) -> int:
    return resolve_seed(None if value.lower() in ("none", "random", "off", "-1") else int(value))


SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "temp": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float),
    "seed": ("seed", _seed),
    "max_tokens": ("max_tokens", int),
}
_ALIASES = {"temperature": "temp", "n": "max_tokens", "repeat-penalty": "repeat_penalty",
            "top-p": "top_p", "top-k": "top_k", "min-p": "min_p", "max-tokens": "max_tokens"}


def quant_name(engine) -> str:
    """The file's quantization mix ("Q4_K_M"), else its most common matrix type."""
    meta = engine.model.file.metadata
    ft = meta.get("general.file_type")
    try:
        from gguf import LlamaFileType

        if ft is not None:
            return LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    except (ValueError, ImportError):
        pass
    try:
        from collections import Counter

        from gguf import GGMLQuantizationType

        types = Counter(GGMLQuantizationType(t.ggml_type).name for t in engine.model.file.tensors.values()
                        if len(t.shape) == 2)
        return types.most_common(1)[0][0]
    except Exception:
        return "?"


# -- the terminal -----------------------------------------------------------------------------------------

class _Tail:
    """Live-region renderable: the end of the reply that fits the screen, then the status line."""

    def __init__(self, body, status: Text):
        self.body, self.status = body, status

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        keep = max(1, options.size.height - 3)
        lines = console.render_lines(self.body, options.update(height=None), pad=False) if self.body else []
        for line in lines[-keep:]:
            yield from line
            yield Segment.line()
        yield self.status


def _fmt_stats(stats: Stats, chat: Chat, stopped: bool = False, live: bool = False) -> str:
    bits = []
    if stats.generated_tokens or not live:
        bits.append(f"{stats.generated_tokens} tok")
        bits.append(f"{stats.generate_tps:.1f} tok/s" if stats.generate_seconds else "- tok/s")
    if not live:
        bits.append(f"prompt {stats.prompt_tokens} tok in {stats.prompt_seconds:.1f}s")
    bits.append(f"context {chat.context_used}/{chat.capacity}")
    if stopped:
        bits.append("stopped")
    elif not live and stats.stop_reason == "max tokens":
        bits.append(f"cut at max_tokens {chat.max_tokens}")
    return " · ".join(bits)


def _fmt_speculation(engine, stats: Stats) -> str:
    """/stats' line on speculative decoding: the drafter, and the last turn's and the session's accepted
    tokens per checking pass."""
    spec = engine.speculator
    if spec is None:
        return "off"
    last = (f"last turn {stats.accepted_tokens}/{stats.drafted_tokens} drafted tokens accepted, "
            f"{stats.accepted_per_pass:.2f} per pass" if stats.draft_passes else "last turn no drafts checked")
    total = spec.stats
    return (f"{spec.kind} · {last} · session {total.accepted}/{total.drafted}, {total.accepted_per_pass:.2f} per "
            f"pass · acceptance now {spec.rate:.2f}")


class Repl:
    def __init__(self, chat: Chat, *, interactive: bool, markdown: bool = False, color: bool = True,
                 history: Path | None = None, model_label: str = ""):
        self.chat = chat
        self.interactive = interactive
        self.markdown = markdown
        self.color = color
        self.history = history
        self.model_label = model_label
        if interactive:
            self.out = Console(highlight=False, color_system="auto" if color else None, no_color=not color)
        else:
            self.out = None
        self.err = Console(stderr=True, highlight=False, color_system="auto" if (color and interactive) else None)
        self._session = None
        self._stdin = None if interactive else StdinLines()
        self.exit_code = 0  # piped mode stops at the first error, with exit status 1

    # -- output ---------------------------------------------------------------------------------------
    def note(self, message: str, style: str = "dim") -> None:
        """A line for the user (never in piped mode's stdout)."""
        if self.interactive:
            self.out.print(Text(message, style=style if self.color else ""))
        else:
            self.err.print(message, markup=False, highlight=False)

    def error(self, message: str) -> None:
        if self.interactive:
            self.out.print(Text(f"qcpu: {message}", style="red" if self.color else ""))
        else:
            say(message)  # one line whatever the width; a script sees a non-zero exit
            self.exit_code = 1

    def _body(self, text: str):
        text = _CONTROL.sub("", text)  # a model's text must not drive the terminal (escape sequences)
        if self.markdown:
            from rich.markdown import Markdown

            return Markdown(text)
        return Text(text)

    def _progress(self, label: str):
        """A transient progress bar (interactive) for long cache fills; a no-op callback otherwise."""
        if not self.interactive:
            return _NullProgress()
        return _BarProgress(self.out, label)

    # -- a turn ---------------------------------------------------------------------------------------
    def run_turn(self, make_turn: Callable[[], Turn]) -> None:
        chat = self.chat
        try:
            turn = make_turn()
        except QcpuError as e:
            self.error(str(e))
            return
        except KeyboardInterrupt:
            self.note("[stopped]")
            return
        try:
            if self.interactive:
                self._stream_live(turn)
            else:
                self._stream_plain(turn)
        except KeyboardInterrupt:
            turn.stopped = True
            turn.stats.stop_reason = "stopped (Ctrl-C)"
        except QcpuError as e:
            self.error(str(e))
        finally:
            turn.finish()
        if self.interactive:
            if turn.parts:
                self.out.print(self._body(turn.text))
            elif turn.stopped and turn.replaces is not None:
                self.note("[stopped before the new reply began; the previous one is kept]")
            elif turn.stopped:
                self.note("[stopped before the reply began; your message was dropped: press Up to edit it]")
            if turn.parts or turn.completed:
                self.note(_fmt_stats(turn.stats, chat, stopped=turn.stopped))
        elif turn.parts or turn.completed or turn.stopped:
            sys.stdout.write("\n")
            sys.stdout.flush()
        notice = chat.eviction_notice(turn)
        if notice and self.interactive:
            self.note(notice, style="yellow")

    def _stream_plain(self, turn: Turn) -> None:
        for piece in turn:
            sys.stdout.write(piece.text)
            sys.stdout.flush()

    def _stream_live(self, turn: Turn) -> None:
        from rich.live import Live

        chat = self.chat
        dim = "dim" if self.color else ""
        status = Text(f"reading {len(turn.prompt)} new tokens…", style=dim)
        with Live(_Tail(None, status), console=self.out, auto_refresh=False, transient=True,
                  redirect_stdout=False, redirect_stderr=False) as live:
            live.refresh()
            last = 0.0
            for _ in turn:
                now = time.perf_counter()
                if now - last >= 0.1:
                    last = now
                    status = Text("● " + _fmt_stats(turn.stats, chat, live=True), style=dim)
                    live.update(_Tail(self._body(turn.text), status), refresh=True)

    # -- input ----------------------------------------------------------------------------------------
    def _make_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.output.color_depth import ColorDepth

        kb = KeyBindings()

        def open_block(buf) -> bool:
            t = buf.text.lstrip()
            return t.startswith(MULTILINE) and not (len(t) >= 6 and t.rstrip().endswith(MULTILINE))

        @kb.add("enter")
        def _(event):
            buf = event.current_buffer
            if open_block(buf):
                buf.newline(copy_margin=False)
            else:
                buf.validate_and_handle()

        @kb.add("escape", "enter")
        def _(event):
            event.current_buffer.newline(copy_margin=False)

        @kb.add("c-c")
        def _(event):
            buf = event.current_buffer
            if buf.text:
                buf.reset()
            else:
                event.app.exit(exception=KeyboardInterrupt)

        history = InMemoryHistory()
        if self.history is not None:
            try:
                self.history.parent.mkdir(parents=True, exist_ok=True)
                self.history.touch()
                history = FileHistory(str(self.history))
            except OSError:
                pass
        return PromptSession(
            history=history, key_bindings=kb, multiline=Condition(lambda: True),
            prompt_continuation=lambda width, line, wrap: "... ".rjust(width),
            color_depth=ColorDepth.DEPTH_24_BIT if self.color else ColorDepth.DEPTH_1_BIT,
            enable_open_in_editor=False)

    def read_interactive(self) -> str | None:
        if self._session is None:
            self._session = self._make_session()
        from prompt_toolkit.formatted_text import FormattedText

        msg = FormattedText([("bold ansigreen" if self.color else "", ">>> ")])
        try:
            text = self._session.prompt(msg)
        except (EOFError, KeyboardInterrupt):
            return None
        return text

    def read_piped(self) -> str | None:
        line = self._stdin.readline()
        if not line:
            return None
        if line.lstrip().startswith(MULTILINE):
            lines = [line]
            while not (len("".join(lines).strip()) >= 6 and "".join(lines).rstrip().endswith(MULTILINE)):
                more = self._stdin.readline()
                if not more:
                    break
                lines.append(more)
            return "".join(lines)
        return line

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Read and answer messages until the end of input; the exit status (piped: 1 after an error)."""
        read = self.read_interactive if self.interactive else self.read_piped
        while not self.exit_code:
            raw = read()
            if raw is None:
                if self.interactive:
                    self.out.print()
                break
            text = raw.strip()
            if text.startswith(MULTILINE):
                text = text[len(MULTILINE):]
                if text.rstrip().endswith(MULTILINE):
                    text = text.rstrip()[:-len(MULTILINE)]
                text = text.strip("\n").strip()
            if not text:
                continue
            if text.startswith("//"):
                text = text[1:]
            elif text.startswith("/"):
                try:
                    if self.command(text) is False:
                        break
                except KeyboardInterrupt:
                    self.note("[interrupted]")
                continue
            self.run_turn(lambda: self.chat.send(text))
        return self.exit_code

    def command(self, text: str) -> bool | None:
        chat = self.chat
        cmd, _, arg = text.partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        try:
            if cmd in ("/exit", "/quit", "/bye", "/q"):
                return False
            elif cmd in ("/help", "/?", "/h"):
                if self.interactive:
                    self.out.print(HELP if self.color else Text.from_markup(HELP).plain)
                else:
                    self.err.print(Text.from_markup(HELP).plain, markup=False)
            elif cmd == "/system":
                if not arg:
                    self.note(f"system prompt: {chat.system}" if chat.system
                              else "no system prompt (the template's default applies)", style="")
                    return None
                with self._progress("re-reading the conversation") as bar:
                    chat.set_system(arg, bar)
                self.note(f"system prompt set; {len(chat.messages) // 2} exchanges kept, "
                          f"context {chat.context_used}/{chat.capacity}")
            elif cmd in ("/reset", "/clear"):
                chat.reset()
                self.note("conversation cleared")
            elif cmd == "/undo":
                chat.undo()
                self.note(f"last exchange dropped; {len(chat.messages) // 2} left, "
                          f"context {chat.context_used}/{chat.capacity}")
            elif cmd == "/retry":
                self.run_turn(chat.retry)
            elif cmd == "/set":
                self._set(arg)
            elif cmd == "/stats":
                self._stats()
            elif cmd == "/save":
                if not arg:
                    raise QcpuError("usage: /save FILE")
                path = chat.save(arg)
                self.note(f"saved {len(chat.messages)} messages to {path}")
            elif cmd == "/load":
                if not arg:
                    raise QcpuError("usage: /load FILE")
                with self._progress("reading the conversation") as bar:
                    chat.load(arg, bar)
                self.note(f"loaded {len(chat.messages)} messages from {arg}; "
                          f"context {chat.context_used}/{chat.capacity}")
            else:
                raise QcpuError(f"unknown command {cmd}; /help lists them (// sends a message starting with /)")
        except QcpuError as e:
            self.error(str(e))
        return None

    def _settings(self) -> dict:
        p = self.chat.params
        return {"temp": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
                "repeat_penalty": p.repeat_penalty, "seed": p.seed, "max_tokens": self.chat.max_tokens}

    def _set(self, arg: str) -> None:
        from dataclasses import replace

        parts = arg.split()
        if not parts:
            self.note("  ".join(f"{k} {v}" for k, v in self._settings().items()), style="")
            return
        name = _ALIASES.get(parts[0].lower(), parts[0].lower())
        if name not in SETTINGS:
            raise QcpuError(f"unknown setting {parts[0]}; one of: {', '.join(SETTINGS)}")
        if len(parts) != 2:
            raise QcpuError(f"usage: /set {name} VALUE")
        attr, parse = SETTINGS[name]
        try:
            value = parse(parts[1])
        except ValueError:
            raise QcpuError(f"{name}: not a valid value: {parts[1]}") from None
        if attr == "max_tokens":
            if value <= 0:
                raise QcpuError(f"max_tokens must be positive, got {value}")
            self.chat.max_tokens = value
        else:
            params = replace(self.chat.params, **{attr: value})
            params.validate()
            self.chat.set_params(params, reseed=attr == "seed")
        self.note(f"{name} = {value}")

    def _stats(self) -> None:
        chat, s = self.chat, self.chat.last
        eng = chat.engine
        try:
            import numba

            threads = numba.get_num_threads()
        except Exception:
            threads = "?"
        rows = [
            ("model", f"{self.model_label}"),
            ("context", f"{chat.context_used}/{chat.capacity} tokens held · {eng.n_kept} kept (system prompt) · "
                        f"{eng.n_evicted} dropped so far"),
            ("KV cache", f"K {eng.cache_types[0]} · V {eng.cache_types[1]} · {eng.cache_bytes / 2**20:.0f} MiB"),
            ("last turn", f"prompt {s.prompt_tokens} new tokens in {s.prompt_seconds:.2f}s ({s.prompt_tps:.1f} tok/s) · "
                          f"reply {s.generated_tokens} tokens in {s.generate_seconds:.2f}s ({s.generate_tps:.1f} tok/s) · "
                          f"first token after {s.first_token_seconds:.2f}s · {s.stop_reason or '-'}"),
            ("speculative", _fmt_speculation(eng, s)),
            ("session", f"{len(chat.messages) // 2} exchanges · {chat.total_prompt} prompt + "
                        f"{chat.total_generated} generated tokens · {threads} threads"),
            ("settings", "  ".join(f"{k} {v}" for k, v in self._settings().items())),
        ]
        for k, v in rows:
            line = f"{k:>10}  {v}"
            if self.interactive:
                self.out.print(Text(line))
            else:
                self.err.print(line, markup=False)


class _NullProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _BarProgress:
    def __init__(self, console, label: str):
        self.console, self.label = console, label
        self.progress = None

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("tokens"), TimeElapsedColumn(), console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        self.progress.stop()
        return False


# -- start-up ---------------------------------------------------------------------------------------------

def history_path() -> Path:
    from qcpu.models import cache_dir

    return cache_dir() / "chat_history"


def load_chat(path: Path, *, params, max_tokens: int, system: str | None, ctx: int | None,
              chat_template: str | None, console: Console | None, check_tensors: bool = False, rope=None,
              cache_types: tuple[str, str] = ("f16", "f16")) -> Chat:
    """Load the model, compile the kernels and read the system prompt into the cache, with a progress bar
    on `console` (None: silently)."""
    from qcpu.generate import Engine

    if console is None:
        engine = Engine.load(path, ctx=ctx, chat_template=chat_template, check_tensors=check_tensors, rope=rope,
                             cache_type_k=cache_types[0], cache_type_v=cache_types[1])
        chat = Chat(engine, params, max_tokens, system)
        chat.refill()
        return chat
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"reading {path.name}", total=3)
        engine = Engine.load(path, ctx=ctx, chat_template=chat_template, check_tensors=check_tensors, rope=rope,
                             cache_type_k=cache_types[0], cache_type_v=cache_types[1])
        chat = Chat(engine, params, max_tokens, system)
        progress.update(task, advance=1, description="compiling kernels")

        def step(done: int, total: int) -> None:
            if done == 1:
                progress.update(task, completed=2, description=f"reading the system prompt ({total} tokens)")
            elif done == total and total:
                progress.update(task, completed=3)

        chat.refill(step, first_chunk=1)
        progress.update(task, completed=3)
    return chat


def run_chat(path: Path, *, params, max_tokens: int, system: str | None, ctx: int | None, chat_template: str | None = None,
             markdown: bool = False, color: bool = True, check_tensors: bool = False, rope=None,
             cache_types: tuple[str, str] = ("f16", "f16"), speculation=None) -> int:
    """Run `qcpu chat` until the user leaves; the exit status. `speculation`: speculative.SpecOptions
    (None: none). Raises QcpuError if it cannot start."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if os.environ.get("NO_COLOR"):
        color = False
    status_console = Console(stderr=True, highlight=False, color_system="auto" if color else None) if interactive else None
    t0 = time.perf_counter()
    chat = load_chat(path, params=params, max_tokens=max_tokens, system=system, ctx=ctx,
                     chat_template=chat_template, console=status_console, check_tensors=check_tensors, rope=rope,
                     cache_types=cache_types)
    if speculation is not None:
        from qcpu.speculative import attach

        attach(chat.engine, speculation)
    if params.grammar is not None:
        params.grammar.check(chat.engine.tokenizer)  # a schema that cannot compile: one line, before any turn
    cfg = chat.engine.model.config
    label = f"{cfg.name} · {quant_name(chat.engine)}"
    repl = Repl(chat, interactive=interactive, markdown=markdown, color=color,
                history=history_path() if interactive else None, model_label=label)
    if interactive:
        try:
            import numba

            threads = f" · {numba.get_num_threads()} threads"
        except Exception:
            threads = ""
        repl.out.print(Text.assemble((cfg.name, "bold" if color else ""),
                                     f" · {quant_name(chat.engine)} · context {chat.capacity} tokens{threads}"
                                     f" · ready in {time.perf_counter() - t0:.1f}s"))
        repl.note('/help for commands · """ or Esc Enter for several lines · Ctrl-C stops a reply · Ctrl-D quits')
    return repl.run()
