"""One error style for every `deepseek-vl-jax` command.

    error: <what went wrong, naming the file / line / flag, and what to do>

on stderr, no traceback, and one exit status per kind of failure:

    USER_ERROR (2)   bad flags, missing or malformed input files, a destination that exists, ... (the user can fix it)
    ENV_ERROR  (3)   the environment failed: disk full, read-only file system, permission denied, out of memory
    INTERRUPTED (130) Ctrl-C
    INTERNAL (1)     anything else (a bug): one line plus how to see the traceback

`--debug` (or DEEPSEEK_VL_JAX_DEBUG=1) re-raises, so the traceback is printed. Programs raise `UserError` (or one
of the library's own error types, all `ValueError`s) and the dispatcher in `cli.py` calls `report` once.
"""

from __future__ import annotations

import errno
import os
import sys

USER_ERROR, ENV_ERROR, INTERRUPTED, INTERNAL = 2, 3, 130, 1
DEBUG_ENV = "DEEPSEEK_VL_JAX_DEBUG"

# errno values that say the machine, not the user's input, is the problem
_ENV_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOMEM, errno.EIO,
               errno.EMFILE, errno.ENFILE}
_ENV_ADVICE = {errno.ENOSPC: "free some disk space or write elsewhere",
               errno.EDQUOT: "free some disk space or write elsewhere",
               errno.EROFS: "the file system is read-only; write elsewhere",
               errno.EACCES: "check the permissions or write elsewhere",
               errno.EPERM: "check the permissions or write elsewhere"}


class UserError(ValueError):
    """A mistake the user can fix (exit status 2). The message says what, where, and what to do."""


class EnvironmentFailure(Exception):
    """The environment failed (exit status 3): disk full, read-only, ..."""


def debug_enabled(argv: list[str] | None = None) -> bool:
    return bool(argv and "--debug" in argv) or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def _oserror_message(e: OSError) -> str:
    where = f" {e.filename!r}" if e.filename else ""
    what = e.strerror or str(e)
    advice = _ENV_ADVICE.get(e.errno)
    return f"{what}{':' if where else ''}{where}" + (f"; {advice}" if advice else "")


# How errors of the OS reach us through libraries that do not raise OSError (tensorstore, under Orbax)
_ENV_TEXT = {"No space left on device": errno.ENOSPC, "os_error_code='28'": errno.ENOSPC,
             "Read-only file system": errno.EROFS, "os_error_code='30'": errno.EROFS,
             "Disk quota exceeded": errno.EDQUOT}


def _wrapped_os_error(e: BaseException) -> str | None:
    text = str(e)
    for needle, code in _ENV_TEXT.items():
        if needle in text:
            short = text if len(text) <= 300 else text[:300] + " ..."
            return f"{os.strerror(code)} ({short}); {_ENV_ADVICE[code]}"
    return None


def classify(e: BaseException) -> tuple[int, str]:
    """(exit status, one-line message without the `error: ` prefix) for an exception raised by a command."""
    wrapped = None if isinstance(e, OSError) else _wrapped_os_error(e)
    if wrapped:
        return ENV_ERROR, wrapped
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED, "interrupted (Ctrl-C)"
    if isinstance(e, EnvironmentFailure):
        return ENV_ERROR, str(e)
    if isinstance(e, UserError):
        return USER_ERROR, str(e)
    if isinstance(e, MemoryError):
        return ENV_ERROR, "out of memory; use a smaller batch, --dtype bfloat16 or a machine with more memory"
    if isinstance(e, OSError):
        if e.errno in _ENV_ERRNOS:
            return ENV_ERROR, _oserror_message(e)
        user = isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError))
        message = _oserror_message(e) if e.filename else str(e)
        return (USER_ERROR if user else ENV_ERROR), message
    if isinstance(e, ValueError):  # every library error type (ConfigError, CheckpointError, ...) is a ValueError
        return USER_ERROR, str(e)
    return INTERNAL, (f"internal error: {type(e).__name__}: {e} (please report it; run again with --debug or "
                      f"{DEBUG_ENV}=1 for the traceback)")


def one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def report(e: BaseException, stream=None) -> int:
    """Print `error: ...` for `e` on stderr; return the exit status."""
    status, message = classify(e)
    print(f"error: {one_line(message)}", file=stream or sys.stderr)
    return status
