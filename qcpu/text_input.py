"""Every piece of user text enters through here: files, standard input and command-line arguments.

Text that is not valid UTF-8 is not an error: as llama.cpp does (`unicode_cpts_from_utf8` decodes an
invalid sequence to U+FFFD and goes on), each invalid sequence becomes U+FFFD, and one warning line on
stderr names where it came from and how many sequences were replaced. Python's "replace" handler follows
the Unicode standard's "maximal subpart" practice, so `b"ok\\xffok"` gives `"ok\\ufffdok"`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qcpu.errors import QcpuError, warn

REPLACEMENT = "\ufffd"


def decode_utf8(data: bytes, source: str) -> str:
    """bytes -> str, each invalid UTF-8 sequence replaced by U+FFFD; warns once (naming `source`) if any were."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    # Every U+FFFD in the result that was not already in the input (as EF BF BD) is a replacement.
    bad = text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8"))
    warn(f"{source}: {bad} invalid UTF-8 sequence{'s' if bad != 1 else ''} replaced by U+FFFD")
    return text


def read_text_file(path: str | Path) -> str:
    """The whole file as text (invalid UTF-8 replaced, with a warning).

    Raises QcpuError (one line) when the path is missing, a directory, or unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise QcpuError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QcpuError(f"{path}: is a directory, not a text file") from None
    except OSError as e:
        raise QcpuError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_utf8(data, str(path))


def clean_arg(text: str | None, source: str) -> str | None:
    """A command-line argument as valid text.

    Python hands undecodable argv bytes over as lone surrogates (PEP 383 'surrogateescape'); they would
    crash the tokenizer later. Restore the bytes and decode them as a file would be."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return decode_utf8(text.encode("utf-8", "surrogateescape"), source)


class StdinLines:
    """Lines of standard input read as bytes, so invalid UTF-8 never raises (each bad line warns)."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdin

    def readline(self) -> str:
        buffer = getattr(self.stream, "buffer", None)
        if buffer is None:  # already text (a test's StringIO)
            return clean_arg(self.stream.readline(), "standard input") or ""
        return decode_utf8(buffer.readline(), "standard input")
