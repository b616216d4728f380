"""Turn a run's ``results.json`` into a report for people: Markdown tables and PNG plots.

The report keeps what a defense *trained against* apart from the attacks it is *tested on*, so that a
robustness number is never read as "held out" when the defense saw that threat class in training. This
module only reads the results dict; it never changes it and never recomputes a metric.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentguard.errors import UserError
from latentguard.runs import atomic_write_bytes, atomic_write_text

REPORT_FILE = "report.md"
PARETO_ROBUST_FILE = "pareto_clean_vs_robust.png"
PARETO_TROJAN_FILE = "pareto_clean_vs_trojan.png"
BY_LAYER_FILE = "metric_by_layer.png"

# Column order of the main table; groups not listed here follow, in order of appearance.
GROUP_ORDER = ("clean", "trojan", "heldout", "latent", "seen")
GROUP_TITLES = {
    "clean": "Clean",
    "trojan": "Trojan ASR",
    "heldout": "Held-out",
    "latent": "Held-out latent",
    "seen": "Seen in training",
}
LAYER_KINDS = ("lat", "rlat")

_KIND_STYLE: dict[str, tuple[str, str]] = {
    "none": ("tab:gray", "X"),
    "clean": ("black", "o"),
    "at": ("tab:blue", "s"),
    "lat": ("tab:orange", "^"),
    "rlat": ("tab:green", "v"),
    "tlat": ("tab:red", "D"),
}
_OTHER_STYLE = ("tab:purple", "P")
_METRIC_COLOURS = {"clean": "tab:blue", "heldout": "tab:green", "trojan": "tab:red"}
_KIND_LINESTYLE = {"lat": "-", "rlat": "--"}
_DPI = 110


# --------------------------------------------------------------------------------------------- statistics


def _number(value: Any) -> float | None:
    """A finite metric value as float, or ``None`` for anything absent (missing, null, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0.0 for a single value) and count."""
    n = len(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": n}


def summarize(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per defense, per metric key: ``{"mean", "std", "n"}`` over the records (seeds) that have the metric.

    Missing, ``None`` and non-finite values are treated as absent, so ``n`` can differ between metrics;
    a metric no record of a defense has is left out of that defense's entry.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for record in records:
        per_metric = values.setdefault(str(record.get("defense")), {})
        for key, raw in (record.get("metrics") or {}).items():
            number = _number(raw)
            if number is not None:
                per_metric.setdefault(key, []).append(number)
    return {
        defense: {key: _stats(vals) for key, vals in metrics.items()} for defense, metrics in values.items()
    }


# ------------------------------------------------------------------------------------------ results access


@dataclass(frozen=True)
class _Metric:
    """One column of the results table, as declared in ``results["metrics"]``."""

    key: str
    label: str
    group: str
    higher_is_better: bool | None

    @property
    def arrow(self) -> str:
        return _arrow(self.higher_is_better)


def _arrow(higher_is_better: bool | None) -> str:
    if higher_is_better is None:
        return ""
    return " ↑" if higher_is_better else " ↓"


def _records(results: dict) -> list[dict]:
    return [r for r in results.get("records") or [] if isinstance(r, dict)]


def _metrics(results: dict) -> list[_Metric]:
    """Declared metrics in group order, then any metric key found only in records (group ``other``)."""
    declared: list[_Metric] = []
    for m in results.get("metrics") or []:
        if not isinstance(m, dict) or not m.get("key"):
            continue
        hib = m.get("higher_is_better")
        declared.append(
            _Metric(
                key=str(m["key"]),
                label=str(m.get("label") or m["key"]),
                group=str(m.get("group") or "other"),
                higher_is_better=hib if isinstance(hib, bool) else None,
            )
        )
    known = {m.key for m in declared}
    for record in _records(results):
        for key in record.get("metrics") or {}:
            if key not in known:
                known.add(key)
                declared.append(_Metric(key=key, label=key, group="other", higher_is_better=None))
    groups = list(GROUP_ORDER) + [g for g in dict.fromkeys(m.group for m in declared) if g not in GROUP_ORDER]
    return sorted(declared, key=lambda m: groups.index(m.group))  # stable: keeps order within a group


def _group_keys(results: dict, group: str) -> list[str]:
    return [m.key for m in _metrics(results) if m.group == group]


def _clean_metric(results: dict) -> _Metric | None:
    """The x-axis metric: ``clean_accuracy`` when declared, else the first clean-group metric."""
    clean = [m for m in _metrics(results) if m.group == "clean"]
    for m in clean:
        if m.key == "clean_accuracy":
            return m
    return clean[0] if clean else None


def _defenses(results: dict) -> list[str]:
    """Defenses that have records, in ``defense_order`` first, then in order of appearance."""
    present = list(dict.fromkeys(str(r.get("defense")) for r in _records(results)))
    ordered = [d for d in results.get("defense_order") or [] if d in present]
    return ordered + [d for d in present if d not in ordered]


def _kinds(results: dict) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for record in _records(results):
        kinds.setdefault(str(record.get("defense")), str(record.get("kind") or "?"))
    return kinds


def _group_mean(record: dict, keys: Sequence[str]) -> float | None:
    """Mean over the keys this record has a value for; ``None`` when it has none of them."""
    metrics = record.get("metrics") or {}
    vals = [v for v in (_number(metrics.get(k)) for k in keys) if v is not None]
    return statistics.fmean(vals) if vals else None


def _seen_by(results: dict) -> dict[str, list[str]]:
    """Held-out threat name -> defenses that trained on that threat class."""
    return {str(t.get("name")): list(t.get("seen_by") or []) for t in results.get("heldout_threats") or []}


# ------------------------------------------------------------------------------------------------- plots


@dataclass
class _Point:
    defense: str
    kind: str
    x: float
    x_std: float
    y: float
    y_std: float


def _pareto_points(results: dict, y_group: str) -> list[_Point]:
    """Per defense: clean metric vs the per-seed mean of ``y_group``'s metrics, each mean ± std over seeds."""
    clean = _clean_metric(results)
    y_keys = _group_keys(results, y_group)
    if clean is None or not y_keys:
        return []
    kinds = _kinds(results)
    points = []
    for defense in _defenses(results):
        recs = [r for r in _records(results) if str(r.get("defense")) == defense]
        xs = [x for x in (_number((r.get("metrics") or {}).get(clean.key)) for r in recs) if x is not None]
        ys = [y for y in (_group_mean(r, y_keys) for r in recs) if y is not None]
        if xs and ys:
            sx, sy = _stats(xs), _stats(ys)
            points.append(_Point(defense, kinds[defense], sx["mean"], sx["std"], sy["mean"], sy["std"]))
    return points


