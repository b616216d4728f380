"""Wall time of a sweep on N local workers (one thread each) against one process, measured back to back.

    python benchmarks/sweep_workers.py configs/image_sweep.yaml --workers 2
    python benchmarks/sweep_workers.py configs/image_sweep.yaml --workers 2 --set seeds=[0]   # a shorter one

Runs ``latentguard sweep CONFIG --set threads=1`` once in one process and once with ``--workers N`` (each
worker one thread), one after the other on the same machine, checks that both give the same numbers, and
prints both wall times and their ratio (a JSON line last). Needs N cores free of other work for the whole
time, or the ratio measures the other work: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

COMPARED = ("seed", "defense", "metrics", "calibration", "sanity")


def sweep(config: Path, out: Path, extra: list[str]) -> float:
    """One sweep, timed end to end (start-up, every point, the report)."""
    command = [sys.executable, "-m", "latentguard", "sweep", str(config), "--out", str(out), "--no-progress"]
    start = time.perf_counter()
    subprocess.run([*command, *extra], check=True)
    return time.perf_counter() - start


def numbers(run_dir: Path) -> list[dict[str, Any]]:
    records = json.loads((run_dir / "results.json").read_text())["records"]
    return [{key: record[key] for key in COMPARED} for record in records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", type=Path, help="folder for the two runs (default: a temporary one)")
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="sweep-workers-"))
    sets = [flag for text in ["threads=1", *args.overrides] for flag in ("--set", text)]
    alone = sweep(args.config, root / "one-process", sets)
    print(f"one process, one thread: {alone:.1f} s", flush=True)
    spread = sweep(args.config, root / f"{args.workers}-workers", [*sets, "--workers", str(args.workers)])
    print(f"{args.workers} workers, one thread each: {spread:.1f} s", flush=True)
    same = numbers(root / "one-process") == numbers(root / f"{args.workers}-workers")
    print(f"speed-up {alone / spread:.2f}x; numbers {'identical' if same else 'DIFFERENT'}")
    result = {
        "config": str(args.config),
        "overrides": args.overrides,
        "workers": args.workers,
        "one_process_seconds": round(alone, 1),
        "workers_seconds": round(spread, 1),
        "speedup": round(alone / spread, 3),
        "identical_numbers": same,
        "runs": str(root),
    }
    print(json.dumps(result))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
