"""Before ``latentguard report`` rewrites a report: is there a finished run, and does its ``results.json``
hold what a report is made of? A results file without it is refused, so a full report is never replaced by
an empty one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latentguard.errors import UserError
from latentguard.signals import resume_command

# top-level keys a report reads without a default, and their types
REQUIRED: dict[str, type] = {"records": list, "metrics": list, "created": str}
RECORD_KEYS: dict[str, type] = {"defense": str, "metrics": dict}


def problems(results: Any) -> list[str]:
    """What a results mapping lacks for a report (empty when it is complete enough)."""
    if not isinstance(results, dict):
        return ["not a JSON object"]
    found = []
    for key, kind in REQUIRED.items():
        if not isinstance(results.get(key), kind):
            found.append(f"no {key!r} {kind.__name__}")
    records = results.get("records")
    if isinstance(records, list):
        if not records:
            found.append("no records (no defense was evaluated)")
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                found.append(f"records.{index} is not an object")
                continue
            found += [
                f"records.{index} has no {key!r}"
                for key, kind in RECORD_KEYS.items()
                if not isinstance(record.get(key), kind)
            ]
    if isinstance(results.get("metrics"), list) and not results["metrics"]:
        found.append("an empty 'metrics' table")
    return found


def check_results(run_dir: Path) -> None:
    """A ``UserError`` for an unfinished run or a results file that lacks what the report needs; a file that
    cannot be read or parsed is left to the report's own reader, which names it."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        if (run_dir / "config.yaml").is_file():
            raise UserError(
                f"{run_dir}: this run is unfinished (no results.json yet); finish it with: "
                f"{resume_command(run_dir)}"
            )
        return
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    found = problems(results)
    if found:
        fix = (
            f"; rebuild it from the saved evaluations with: {resume_command(run_dir)}"
            if (run_dir / "config.yaml").is_file()
            else ""
        )
        more = f" (and {len(found) - 2} more)" if len(found) > 2 else ""
        raise UserError(
            f"{path}: lacks what a report needs ({'; '.join(found[:2])}{more}); the report was left as it "
            f"is{fix}"
        )
