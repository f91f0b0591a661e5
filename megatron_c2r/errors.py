"""The project's error for bad user input, and the rule every subcommand reports errors by.

``ConfigError`` is a ``ValueError`` whose message is ONE line naming the input (the YAML path, the
``--set`` or the command-line flag), its value and the fix. The ``megatron-c2r`` command prints
it, like any ``ValueError`` or missing/unwritable-path error (``USER_ERRORS``), as
``megatron-c2r <command>: error: <message>`` and exits with status 2. Imports nothing.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad run config or argument; the message is one line naming the input, the value and the fix."""


# What a subcommand may raise for bad input: printed as one line, exit status 2, no traceback.
# OSError's other subclasses (ConnectionError, BrokenPipeError, ...) are not user input and keep
# their traceback.
USER_ERRORS = (
    ValueError,  # ConfigError and every validation error in the package
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: an OSError from the OS as ``PATH: reason``, any message's line breaks
    folded into ``; `` (a message is meant to be one line already; this guards the rule)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
