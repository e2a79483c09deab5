"""Record llama.cpp's tokenization of a varied corpus as goldens for tests/test_tokenizer.py.

llama.cpp (through llama-cpp-python, the ``llama`` extra) is the reference: qcpu's Tokenizer.encode must
equal ``Llama.tokenize(text.encode(), add_bos=False, special=...)`` token for token.

    python tools/record_tokenizer_goldens.py [MODEL.gguf] [-o tests/golden/tokenize.json]
                                             [--default-pre-out tests/golden/tokenize_default_pre.json]

Two goldens from the same corpus: MODEL as it is, and a metadata-only copy of MODEL without the
``tokenizer.ggml.pre`` key, which llama.cpp tokenizes with its 'default' BPE pre-tokenizer after a
"missing pre-tokenizer type" warning (llama_vocab::impl::load).  Only the vocabulary is loaded
(vocab_only=True), so this takes seconds, not the weights' RAM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "qcpu" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "tokenize.json"
DEFAULT_PRE_OUT = DEFAULT_OUT.with_name("tokenize_default_pre.json")

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

# Extra cases for the 'default' pre-tokenizer only: its first split isolates punctuation and $+<=>^~|
# (but not `), its last cuts ASCII digit runs in threes; mixed scripts of digits and punctuation.
DEFAULT_PRE_EXTRA: list[str] = [
    "a$b+c<d=e>f^g~h|i`j",
    "don't 'Tis O'Neil's rock'n'roll ''",
    "«quoted» — dash… ¿qué? ¡sí! 「括弧」 ‘curly’ “double”",
    "12345678901 1234 12 ١٢٣٤٥٦٧ 3٤5٦ x1y22z333w4444",
    "a  \t\tb\u3000\u3000c \u00a0 d\n\n  e   ",
    "price: $1,299.99 (~20% off) => £999 | 5+5=10 ^_^",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("-o", "--out", default=str(DEFAULT_OUT))
    ap.add_argument("--default-pre-out", default=str(DEFAULT_PRE_OUT))
    args = ap.parse_args()

    record(args.model, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        pre_less = Path(tmp) / "no-pre.gguf"
        write_without_pre(args.model, pre_less)
        record_default_pre(args.model, pre_less, args.default_pre_out)


def write_without_pre(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A metadata-only copy of `src` (every key but tokenizer.ggml.pre, no tensors): enough for
    llama.cpp's vocab_only load and for qcpu's Tokenizer, and a few MB instead of the weights."""
    import gguf

    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        # GGUF.* are the header's own counts; the writer adds general.architecture itself
        if name.startswith("GGUF.") or name in ("general.architecture", "tokenizer.ggml.pre"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def record_default_pre(model: str, pre_less: Path, out_path: str) -> None:
    import llama_cpp

    # llama.cpp logs its warning through the C stderr, which verbose=False would silence: capture fd 2
    # to record that it really took the missing-pre-tokenizer path.
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            llm = llama_cpp.Llama(model_path=str(pre_less), vocab_only=True, verbose=True)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        warning = [line for line in log.read().decode("utf-8", "replace").splitlines()
                   if "missing pre-tokenizer type" in line]
    if not warning:
        raise SystemExit("llama.cpp did not warn about the missing pre-tokenizer: is the key still there?")
    cases = []
    for text in CORPUS + DEFAULT_PRE_EXTRA:
        case = {"text": text}
        for special in (True, False):
            case["special" if special else "plain"] = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        cases.append(case)
    out = {
        "reference": "llama.cpp via llama-cpp-python",
        "llama_cpp_python_version": llama_cpp.__version__,
        "model": os.path.basename(model),
        "model_sha256_head": _sha256_head(model),
        "variant": "metadata-only copy of the model without the tokenizer.ggml.pre key "
                   "(tools/record_tokenizer_goldens.py write_without_pre)",
        "llama_cpp_warning": warning[0].strip(),
        "call": "Llama(vocab_only=True).tokenize(text.encode(), add_bos=False, special=True|False)",
        "cases": cases,
    }
    _write(out, out_path, [])


def record(model: str, out_path: str) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
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
        "model": os.path.basename(model),
        "model_sha256_head": _sha256_head(model),
        "call": "Llama(vocab_only=True).tokenize(text.encode(), add_bos=False, special=True|False)",
        "n_vocab": n_vocab,
        "eog_ids": eog,
        "cases": cases,
    }
    _write(out, out_path, ["eog_ids"])


def _write(out: dict, out_path: str, compact: list[str]) -> None:
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    # one case per line: small, and diffs stay readable when goldens are re-recorded
    head = {k: v for k, v in out.items() if k not in ["cases", *compact]}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    lines += [f" {json.dumps(k)}: {json.dumps(out[k])}," for k in compact]
    lines.append(' "cases": [')
    lines.append(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in out["cases"]))
    lines.append(" ]")
    lines.append("}")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(out['cases'])} cases to {out_path}")


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
