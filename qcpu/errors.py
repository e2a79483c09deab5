"""The one exception type users see, and the one way to warn: both are a single line on stderr."""

import sys


class QcpuError(Exception):
    """A problem with the user's input (file, arguments, prompt) that has a one-line explanation."""


def one_line(message: object) -> str:
    """`message` folded onto one printable line: runs of white space become one space, and characters
    that cannot be written (lone surrogates from undecodable file names) are shown as escapes."""
    line = " ".join(str(message).split())
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def say(message: object) -> None:
    """Print `qcpu: MESSAGE` as one line on stderr: plain, not Rich, so no terminal width wraps it."""
    try:
        sys.stderr.write(f"qcpu: {one_line(message)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: saying so is not worth dying for
        pass


def warn(message: str) -> None:
    """Print `qcpu: warning: MESSAGE` as one line on stderr and go on (llama.cpp's LOG_WRN habit)."""
    say(f"warning: {message}")
