"""Turn a run's ``results.json`` into a report for people: Markdown tables and PNG plots.

The report keeps what a defense *trained against* apart from the attacks it is *tested on*, so that a
robustness number is never read as "held out" when the defense saw that threat class in training. This
package only reads the results; it never changes them and never recomputes a metric. One job per module:
``stats`` (spreads over seeds, access to metrics), ``plots`` (PNG), ``tables`` (Markdown).
"""

from __future__ import annotations

from pathlib import Path

from latentguard.report.plots import _per_attack_plots, plot_by_layer, plot_pareto
from latentguard.report.stats import (
    BY_LAYER_FILE,
    PARETO_ROBUST_FILE,
    PARETO_TROJAN_FILE,
    PER_ATTACK_PREFIX,
    REPORT_FILE,
    summarize,
)
from latentguard.report.tables import render_markdown
from latentguard.results import Results, load_results, validate_results
from latentguard.runs import atomic_write_text

__all__ = [
    "BY_LAYER_FILE",
    "PARETO_ROBUST_FILE",
    "PARETO_TROJAN_FILE",
    "PER_ATTACK_PREFIX",
    "REPORT_FILE",
    "plot_by_layer",
    "plot_pareto",
    "render_markdown",
    "render_run",
    "summarize",
    "write_report",
]


def write_report(results: Results | dict, out_dir: Path) -> list[Path]:
    """Write ``report.md`` and the plots that apply into ``out_dir``; return the paths, report first.
    A dict is first validated against the results schema."""
    typed = results if isinstance(results, Results) else validate_results(results, "results")
    results = typed.model_dump(mode="json")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        p
        for p in (
            plot_pareto(results, out_dir / PARETO_ROBUST_FILE, "heldout"),
            plot_pareto(results, out_dir / PARETO_TROJAN_FILE, "trojan"),
            plot_by_layer(results, out_dir / BY_LAYER_FILE),
            *(
                plot_pareto(results, out_dir / name, metric=key)
                for key, name in _per_attack_plots(results).items()
            ),
        )
        if p is not None
    ]
    report = out_dir / REPORT_FILE
    atomic_write_text(report, render_markdown(results, plots))
    return [report, *plots]


def render_run(run_dir: Path) -> list[Path]:
    """Re-render the report of a finished run from its ``results.json``; bad input is a ``UserError``."""
    results = load_results(Path(run_dir) / "results.json")
    return write_report(results, Path(run_dir))
