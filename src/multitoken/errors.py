"""The project's one error type for input a user can fix.

Library code raises :class:`MultitokenError` (or a subclass) for bad input, bad files and
bad settings; the CLI prints its first line as ``error: ...`` and exits 2. Anything else
(TypeError, KeyError, an assertion) is a bug and keeps its traceback. It subclasses
ValueError so callers that catch ValueError keep working.
"""
from __future__ import annotations


class MultitokenError(ValueError):
    """Bad input, a bad or foreign file, or settings that cannot work; the message says which."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
