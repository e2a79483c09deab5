"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class QcpuError(Exception):
    """A problem with the user's input (file, arguments, prompt) that has a one-line explanation."""
