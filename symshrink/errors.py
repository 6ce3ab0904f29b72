"""Errors that the CLI turns into one clear line and an exit code (0 ok, 1 outside tolerance, 2 bad input)."""

from __future__ import annotations

import errno

__all__ = ["SymshrinkError", "BadInput", "NothingToCompress", "OutsideTolerance", "WRITE_FAILURES", "write_failure"]


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


# the errors of a write that the disk, a quota or a limit refused: the user's to fix (exit 2), not a bug
WRITE_FAILURES = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is too large (file system or ulimit -f)",
                  errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the file system is read-only"}


def write_failure(err: BaseException, where: object) -> BadInput | None:
    """BadInput saying that writing `where` failed and why, for an OSError in WRITE_FAILURES; None for any other."""
    if not isinstance(err, OSError) or err.errno not in WRITE_FAILURES:
        return None
    return BadInput(f"cannot write {where}: {WRITE_FAILURES[err.errno]}; nothing was written")
