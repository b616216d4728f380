"""Paired per-seed comparison of defense pairs of one finished run (e.g. free LAT against exact LAT).

    python benchmarks/paired_defenses.py RUN_DIR --pair free_lat@block2:eps=0.5 lat@block2:eps=0.5
    python benchmarks/paired_defenses.py RUN_DIR --prefix free_lat lat     # every free_lat@X against lat@X

For each pair (A, B) and each metric of the run's results.json: the mean of A and of B over seeds, the paired
per-seed difference A − B signed so that a positive value means A is better (higher accuracy, lower ASR),
mean ± sample std, and in how many seeds A is ahead; also the training seconds per seed of both. Both
defenses of a pair start from the same base model per seed, so the seed pairs them. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from latentguard.results import load_results


def _values(results: dict[str, Any], defense: str, group: str, name: str) -> dict[int, float]:
    return {
        r["seed"]: r["metrics"][group][name]
        for r in results["records"]
        if r["defense"] == defense and r["metrics"].get(group, {}).get(name) is not None
    }


def _seconds(results: dict[str, Any], defense: str) -> float:
    return statistics.mean(r["seconds"]["train"] for r in results["records"] if r["defense"] == defense)


def _stat(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:+.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:+.3f}"


def compare(results: dict[str, Any], mine: str, theirs: str) -> list[str]:
    lines = [
        f"### `{mine}` against `{theirs}`",
        "",
        f"Training seconds per seed: {_seconds(results, mine):.1f} against {_seconds(results, theirs):.1f}.",
        "",
        f"| metric | `{mine}` | `{theirs}` | difference (+ = `{mine}` better) | ahead |",
        "|---|--:|--:|--:|--:|",
    ]
    for metric in results["metrics"]:
        if metric.get("higher_is_better") is None or metric.get("implanted") is False:
            continue
        a = _values(results, mine, metric["group"], metric["name"])
        b = _values(results, theirs, metric["group"], metric["name"])
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        sign = 1.0 if metric["higher_is_better"] else -1.0
        diffs = [sign * (a[s] - b[s]) for s in seeds]
        lines.append(
            f"| {metric['label']} | {statistics.mean(a[s] for s in seeds):.3f} "
            f"| {statistics.mean(b[s] for s in seeds):.3f} | {_stat(diffs)} "
            f"| {sum(d > 0 for d in diffs)}/{len(diffs)} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--pair", nargs=2, action="append", default=[], metavar=("A", "B"), help="defense A against B"
    )
    parser.add_argument("--prefix", nargs=2, metavar=("P", "Q"), help="every defense P@X... against Q@X...")
    args = parser.parse_args()
    load_results(args.run_dir / "results.json")  # validated against the schema: one clear line if not
    results = json.loads((args.run_dir / "results.json").read_text(encoding="utf-8"))
    names = {r["defense"] for r in results["records"]}
    pairs = [tuple(pair) for pair in args.pair]
    if args.prefix:
        mine, theirs = args.prefix
        pairs += [(n, theirs + n[len(mine) :]) for n in sorted(names) if n.startswith(mine + "@")]
    missing = sorted({n for pair in pairs for n in pair} - names)
    if missing or not pairs:
        parser.error(f"no such defense in {args.run_dir}: {', '.join(missing) or 'no pairs given'}")
    print(f"# Paired comparison, {args.run_dir} ({len(results['seeds'])} seeds)\n")
    for mine, theirs in pairs:
        print("\n".join(compare(results, mine, theirs)))


if __name__ == "__main__":
    main()
