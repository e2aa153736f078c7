"""The one error type whylook raises for bad input.

Every message is a single line that says what went wrong and what to do about it. The CLI
prints it as ``error: <message>`` and exits with status 2; library callers catch
:class:`WhylookError` (a :class:`ValueError`).
"""

from __future__ import annotations


class WhylookError(ValueError):
    """Bad input or state, with a one-line message that says what to do."""

    def __init__(self, message: str) -> None:
        # A multi-line message would break the "one line on stderr" contract of the CLI.
        super().__init__(" ".join(str(message).split()))


def option(flag: str) -> str:
    """An option named for both kinds of reader: ``option("analysis-size")`` is
    ``"--analysis-size (analysis_size)"``, the command line's flag and the Python argument.

    >>> option("k")
    '--k (k)'
    """
    return f"--{flag} ({flag.replace('-', '_')})"
