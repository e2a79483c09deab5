"""Record llama.cpp's tokenization of a varied corpus as goldens for tests/test_tokenizer.py.

llama.cpp (through llama-cpp-python, the ``llama`` extra) is the reference: qcpu's Tokenizer.encode must
equal ``Llama.tokenize(text.encode(), add_bos=False, special=...)`` token for token.

    python tools/record_tokenizer_goldens.py [MODEL.gguf] [-o tests/golden/tokenize.json]

Only the vocabulary is loaded (vocab_only=True), so this takes seconds, not the weights' RAM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "qcpu" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "tokenize.json"

CORPUS: list[str] = [
    # empty / whitespace
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    " \n \n",
    "\r\n",
    "line one\r\nline two\r\n",
    " " * 40,
    " " * 17 + "x",
    # English, contractions, case
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "   leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "I'm sure you'll see they're fine, we've done it, he'd say, it's John's.",
    "I'M SURE YOU'LL SEE THEY'RE FINE; DON'T WE'VE HE'D",
    "rock 'n' roll 'tis '90s ''quoted'' `code`",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "e-mail: someone@example.com, URL: https://example.com/a/b?c=d&e=f#g",
    # numbers
    "1234567",
    "3.14159",
    "Pi is 3.14159 and e is 2.71828; 1,234,567.89 - 0x1F + 1e-10 = -42",
    "year2024 v1.2.3 ①②③ ٣٤٥ Ⅻ ½ ²³",
    # code: tabs, runs of spaces, newlines
    "def add(a, b):\n    return a + b\n",
    "def f(x):\n\tif x > 0:\n\t\treturn x  # positive\n\telse:\n\t\treturn -x\n\n\n",
    "int main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "for (int i = 0; i < n; ++i) {\n        a[i] += b[i] * 2;\t\t// comment\n}",
    "    \n        \n\t \t\n",
    "x = {'a': [1, 2, 3], \"b\": (4, 5)}  ;;  ->  => != == <= >= ** // %%",
    "<div class=\"container\">\n  <p>Hi &amp; bye</p>\n</div>",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "#!/usr/bin/env bash\nset -euo pipefail\necho \"$HOME\" | tr 'a-z' 'A-Z'\n",
    # Chinese, Japanese, Korean, other scripts
    "你好，世界！",
    "我爱自然语言处理。今天天气很好，我们去公园散步吧。",
    "Qwen是阿里云开发的大语言模型，支持中文和English混合输入。",
    "日本語のテキスト、カタカナとひらがな。",
    "안녕하세요, 세계!",
    "Привет, мир! Ёжик в тумане.",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Γειά σου Κόσμε",
    # emoji, ZWJ sequences, modifiers, flags, keycaps
    "😀",
    "Hello 👋 world 🌍!",
    "👨‍👩‍👧‍👦 family",
    "👩🏽‍💻 and 🧑🏿‍🤝‍🧑🏻",
    "🇯🇵🇺🇸🇨🇳 flags",
    "1️⃣ 2️⃣ #️⃣ ❤️ ☺️",
    "🦀🐍🚀✨🔥💯",
    # accented / combining / normalization-sensitive
    "café naïve résumé Ångström",
    "cafe\u0301 nai\u0308ve",
    "\u0301 lone combining mark",
    "Zalgo: Z\u0351\u036b\u0343a\u0352\u036bl\u0351g\u0313o\u0352",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁ ligature, ẞ, ß, İstanbul, ı",
    "'ſ 'K 'Ｓ",
    # unusual whitespace / control characters
    "non\u00a0breaking\u3000ideographic\u2028line\u2029para",
    "zero\u200bwidth\u200cjoiners\u200d\ufeffbom",
    "tab\tseparated\tvalues\n1\t2\t3",
    "ctrl\x00\x01\x1b[31mred\x1b[0m\x7f",
    # special tokens written in text
    "<|im_start|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more",
    " <|im_end|> ",
    "<|im_end|><|im_end|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<|notatoken|> <im_start> <|im_start <|IM_START|>",
    "[PAD151665]",
    "<|<|im_start|>|>",
    # "</s>" is a NORMAL token in Qwen's vocab (id 128247), but llama.cpp's EOG name list (added for
    # PaddleOCR) forces it to CONTROL: with special=True llama.cpp splits it out as a special token.
    # qcpu deliberately follows the model's own (Hugging Face) tokenization here; see test_tokenizer.py.
    "<s>strike</s> and <del>x</s></p>",
    "a</s>b",
    # mixed / long
    "Mixed: English, 中文, 日本語, emoji 🎉, code `x=1`, math ∑∫√∞ ≈ ≠ ±.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua.\n\nUt enim ad minim veniam, quis nostrud exercitation ullamco.",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!????????........,,,,,,,,------======",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("-o", "--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()

    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]

    cases = []
    for text in CORPUS:
        case = {"text": text}
        for special in (True, False):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
            key = "special" if special else "plain"
            case[key] = ids
            # llama.cpp's detokenization of those ids, control tokens rendered (True) or dropped (False)
            case[key + "_detok"] = _detok(llama_cpp, vocab, ids, True)
            case[key + "_detok_nospecial"] = _detok(llama_cpp, vocab, ids, False)
        cases.append(case)

    out = {
        "reference": "llama.cpp via llama-cpp-python",
        "llama_cpp_python_version": llama_cpp.__version__,
        "model": os.path.basename(args.model),
        "model_sha256_head": _sha256_head(args.model),
        "call": "Llama(vocab_only=True).tokenize(text.encode(), add_bos=False, special=True|False)",
        "n_vocab": n_vocab,
        "eog_ids": eog,
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # one case per line: small, and diffs stay readable when goldens are re-recorded
    head = {k: v for k, v in out.items() if k not in ("cases", "eog_ids")}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    lines.append(f' "eog_ids": {json.dumps(eog)},')
    lines.append(' "cases": [')
    lines.append(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases))
    lines.append(" ]")
    lines.append("}")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(cases)} cases to {args.out}")


def _detok(llama_cpp, vocab, ids: list[int], special: bool) -> str:
    """Concatenated llama_token_to_piece.  Not Llama.detokenize: that uses a 32-byte buffer and silently
    drops longer pieces (Qwen has single tokens of 40+ spaces) and strips a space after BOS."""
    import ctypes

    out = b""
    buf = ctypes.create_string_buffer(256)
    for i in ids:
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
        out += buf.raw[:n]
    return out.decode("utf-8", errors="replace")


def _sha256_head(path: str, n: int = 1 << 20) -> str:
    """Hash of the first MiB (header + tokenizer metadata), to tell which file the goldens came from."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


if __name__ == "__main__":
    main()
