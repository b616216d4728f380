"""One process at a time per run folder: a second ``--resume`` says who holds the folder instead of
redoing the same work beside it.

The lock is an advisory ``flock`` on ``RUN_DIR/.lock``: the kernel releases it when its holder ends, however
it ends (a kill, a crash), so it can never go stale. The file keeps the holder's pid, host and start time for
the message; it is left in place (removing it would let two processes lock two different files).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from latentguard.errors import UserError

LOCK_FILE = ".lock"


class RunLocked(UserError):
    """Another process is working in this run folder."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        held = f"pid {info['pid']} on {info['host']} since {info['since']}"
        return held + (f" ({info['command']})" if info.get("command") else "")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str = "") -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration of the block; ``RunLocked`` when another process holds it.
    ``command`` (what this process is doing) is shown to the next process that finds the folder locked."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"{run_dir}: in use by {_holder(path)}; wait for it to end, or stop that process first"
            ) from None
        since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
