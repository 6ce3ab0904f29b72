"""Errors that the CLI turns into one clear line and an exit code (0 ok, 1 outside tolerance, 2 bad input)."""

from __future__ import annotations

__all__ = ["SymshrinkError", "BadInput", "NothingToCompress", "OutsideTolerance"]


class SymshrinkError(Exception):
    """An expected failure: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 2


class BadInput(SymshrinkError):
    """The model, data or arguments the user gave cannot be used (exit code 2)."""

    exit_code = 2


class NothingToCompress(BadInput):
    """No site of the model can be rewritten by the methods asked for (exit code 2, the reasons in the message)."""


class OutsideTolerance(SymshrinkError):
    """A verify or diff gate failed: the outputs differ by more than the user allowed (exit code 1)."""

    exit_code = 1
