"""Write a directory atomically: build it in a temporary sibling, rename it into place when complete.

An interrupted run (exception, Ctrl-C, even `kill -9`) never leaves anything at the destination. A `kill -9` can
leave the temporary sibling behind; its name says what it is (`.NAME.partial-PID-XXXX`) and the next run that writes
to the same destination removes stale ones (those whose process is gone). With `force`, an existing destination is
replaced only after the new directory is complete (moved aside, new one renamed in, old one deleted).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Iterator

PARTIAL = ".partial-"  # temporary build directory: .NAME.partial-PID-TOKEN
REPLACED = ".replaced-"  # an old destination being replaced: .NAME.replaced-PID-TOKEN


class DestinationExistsError(FileExistsError):
    """The output directory exists and overwriting was not asked for."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_siblings(dst: str) -> list[str]:
    """Leftover temporary directories of `dst` whose writing process no longer exists."""
    parent, name = os.path.split(os.path.abspath(dst))
    out = []
    if not os.path.isdir(parent):
        return out
    for entry in os.listdir(parent):
        for marker in (PARTIAL, REPLACED):
            prefix = f".{name}{marker}"
            if entry.startswith(prefix):
                pid = entry[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    out.append(os.path.join(parent, entry))
    return sorted(out)


def check_destination(dst: str, force: bool) -> None:
    """Fail early (before any work) when `dst` exists and `force` is off."""
    if os.path.lexists(dst) and not force:
        raise DestinationExistsError(f"{dst} already exists; pass --force (force=True) to replace it")


def _remove(path: str) -> None:
    """Delete a replaced destination, a directory or a file (or a symlink)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, force: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory next to `dst`; on normal exit rename it to `dst`, on any error delete it.

    Example:
        with staged_directory("out/model") as tmp:
            write_everything_into(tmp)
    """
    dst = os.path.abspath(os.fspath(dst))
    check_destination(dst, force)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    for stale in stale_siblings(dst):
        _remove(stale)
    tmp = os.path.join(parent, f".{name}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.lexists(dst):
            check_destination(dst, force)  # someone else created it meanwhile
            old = os.path.join(parent, f".{name}{REPLACED}{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            _remove(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
