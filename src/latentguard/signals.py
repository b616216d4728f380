"""Interrupted runs end with one line: where they stopped and the exact command that continues them.

SIGTERM (a scheduler's stop, ``kill``, a container shutting down) is handled like Ctrl-C: it raises
``Interrupted`` in the main thread, the run's atomic writes leave no torn file, and the CLI prints the line.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports it


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; knows its run folder, where it stopped and how to continue."""

    def __init__(
        self, signal_name: str = "SIGINT", run_dir: Path | None = None, stage: str = "", resume: str = ""
    ) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.run_dir = run_dir
        self.stage = stage
        self.resume = resume

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal_name, 130)

    def message(self) -> str:
        where = f" ({self.stage})" if self.stage else ""
        if self.resume:
            return f"latentguard: stopped by {self.signal_name}{where}; continue with: {self.resume}"
        if self.stage:
            return f"latentguard: stopped by {self.signal_name}{where}, before the run folder held a run"
        return f"latentguard: stopped by {self.signal_name}"


def resume_command(run_dir: Path, verb: str = "run") -> str:
    """The command that continues ``run_dir`` (``verb``: run, train or eval), quoted for a shell."""
    if verb == "eval":
        return f"latentguard eval {shlex.quote(str(run_dir))}"
    return f"latentguard {verb} --resume {shlex.quote(str(run_dir))}"


def _raise_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted("SIGTERM")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises ``Interrupted`` like Ctrl-C does (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interruptible(where: Callable[[], tuple[Path | None, str]], verb: str = "run") -> Iterator[None]:
    """Turns a KeyboardInterrupt or SIGTERM in the block into ``Interrupted`` naming the run folder and the
    stage that ``where()`` reports at that moment, and the command that continues the run (when the folder
    holds one)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        run_dir, stage = where()
        if run_dir is None or not (run_dir / "config.yaml").is_file():
            raise Interrupted(name, None, stage) from None
        raise Interrupted(name, run_dir, stage, resume_command(run_dir, verb)) from None
