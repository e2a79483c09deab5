"""Passkey retrieval (Mohtashami and Jaggi, 2023, "Landmark Attention"; LongLoRA's eval): a 5-digit key
hidden at some depth of filler text, asked for at the end. Test support, also used by tools/passkey.py."""

from __future__ import annotations

import re

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."


def needle(key: int) -> str:
    return f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"


def passkey_messages(tokenizer, n_tokens: int, depth: float, key: int) -> list[dict]:
    """Chat messages whose user turn is about `n_tokens` tokens long (filler counted with `tokenizer`),
    with the key's sentence after `depth` (0..1) of the filler."""
    per_filler = len(tokenizer.encode(FILLER))
    fixed = len(tokenizer.encode(INTRO + needle(key) + QUESTION)) + 30  # + the template's own tokens
    n_fill = max(1, (n_tokens - fixed) // per_filler)
    before = round(n_fill * depth)
    text = INTRO + FILLER * before + needle(key) + FILLER * (n_fill - before) + QUESTION
    return [{"role": "user", "content": text}]


def found(reply: str, key: int) -> bool:
    """Whether the reply names the key (its first 5-digit number is it)."""
    m = re.search(r"\d{5}", reply)
    return bool(m) and int(m.group()) == key
