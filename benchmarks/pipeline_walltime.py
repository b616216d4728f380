"""Wall time of the default pipeline and its split by phase (implant, defenses, evaluation).

    python benchmarks/pipeline_walltime.py            # the embedded default (the README's figure)
    python benchmarks/pipeline_walltime.py --quick    # the --quick variant

Prints measured seconds; asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from latentguard.config import load_config
from latentguard.pipeline import run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="run folder (default: a temporary one)")
    args = parser.parse_args()
    config = load_config(args.config, ["progress=false"], quick=args.quick)
    out = args.out or Path(tempfile.mkdtemp(prefix="latentguard-bench-")) / "run"
    start = time.perf_counter()
    run_dir = run(config, out)
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    phases = results["phase_seconds"]
    print(f"config: {args.config or 'embedded default'}{' --quick' if args.quick else ''}")
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'phase':<22}{'seconds':>10}{'share':>8}")
    for name in ("base", "defenses", "eval"):
        print(f"{name:<22}{phases[name]:>10.1f}{phases[name] / wall:>8.1%}")
    print(f"{'wall (incl. data, report)':<22}{wall:>10.1f}")
    print("per defense (train s / eval s):")
    for record in results["records"]:
        seconds = record["seconds"]
        print(
            f"  seed {record['seed']} {record['defense']:<12}{seconds['train']:>8.1f}{seconds['eval']:>8.1f}"
        )
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    main()
