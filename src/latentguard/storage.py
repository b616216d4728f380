"""A full disk or a folder that cannot be written ends a run with one line, not a traceback.

Every file is written atomically (``runs.py``), so what such an error leaves behind is the old file or no
file, never a torn one; once space is freed (or the folder made writable) ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from latentguard.errors import UserError
from latentguard.signals import resume_command

# errno values a user fixes on their side: no space, no quota, a read-only mount, no permission
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class StorageError(UserError):
    """A run folder cannot be written: the disk is full, the folder read-only or not ours."""


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a storage problem (also one that safetensors reports only in its message), else None."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return exc.errno
    if isinstance(exc, SafetensorError):
        text = str(exc)
        found = re.search(r"os error (\d+)", text)
        if found and int(found.group(1)) in STORAGE_ERRNOS:
            return int(found.group(1))
        for code in STORAGE_ERRNOS:
            if os.strerror(code) in text:
                return code
    return None


def describe(exc: BaseException, folder: Path | None) -> str:
    """``FOLDER: cannot write (No space left on device)``: the folder the failed file was going to."""
    code = storage_errno(exc)
    cause = os.strerror(code) if code is not None else str(exc)
    filename = getattr(exc, "filename", None)
    where = Path(filename).parent if filename else folder
    return f"{where}: cannot write ({cause})"


@contextlib.contextmanager
def storage_errors(run_dir: Callable[[], Path | None], verb: str = "run") -> Iterator[None]:
    """Within the block a storage problem becomes a ``StorageError`` naming the folder and the cause, and
    how to continue: ``--resume`` once the folder holds a run, else another ``--out``."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        if storage_errno(exc) is None:
            raise
        folder = run_dir()
        if folder is not None and (folder / "config.yaml").is_file():
            hint = f"free space (or make the folder writable), then: {resume_command(folder, verb)}"
        else:
            hint = "free space, make the folder writable or choose another --out"
        raise StorageError(f"{describe(exc, folder)}; {hint}") from exc
