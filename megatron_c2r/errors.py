"""The project's error for bad user input, and the rule every subcommand reports errors by.

``ConfigError`` is a ``ValueError`` whose message is ONE line naming the input (the YAML path, the
``--set`` or the command-line flag), its value and the fix. The ``megatron-c2r`` command prints
it, like any ``ValueError`` or missing/unwritable-path error (``USER_ERRORS``), as
``megatron-c2r <command>: error: <message>`` and exits with status 2. Also the one way a config
dataclass declares a field's lower bound (:func:`at_least`, checked by
:func:`check_lower_bounds`). Imports only the standard library.
"""

from __future__ import annotations

import dataclasses


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


def at_least(low, *, default=dataclasses.MISSING, note: str = ""):
    """A dataclass field that must be >= ``low``: declared with the field, checked by
    :func:`check_lower_bounds` in ``__post_init__``. A field whose default is None may stay None
    (unset), and its error says so; ``note`` is appended to the error."""
    note = " (or unset)" if default is None else note
    return dataclasses.field(default=default, metadata=dict(at_least=low, note=note))


def check_lower_bounds(obj, prefix: str = "") -> None:
    """Raise the one-line ``<prefix><field>=<value> must be >= <low><note>`` for the first field
    of dataclass ``obj`` (in declaration order) below the bound it declares with :func:`at_least`."""
    for f in dataclasses.fields(obj):
        value, low = getattr(obj, f.name), f.metadata.get("at_least")
        if low is not None and not (value is None and f.default is None) and value < low:
            raise ValueError(f"{prefix}{f.name}={value} must be >= {low}{f.metadata['note']}")