def _pareto_front(points: Sequence[_Point], y_higher_is_better: bool) -> list[_Point]:
    """Points no other point beats on both axes (higher clean metric; y in its better direction)."""
    sign = 1.0 if y_higher_is_better else -1.0

    def dominated(p: _Point) -> bool:
        return any(
            q.x >= p.x and sign * q.y >= sign * p.y and (q.x > p.x or sign * q.y > sign * p.y) for q in points
        )

    return sorted((p for p in points if not dominated(p)), key=lambda p: p.x)


def _new_figure(width: float = 7.0, height: float = 5.0) -> Any:
    """A figure on the Agg canvas, without touching pyplot's global state (safe in threads and headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _kind_legend(ax: Any, kinds: Iterable[str], extra: Sequence[Any] = ()) -> None:
    """A legend with one marker per defense kind present, then any ``extra`` handles."""
    from matplotlib.lines import Line2D

    handles = []
    for kind in dict.fromkeys(kinds):
        colour, marker = _KIND_STYLE.get(kind, _OTHER_STYLE)
        handles.append(Line2D([], [], color=colour, marker=marker, linestyle="none", label=kind))
    ax.legend(handles=[*handles, *extra], title="kind", fontsize=8, title_fontsize=8, loc="best")


def _direction(results: dict, group: str) -> bool | None:
    """Whether higher is better for every metric of ``group`` (True/False), or ``None`` when mixed/unknown."""
    directions = {m.higher_is_better for m in _metrics(results) if m.group == group}
    return directions.pop() if len(directions) == 1 else None


def plot_pareto(results: dict, path: Path, y_group: str = "heldout") -> Path | None:
    """Scatter clean metric (x) against the mean of ``y_group``'s metrics (y) per defense; ``None`` if empty.

    Each point is the mean over seeds with ±1 sample-std error bars; points are labelled by defense name,
    styled by kind, and the non-dominated ones are joined as the Pareto front.
    """
    points = _pareto_points(results, y_group)
    if not points:
        return None
    from matplotlib.lines import Line2D

    clean = _clean_metric(results)
    assert clean is not None  # _pareto_points returns [] otherwise
    higher = _direction(results, y_group)
    fig = _new_figure()
    ax = fig.add_subplot()
    stacked: dict[tuple[float, float], int] = {}
    for p in points:
        colour, marker = _KIND_STYLE.get(p.kind, _OTHER_STYLE)
        ax.errorbar(
            p.x,
            p.y,
            xerr=p.x_std,
            yerr=p.y_std,
            fmt=marker,
            color=colour,
            markersize=8,
            capsize=3,
            elinewidth=1,
        )
        # Stack the labels of points that sit on top of each other instead of printing them over each other.
        spot = (round(p.x, 3), round(p.y, 3))
        stacked[spot] = stacked.get(spot, -1) + 1
        offset = (6, 6 + 10 * stacked[spot])
        ax.annotate(p.defense, (p.x, p.y), textcoords="offset points", xytext=offset, fontsize=8)
    extra = []
    if len(points) > 1 and higher is not None:
        front = _pareto_front(points, higher)
        ax.plot([p.x for p in front], [p.y for p in front], linestyle=":", color="0.4", zorder=0)
        extra.append(Line2D([], [], linestyle=":", color="0.4", label="Pareto front"))
    _kind_legend(ax, (p.kind for p in points), extra)
    if y_group == "trojan":
        y_label = "mean trojan ASR (lower is better ↓)"
    else:
        title = GROUP_TITLES.get(y_group, y_group).lower()
        what = "robust accuracy" if y_group in ("heldout", "seen") else "metric"
        better = "" if higher is None else f" ({'higher' if higher else 'lower'} is better{_arrow(higher)})"
        y_label = f"mean {title} {what}{better}"
    ax.set_xlabel(f"{clean.label}{clean.arrow}")
    ax.set_ylabel(y_label)
    ax.set_title(
        f"{results.get('name', 'run')}: clean vs {GROUP_TITLES.get(y_group, y_group)}"
        " (mean ± std over seeds)",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    return _save_png(fig, path)


@dataclass
class _Series:
    """One line of the by-layer plot: per layer, (mean, std) of a metric over its records."""

    label: str
    group: str
    kind: str
    points: dict[str, tuple[float, float]] = field(default_factory=dict)
    epsilon_rank: int | None = None  # set for per-epsilon lines of the main metric


def _layer_series(results: dict) -> tuple[list[str], list[_Series]] | None:
    """Layers (x axis) and the lines of the by-layer plot, or ``None`` when fewer than 2 layers are covered.

    Uses single-site ``lat``/``rlat`` records. Lines: clean metric, mean held-out robustness and mean trojan
    ASR per kind. When one layer holds several epsilons, the main metric (held-out, else trojan, else clean)
    gets one line per epsilon and the other metrics are pooled over epsilons, to keep the plot readable.
    """
    recs = [
        r
        for r in _records(results)
        if r.get("kind") in LAYER_KINDS and isinstance(r.get("sites"), list) and len(r["sites"]) == 1
    ]
    found = list(dict.fromkeys(str(r["sites"][0]) for r in recs))
    if len(found) < 2:
        return None
    order = [str(x) for x in results.get("layer_order") or []]
    layers = [x for x in order if x in found] + [x for x in found if x not in order]

    def site(r: dict) -> str:
        return str(r["sites"][0])

    def eps(r: dict) -> float | None:
        return _number(r.get("epsilon"))

    clean = _clean_metric(results)
    keys = {
        "clean": [clean.key] if clean else [],
        "heldout": _group_keys(results, "heldout"),
        "trojan": _group_keys(results, "trojan"),
    }
    names = {
        "clean": clean.label if clean else "clean",
        "heldout": "mean held-out robustness",
        "trojan": "mean trojan ASR",
    }
    available = [g for g in ("heldout", "trojan", "clean") if keys[g]]
    if not available:
        return None
    main = available[0]
    kinds = [k for k in LAYER_KINDS if any(r.get("kind") == k for r in recs)]
    multi_eps = {
        kind: any(
            len({eps(r) for r in recs if r.get("kind") == kind and site(r) == layer}) > 1 for layer in layers
        )
        for kind in kinds
    }
    epsilons = sorted({eps(r) for r in recs}, key=lambda e: (e is None, e or 0.0))

    def series(group: str, kind: str, label: str, only_eps: list[float | None]) -> _Series | None:
        out = _Series(label=label, group=group, kind=kind)
        for layer in layers:
            chosen = [r for r in recs if r.get("kind") == kind and site(r) == layer and eps(r) in only_eps]
            vals = [v for v in (_group_mean(r, keys[group]) for r in chosen) if v is not None]
            if vals:
                s = _stats(vals)
                out.points[layer] = (s["mean"], s["std"])
        return out if out.points else None

    lines: list[_Series] = []
    for kind in kinds:
        tag = f" ({kind})" if len(kinds) > 1 else ""
        for group in ("clean", "heldout", "trojan"):
            if not keys[group]:
                continue
            if multi_eps[kind] and group == main:
                for rank, e in enumerate(epsilons):
                    text = "ε=?" if e is None else f"ε={e:g}"
                    line = series(group, kind, f"{names[group]}, {text}{tag}", [e])
                    if line is not None:
                        line.epsilon_rank = rank
                        lines.append(line)
            else:
                pooled = " (pooled over ε)" if multi_eps[kind] else ""
                line = series(group, kind, f"{names[group]}{pooled}{tag}", epsilons)
                if line is not None:
                    lines.append(line)
    return (layers, lines) if lines else None


def plot_by_layer(results: dict, path: Path) -> Path | None:
    """Plot metrics against the perturbed layer for single-site LAT/RLAT runs; ``None`` if < 2 layers.

    x follows ``layer_order`` (unknown layers appended); each point is mean ± std over seeds.
    """
    prepared = _layer_series(results)
    if prepared is None:
        return None
    layers, lines = prepared
    import matplotlib as mpl

    n_eps = 1 + max((s.epsilon_rank or 0) for s in lines)
    shades = mpl.colormaps["viridis"]
    fig = _new_figure(max(9.0, 1.2 * len(layers) + 6.0), 5.0)
    ax = fig.add_subplot()
    markers = {"clean": "o", "heldout": "s", "trojan": "v"}
    for s in lines:
        xs = [layers.index(layer) for layer in s.points]
        means = [m for m, _ in s.points.values()]
        stds = [sd for _, sd in s.points.values()]
        if s.epsilon_rank is not None:
            colour = shades(0.15 + 0.7 * s.epsilon_rank / max(1, n_eps - 1))
        else:
            colour = _METRIC_COLOURS[s.group]
        style = _KIND_LINESTYLE.get(s.kind, "-")
        ax.errorbar(
            xs,
            means,
            yerr=stds,
            color=colour,
            marker=markers[s.group],
            linestyle=style,
            capsize=3,
            label=s.label,
        )
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("perturbed layer (input → output)")
    ax.set_ylabel("value (clean & robustness ↑, ASR ↓)")
    all_values = [m for s in lines for m, _ in s.points.values()]
    if all(0.0 <= v <= 1.0 for v in all_values):
        ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{results.get('name', 'run')}: metric by LAT layer (mean ± std over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    return _save_png(fig, path)


# ---------------------------------------------------------------------------------------------- markdown


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """A GitHub-flavoured Markdown table; ``align`` holds l/c/r per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = [{"r": "---:", "c": ":---:"}.get(a, ":---") for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fmt_stat(stat: dict[str, float], common_n: int, digits: int = 3) -> str:
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return text if stat["n"] == common_n else f"{text} (n={stat['n']})"


def _fmt_num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _fmt_seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _header(results: dict) -> list[str]:
    prov = results.get("provenance") or {}
    seeds = list(results.get("seeds") or [])
    versions = prov.get("versions") or {}
    lines = [
        f"# LAT report: {results.get('name', 'unnamed run')}",
        "",
        f"- **Task:** {results.get('task', '?')}",
        f"- **Seeds:** {', '.join(str(s) for s in seeds) or '–'} ({len(seeds)} in all)",
        f"- **Commit:** {prov.get('git_commit') or 'unknown (not a git checkout)'}",
    ]
    if results.get("created"):
        lines.append(f"- **Created:** {results['created']}")
    if prov.get("command"):
        lines.append(f"- **Command:** `{prov['command']}`")
    if versions:
        lines.append("- **Versions:** " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return [*lines, ""]


def _training_section(results: dict) -> list[str]:
    kinds = _kinds(results)
    trained: dict[str, list[str]] = {}
    for t in results.get("training_threats") or []:
        trained.setdefault(str(t.get("defense")), []).append(str(t.get("description") or "?"))
    defaults = {"none": "nothing: the base model, no defense", "clean": "nothing: clean fine-tuning only"}
    defenses = _defenses(results) + [d for d in trained if d not in _defenses(results)]
    rows = [
        (
            d,
            kinds.get(d, "?"),
            "; ".join(trained[d]) if d in trained else defaults.get(kinds.get(d, ""), "not recorded"),
        )
        for d in defenses
    ]
    return [
        "## Training threats",
        "",
        "What each defense's adversary perturbed during training. These are *not* evaluation attacks.",
        "",
        *_table(("Defense", "Kind", "Trained against"), rows, "lll"),
        "",
    ]


def _heldout_section(results: dict) -> list[str]:
    threats = results.get("heldout_threats") or []
    lines = [
        "## Held-out threats",
        "",
        "Attacks used only for evaluation. A threat marked *seen by* is held out for every defense except"
        " those listed, which trained on that threat class; their numbers on it are not a held-out test.",
        "",
    ]
    if not threats:
        return [*lines, "No held-out threats were evaluated.", ""]
    rows = []
    for t in threats:
        seen = list(t.get("seen_by") or [])
        rows.append(
            (
                t.get("name", "?"),
                t.get("description", ""),
                f"**seen by: {', '.join(seen)}**" if seen else "held out for all defenses",
            )
        )
    return [*lines, *_table(("Threat", "Description", "Status"), rows, "lll"), ""]


def _trojan_section(results: dict) -> list[str]:
    trojans = results.get("trojans") or []
    lines = ["## Trojans", ""]
    if not trojans:
        return [*lines, "No trojans were implanted in this run.", ""]
    rows = [(t.get("name", "?"), t.get("description", "")) for t in trojans]
    return [
        *lines,
        "Implanted by poisoning the base model's training data; ASR is measured on triggered inputs whose"
        " true label differs from the target (lower is better).",
        "",
        *_table(("Trojan", "Description"), rows, "ll"),
        "",
    ]


def _results_section(results: dict, summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    metrics = _metrics(results)
    defenses = _defenses(results)
    lines = ["## Results", ""]
    if not metrics or not defenses:
        return [*lines, "No metric values were recorded.", ""]
    counts = [s["n"] for d in defenses for s in summary.get(d, {}).values()]
    common_n = max(set(counts), key=lambda n: (counts.count(n), n)) if counts else 0  # most frequent n
    seen = _seen_by(results)
    groups = list(dict.fromkeys(m.group for m in metrics))
    lines += [
        f"Mean ± sample standard deviation over seeds (n = {common_n} per cell unless a cell says otherwise);"
        " – means not measured. ↑ higher is better, ↓ lower is better.",
        "",
        "Columns, in order: "
        + "; ".join(
            f"**{GROUP_TITLES.get(g, g)}**: " + ", ".join(m.label for m in metrics if m.group == g)
            for g in groups
        )
        + ".",
        "",
    ]
    rows = []
    marked = False
    for d in defenses:
        row = [d]
        for m in metrics:
            stat = summary.get(d, {}).get(m.key)
            text = "–" if stat is None else _fmt_stat(stat, common_n)
            if stat is not None and d in seen.get(m.key.rsplit("/", 1)[-1], []):
                text += " †"
                marked = True
            row.append(text)
        rows.append(row)
    lines += _table(["Defense", *(f"{m.label}{m.arrow}" for m in metrics)], rows)
    if marked:
        lines += ["", "† this defense trained on this threat class: the number is not a held-out result."]
    return [*lines, ""]


def _sanity_section(results: dict) -> list[str]:
    records = _records(results)
    checks = list(dict.fromkeys(k for r in records for k in (r.get("sanity") or {})))
    lines = ["## Sanity checks", ""]
    if not checks:
        return [*lines, "No sanity checks were recorded.", ""]
    rows, failed = [], []
    for d in _defenses(results):
        row: list[str] = [d]
        for check in checks:
            vals = [(r.get("sanity") or {}).get(check) for r in records if str(r.get("defense")) == d]
            n_false = sum(v is False for v in vals)
            if n_false:
                row.append(f"✗ ({n_false}/{len(vals)} seeds)")
                failed.append(f"{d}: {check}")
            elif any(v is True for v in vals):
                row.append("✓")
            else:
                row.append("–")
        rows.append(row)
    lines += [
        "✓ passed in every seed that ran it, ✗ failed in at least one seed, – not applicable or not run.",
        "",
        *_table(["Defense", *checks], rows, "l" + "c" * len(checks)),
        "",
    ]
    if failed:
        lines += [f"**Warning:** failed sanity checks ({'; '.join(failed)}): read those numbers with care."]
        lines.append("")
    return lines


def _calibration_section(results: dict) -> list[str]:
    lines = ["## Calibration", ""]
    per: dict[tuple[str, str], dict[str, list[float]]] = {}
    eps_rel: dict[tuple[str, str], list[float]] = {}
    for r in _records(results):
        for site, cal in (r.get("calibration") or {}).items():
            key = (str(r.get("defense")), str(site))
            slot = per.setdefault(key, {"mean_norm": [], "epsilon_abs": []})
            for name in slot:
                number = _number((cal or {}).get(name))
                if number is not None:
                    slot[name].append(number)
            rel = _number(r.get("epsilon"))
            if rel is not None:
                eps_rel.setdefault(key, []).append(rel)
    if not per:
        return [*lines, "No latent calibration was recorded (no defense used a relative latent budget).", ""]
    order = {d: i for i, d in enumerate(_defenses(results))}
    rows = []
    for (d, site), slot in sorted(per.items(), key=lambda kv: order.get(kv[0][0], len(order))):
        cells = []
        for name in ("mean_norm", "epsilon_abs"):
            vals = slot[name]
            if not vals:
                cells.append("–")
            elif len(vals) == 1:
                cells.append(_fmt_num(vals[0]))
            else:
                cells.append(f"{_fmt_num(statistics.fmean(vals))} ({', '.join(_fmt_num(v) for v in vals)})")
        rel = eps_rel.get((d, site))
        rows.append((d, site, _fmt_num(statistics.fmean(rel)) if rel else "–", *cells))
    return [
        *lines,
        "Budgets resolved on a calibration batch. With several seeds: the mean, then each seed's value.",
        "",
        *_table(("Defense", "Site", "ε (config)", "Mean activation norm", "ε (absolute)"), rows, "llrrr"),
        "",
    ]


def _timing_section(results: dict) -> list[str]:
    lines = ["## Timings", ""]
    phases = results.get("phase_seconds") or {}
    if phases:
        lines += [
            *_table(("Phase", "Seconds"), ((k, _fmt_seconds(_number(v))) for k, v in phases.items())),
            "",
        ]
    records = _records(results)
    keys = list(dict.fromkeys(k for r in records for k in (r.get("seconds") or {})))
    if keys:
        rows = []
        for d in _defenses(results):
            row = [d]
            for k in keys:
                vals = [
                    v
                    for r in records
                    if str(r.get("defense")) == d
                    for v in [_number((r.get("seconds") or {}).get(k))]
                    if v is not None
                ]
                row.append(_fmt_seconds(statistics.fmean(vals) if vals else None))
            rows.append(row)
        lines += ["Per defense, mean seconds per seed:", "", *_table(["Defense", *keys], rows), ""]
    if not phases and not keys:
        lines += ["No timings were recorded.", ""]
    return lines


def _plot_section(plots: Sequence[str]) -> list[str]:
    titles = {
        PARETO_ROBUST_FILE: "Clean accuracy vs held-out robustness",
        PARETO_TROJAN_FILE: "Clean accuracy vs trojan ASR",
        BY_LAYER_FILE: "Metric by LAT layer",
    }
    lines = ["## Plots", ""]
    if not plots:
        return [*lines, "No plots: not enough data.", ""]
    for name in plots:
        title = titles.get(name, name)
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return lines


def _default_plots(results: dict) -> list[str]:
    """The plot files ``write_report`` would write for these results."""
    plots = []
    if _pareto_points(results, "heldout"):
        plots.append(PARETO_ROBUST_FILE)
    if _pareto_points(results, "trojan"):
        plots.append(PARETO_TROJAN_FILE)
    if _layer_series(results) is not None:
        plots.append(BY_LAYER_FILE)
    return plots


def render_markdown(results: dict, plots: Sequence[str | Path] | None = None) -> str:
    """The human-readable report as GitHub-flavoured Markdown.

    ``plots`` are the image files to link (relative to the report); ``None`` links the plots that
    ``write_report`` would write for these results.
    """
    names = _default_plots(results) if plots is None else [Path(p).name for p in plots]
    summary = summarize(_records(results))
    sections = [
        _header(results),
        _training_section(results),
        _heldout_section(results),
        _trojan_section(results),
        _results_section(results, summary),
        _sanity_section(results),
        _calibration_section(results),
        _timing_section(results),
        _plot_section(names),
    ]
    return "\n".join(line for section in sections for line in section).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------------ output


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write ``report.md`` and the plots that apply into ``out_dir``; return the paths, report first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        p
        for p in (
            plot_pareto(results, out_dir / PARETO_ROBUST_FILE, "heldout"),
            plot_pareto(results, out_dir / PARETO_TROJAN_FILE, "trojan"),
            plot_by_layer(results, out_dir / BY_LAYER_FILE),
        )
        if p is not None
    ]
    report = out_dir / REPORT_FILE
    atomic_write_text(report, render_markdown(results, plots))
    return [report, *plots]


def render_run(run_dir: Path) -> list[Path]:
    """Re-render the report of a finished run from its ``results.json``; bad input is a ``UserError``."""
    path = Path(run_dir) / "results.json"
    expected = "expected the results.json that `latentguard run` writes"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserError(f"{path}: file not found ({expected})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({type(exc).__name__}); {expected}") from exc
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise UserError(f"{path}: not valid JSON ({where}); {expected}") from exc
    if not isinstance(results, dict) or not isinstance(results.get("records", []), list):
        raise UserError(f"{path}: not a results file (no JSON object with a 'records' list); {expected}")
    return write_report(results, Path(run_dir))
