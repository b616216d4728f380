"""The process's resident memory from ``/proc/self/status`` and a resettable peak mark (Linux).

Standard library only, so the paper-side driver (``peer/time_paper.py``, run in another environment) uses
it too.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path


def status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def timed_steps(step: Callable[[], object], repeats: int) -> tuple[list[float], bool, int | None]:
    """One untimed warm-up ``step()`` then ``repeats`` timed ones (garbage collector off while timing).

    The peak-RSS mark is reset first, so ``status_kib("VmHWM")`` afterwards covers the steps only. Returns
    the seconds per step, whether the reset worked, and the RSS in KiB before the steps.
    """
    gc.collect()
    reset = reset_peak_rss()
    rss_before = status_kib("VmRSS")
    step()  # warm-up: first-call allocations, optimizer state
    seconds: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return seconds, reset, rss_before
