"""Render a conversation to the prompt text the model was trained on, from the GGUF's own chat template.

``tokenizer.chat_template`` is a Jinja2 template written for Hugging Face transformers; we render it the
way transformers does (variables ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``,
``eos_token``) in the hardened sandbox of `jinja_sandbox` (a GGUF is untrusted input), and fall back to
ChatML when the file has none or the user asks (``--chat-template chatml``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from qcpu.jinja_sandbox import SandboxedTemplate

# The ChatML format Qwen models use (same text as Qwen2.5's template minus its default system prompt).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

HINT = "try --chat-template chatml"


class ChatTemplate:
    """``ChatTemplate(source, bos_token, eos_token).render(messages)``.  ``source`` None/empty or
    ``"chatml"`` selects the built-in ChatML template. Raises QcpuError (one line, with HINT) for a
    template that does not compile or that the sandbox refuses."""

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None):
        self.is_chatml_fallback = source is None or not source.strip() or source.strip().lower() == "chatml"
        self.source = CHATML_TEMPLATE if self.is_chatml_fallback else source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self._template = SandboxedTemplate(self.source, what="the model's chat template", hint=HINT)

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
        variables = dict(extra)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            size = len(json.dumps([messages, tools], default=str))
        except Exception:
            size = 0
        return self._template.render(input_size=size, **variables)
