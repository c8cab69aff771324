"""Errors that mean the user's input is wrong (a flag, a config value, a path, a file), not the code.

The CLI prints these as one or two lines (`blip2-jax: error: ...`) and exits with code 2; every
other exception is a bug and keeps its traceback. Only code that checks user input raises them, so
a ValueError from deep inside JAX or a library is never mistaken for a bad flag. Each also derives
from the builtin a caller would catch (ValueError, FileNotFoundError, KeyError).
"""
from __future__ import annotations


class UserError(ValueError):
    """A value the user gave is wrong; the message names it, the value and what is expected."""


class InputNotFound(UserError, FileNotFoundError):
    """A path the user gave does not exist (or is not the kind of file expected)."""


class OutputExists(UserError, FileExistsError):
    """An output path the user gave exists and would be overwritten."""


class UnknownName(UserError, KeyError):
    """A preset or option name the user gave is not one we know."""

    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


class MissingKey(UserError, KeyError):
    """A record or file the user gave lacks a field that is needed."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
