"""The conversation: a system prompt and alternating user/assistant messages, kept in step with the
engine's KV cache through the engine's API only (`sync`, `feed`, `reset` and its counters).

A turn renders the whole conversation through the chat template; the engine feeds only what its cache
lacks, so earlier turns are never processed twice. /undo, /retry and /reset are changes of the message
list followed by a sync; /load and /system re-fill. When the conversation outgrows the context, the
engine's cache keeps the system prompt (the kept prefix) and drops the oldest tokens. Saved as versioned
JSON. No terminal code here: `repl.py` draws, this module decides.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from qcpu.errors import QcpuError
from qcpu.generate import Piece, Stats, common_prefix
from qcpu.sampling import new_rng, resolve_seed
from qcpu.text_input import read_text_file

SAVE_FORMAT = "qcpu-chat"
SAVE_VERSION = 1
# llama-cli refuses a prompt longer than n_ctx - 4 ("prompt is too long"); the kept prefix obeys the same.
PREFIX_MARGIN = 4


@dataclass
class Turn:
    """One reply being written. Iterate for the text pieces; `finish()` records it in the conversation."""

    chat: "Chat"
    prompt: list[int]
    start: int  # stream index where this exchange's new tokens begin
    evicted_before: int
    stats: Stats = field(default_factory=Stats)
    parts: list[str] = field(default_factory=list)
    stopped: bool = False  # Ctrl-C
    completed: bool = False  # the model ended its reply (or hit max_tokens)
    finished: bool = False
    replaces: str | None = None  # /retry: the reply being rewritten (kept if the new one never starts)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def __iter__(self) -> Iterator[Piece]:
        chat = self.chat
        for piece in chat.engine.stream(self.prompt, chat.params, chat.max_tokens, self.stats, chat.rng,
                                        truncate=True):
            self.parts.append(piece.text)
            yield piece
        self.completed = True

    def finish(self) -> None:
        """Keep the reply (even a partial one); a turn that wrote nothing leaves no trace."""
        if self.finished:
            return
        self.finished = True
        chat = self.chat
        if self.parts or self.completed:
            chat.last = self.stats
        chat.total_prompt += self.stats.prompt_tokens
        chat.total_generated += self.stats.generated_tokens
        if self.parts or self.completed or self.replaces is not None:
            text = self.text if (self.parts or self.completed) else self.replaces
            chat.messages.append({"role": "assistant", "content": text})
            if len(chat.starts) < len(chat.messages) // 2:
                chat.starts.append(self.start)
        else:
            chat.messages.pop()  # the user message: nothing was said to it

    @property
    def evicted(self) -> int:
        return self.chat.engine.n_evicted - self.evicted_before


class Chat:
    """The conversation (system prompt + alternating user/assistant messages) and the engine it runs on."""

    def __init__(self, engine, params, max_tokens: int, system: str | None = None):
        self.engine = engine
        self.params = replace(params, seed=resolve_seed(params.seed))  # drawn now, so /stats can show it
        self.rng = new_rng(self.params)  # one random stream for the session, as llama.cpp's sampler
        self.max_tokens = max_tokens
        self.system = system or None
        self.messages: list[dict] = []  # user, assistant, user, assistant, ...
        self.starts: list[int] = []  # stream index where each exchange's tokens begin (eviction notices)
        self.last = Stats()
        self.total_prompt = 0
        self.total_generated = 0
        self.dropped_exchanges = 0  # exchanges wholly evicted, as last announced
        self._prefix_cache: tuple[str | None, list[int]] | None = None

    # -- rendering ------------------------------------------------------------------------------------
    def conversation(self, messages: list[dict] | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.messages if messages is None else messages)

    def prefix_tokens(self, system: str | None | bool = False) -> list[int]:
        """Tokens of the preamble every rendering starts with (the system prompt, given or the template's
        default): what the cache keeps when it drops tokens. `system` (default: the current one) asks for
        another system prompt's preamble."""
        system = self.system if system is False else (system or None)
        if self._prefix_cache and self._prefix_cache[0] == system:
            return self._prefix_cache[1]
        tpl = self.engine.template
        head = [{"role": "system", "content": system}] if system else []
        a = tpl.render(head + [{"role": "user", "content": "a"}], add_generation_prompt=False)
        b = tpl.render(head + [{"role": "user", "content": "b"}], add_generation_prompt=False)
        prefix = a[:common_prefix(a, b)]
        cut = prefix.rfind("\n")  # the common text ends inside the user header; keep whole lines
        prefix = prefix[:cut + 1] if cut >= 0 else ""
        tokens = self.engine.tokenizer.encode(prefix) if prefix else []
        self._prefix_cache = (system, tokens)
        return tokens

    def held_target(self, messages: list[dict]) -> list[int]:
        """The tokens a fresh run of `messages` (ending with a reply, or empty) leaves in the cache."""
        if not messages:
            return self.prefix_tokens()
        text = self.engine.template.render(self.conversation(messages), add_generation_prompt=False)
        return self.engine.tokenizer.encode(text)

    def _starts_for(self, messages: list[dict]) -> list[int]:
        """Stream index where each exchange of `messages` begins, in a fresh run of them."""
        if not messages:
            return []
        return [len(self.prefix_tokens())] + [len(self.held_target(messages[:i])) for i in range(2, len(messages), 2)]

    def check_system(self, system: str | None) -> None:
        """Raise QcpuError (saying which --ctx would do) if this system prompt leaves no room in the context."""
        n = len(self.prefix_tokens(system))
        room = self.capacity - PREFIX_MARGIN
        if n <= room:
            return
        cfg = self.engine.model.config
        most = cfg.max_context  # the trained context, or what the rope scaling in effect stretches it to
        # The prompt plus room for a few exchanges, in steps of 256, at most what the model can take.
        want = min(-(-(n + 512) // 256) * 256, most)
        what = (f"the {most} tokens the model's rope scaling allows" if cfg.rope_scaled
                else f"the model's trained context of {most} tokens")
        fix = (f"--ctx {want} would hold it" if n + PREFIX_MARGIN <= want else f"that is more than {what}: shorten it")
        raise QcpuError(f"the system prompt is {n} tokens, more than the context of {self.capacity} tokens "
                        f"can hold ({room} at most); {fix}")

    def set_params(self, params, reseed: bool = False) -> None:
        """New sampling settings; setting the seed (`reseed`, or a new value) restarts the random stream,
        other changes continue it."""
        if reseed or params.seed != self.params.seed:
            self.rng = new_rng(params)
        self.params = params

    # -- the engine's counters ------------------------------------------------------------------------
    @property
    def context_used(self) -> int:
        return self.engine.n_held

    @property
    def capacity(self) -> int:
        return self.engine.capacity

    def refill(self, progress: Callable[[int, int], None] | None = None, first_chunk: int | None = None) -> None:
        """Empty the cache and feed it the conversation, so it holds what a fresh run would.

        A trailing user message (a reply still to write) is left for the next turn. `progress(done, total)`
        is called after each chunk; `first_chunk` makes the first pass that small (start-up: compile the
        one-token path first). Raises QcpuError if the system prompt does not fit."""
        self.check_system(self.system)
        eng = self.engine
        prefix = self.prefix_tokens()
        eng.reset(keep=len(prefix))
        msgs = self.messages[:-1] if self.messages and self.messages[-1]["role"] == "user" else self.messages
        tokens = self.held_target(msgs)
        self.starts = self._starts_for(msgs)
        self.dropped_exchanges = 0
        if tokens:
            eng.feed(tokens, progress=progress, first_chunk=first_chunk)
        self.dropped_exchanges = self._count_dropped()

    def _rewind(self) -> None:
        """After messages were removed: cut the cache back to what it shares with the conversation. What
        it then lacks (all of it, if the cache had dropped what was needed) is fed with the next turn."""
        eng = self.engine
        eng.sync(self.held_target(self.messages), keep=len(self.prefix_tokens()), need_logits=False)
        if eng.n_seen == 0:  # rebuilt: the next turn feeds the conversation from the start
            self.starts = self._starts_for(self.messages)
            self.dropped_exchanges = 0
        del self.starts[len(self.messages) // 2:]

    def _count_dropped(self) -> int:
        """How many exchanges the ring has dropped entirely."""
        eng = self.engine
        if not eng.n_evicted:
            return 0
        oldest = eng.oldest_held
        ends = self.starts[1:] + [eng.n_seen]
        return sum(1 for end in ends if end <= oldest)

    def eviction_notice(self, turn: Turn) -> str | None:
        """One line when this turn pushed (more of) the conversation out of the context."""
        if not turn.evicted:
            return None
        n = self._count_dropped()
        first = self.dropped_exchanges == 0 and turn.evicted == self.engine.n_evicted
        if n <= self.dropped_exchanges and not first:
            return None
        self.dropped_exchanges = max(n, self.dropped_exchanges)
        what = (f"the oldest {n} exchange{'s' if n != 1 else ''} dropped" if n
                else "the start of the first exchange dropped")
        return f"context full ({self.capacity} tokens): {what}, system prompt kept"

    # -- turns ----------------------------------------------------------------------------------------
    def send(self, text: str) -> Turn:
        """Add a user message; the Turn that writes the reply (iterate it, then `finish()`)."""
        self.messages.append({"role": "user", "content": text})
        return self._turn()

    def _turn(self) -> Turn:
        eng = self.engine
        try:
            full = eng.tokenizer.encode(eng.template.render(self.conversation(), add_generation_prompt=True))
            new = len(full) - len(self.held_target(self.messages[:-1]))  # this message and the glue
            if new > eng.room:
                raise QcpuError(f"that message is {new} tokens, more than the context holds "
                                f"({eng.capacity} with {eng.n_kept} kept); shorten it or raise --ctx")
            evicted = eng.n_evicted
            prompt = eng.sync(full, keep=len(self.prefix_tokens()))
            if eng.n_seen == 0:  # rebuilt from the start: the earlier exchanges are fed again
                self.starts = self._starts_for(self.messages[:-1])
        except BaseException:
            self.messages.pop()
            raise
        start = eng.n_seen + max(0, len(prompt) - new)
        return Turn(self, prompt, start=start, evicted_before=evicted)

    def retry(self) -> Turn:
        """Write the last reply again (the cache rewinds to the prompt's last token)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise QcpuError("no reply to retry yet")
        old = self.messages.pop()["content"]
        del self.starts[len(self.messages) // 2:]
        user = self.messages[-1]
        try:
            turn = self._turn()
        except BaseException:
            self.messages += [user, {"role": "assistant", "content": old}]
            raise
        turn.replaces = old
        return turn

    def undo(self) -> None:
        """Drop the last exchange. Raises QcpuError when there is none."""
        if len(self.messages) < 2:
            raise QcpuError("nothing to undo")
        del self.messages[-2:]
        self._rewind()

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.messages = []
        self.starts = []
        self.dropped_exchanges = 0
        self._rewind()

    def set_system(self, text: str | None, progress=None) -> None:
        """Change the system prompt and re-fill the cache. A prompt that does not fit raises QcpuError
        and leaves the conversation, the old system prompt and the cache as they were."""
        self.check_system(text)
        self.system = text or None
        self.refill(progress)

    # -- files ----------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "model": self.engine.model.config.name,
                "system": self.system, "messages": [dict(m) for m in self.messages]}

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON, atomically (temp file in the same folder, then rename)."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise QcpuError(f"{path}: is a directory")
        data = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise QcpuError(f"{folder}: no such folder")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @staticmethod
    def read_file(path: str | Path) -> tuple[str | None, list[dict]]:
        path = Path(path).expanduser()
        text = read_text_file(path)
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise QcpuError(f"{path}: not a saved conversation ({e})") from None
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
            raise QcpuError(f"{path}: not a conversation saved by qcpu chat (/save)")
        system, messages = data.get("system"), data.get("messages")
        if system is not None and not isinstance(system, str):
            raise QcpuError(f"{path}: 'system' must be a string")
        if not isinstance(messages, list):
            raise QcpuError(f"{path}: 'messages' must be a list")
        out = []
        for i, m in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if not (isinstance(m, dict) and m.get("role") == want and isinstance(m.get("content"), str)):
                raise QcpuError(f"{path}: message {i + 1} must be {{'role': '{want}', 'content': TEXT}}")
            out.append({"role": want, "content": m["content"]})
        if out and out[-1]["role"] == "user":
            raise QcpuError(f"{path}: the last message has no reply")
        return system, out

    def load(self, path: str | Path, progress=None) -> None:
        """Replace the conversation by a saved one and re-fill the cache. Raises QcpuError (the
        conversation unchanged) for a file that is not one, or a system prompt that does not fit."""
        system, messages = self.read_file(path)
        self.check_system(system)
        self.system, self.messages = system, messages
        self.refill(progress)
