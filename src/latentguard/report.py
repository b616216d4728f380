"""Turn a run's ``results.json`` into a report for people: Markdown tables and PNG plots.

The report keeps what a defense *trained against* apart from the attacks it is *tested on*, so that a
robustness number is never read as "held out" when the defense saw that threat class in training. This
module only reads the results dict; it never changes it and never recomputes a metric.
"""

from __future__ import annotations

import io
import json
import math
import re
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
PER_ATTACK_PREFIX = "pareto_clean_vs_heldout_"  # + attack name + ".png": one per held-out attack

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
# Colour maps for a kind with several families (one LAT curve per layer): light = first, dark = last.
_KIND_SHADES = {"at": "Blues", "lat": "Oranges", "rlat": "Greens", "tlat": "Reds"}
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
    family: str
    epsilon: float | None


def _family(record: dict) -> str:
    """The curve a defense belongs to: its kind, plus the layer for latent kinds (``lat@block2``)."""
    kind = str(record.get("kind") or "?")
    sites = record.get("sites")
    if kind in LAYER_KINDS and isinstance(sites, list) and sites:
        return f"{kind}@{'+'.join(str(s) for s in sites)}"
    return kind


def _pareto_points(results: dict, y_group: str, y_keys: Sequence[str] | None = None) -> list[_Point]:
    """Per defense: clean metric vs the per-seed mean of ``y_keys`` (default: ``y_group``'s metrics), each
    mean ± std over seeds."""
    clean = _clean_metric(results)
    y_keys = _group_keys(results, y_group) if y_keys is None else list(y_keys)
    if clean is None or not y_keys:
        return []
    points = []
    for defense in _defenses(results):
        recs = [r for r in _records(results) if str(r.get("defense")) == defense]
        xs = [x for x in (_number((r.get("metrics") or {}).get(clean.key)) for r in recs) if x is not None]
        ys = [y for y in (_group_mean(r, y_keys) for r in recs) if y is not None]
        if xs and ys:
            sx, sy = _stats(xs), _stats(ys)
            kind, family, epsilon = (
                str(recs[0].get("kind") or "?"),
                _family(recs[0]),
                _number(recs[0].get("epsilon")),
            )
            points.append(
                _Point(defense, kind, sx["mean"], sx["std"], sy["mean"], sy["std"], family, epsilon)
            )
    return points


def _curves(points: Sequence[_Point]) -> dict[str, list[_Point]]:
    """Points grouped by family; a family whose points all have distinct budgets is sorted by budget."""
    families: dict[str, list[_Point]] = {}
    for p in points:
        families.setdefault(p.family, []).append(p)
    for family, members in families.items():
        if _is_curve(members):
            families[family] = sorted(members, key=lambda p: p.epsilon or 0.0)
    return families


def _is_curve(members: Sequence[_Point]) -> bool:
    """Several points of one family that differ only in budget: drawn as a line, labelled by budget."""
    budgets = [p.epsilon for p in members]
    return len(members) > 1 and None not in budgets and len(set(budgets)) == len(budgets)


def _family_colours(families: Sequence[str], kinds: dict[str, str]) -> dict[str, Any]:
    """The kind's colour for a kind's only family; shades of the kind's colour map when it has several."""
    import matplotlib as mpl

    colours: dict[str, Any] = {}
    for kind in dict.fromkeys(kinds[f] for f in families):
        mine = [f for f in families if kinds[f] == kind]
        if len(mine) == 1 or kind not in _KIND_SHADES:
            colours.update({f: _KIND_STYLE.get(kind, _OTHER_STYLE)[0] for f in mine})
        else:
            shades = mpl.colormaps[_KIND_SHADES[kind]]
            colours.update({f: shades(0.4 + 0.55 * i / (len(mine) - 1)) for i, f in enumerate(mine)})
    return colours


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


def _direction(results: dict, group: str) -> bool | None:
    """Whether higher is better for every metric of ``group`` (True/False), or ``None`` when mixed/unknown."""
    directions = {m.higher_is_better for m in _metrics(results) if m.group == group}
    return directions.pop() if len(directions) == 1 else None


def _per_attack_plots(results: dict) -> dict[str, str]:
    """Held-out metric key -> plot file, when there are several: their mean mixes threat classes."""
    keys = _group_keys(results, "heldout")
    if len(keys) < 2:
        return {}
    return {
        key: f"{PER_ATTACK_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]+', '_', key.split('/')[-1])}.png" for key in keys
    }


def plot_pareto(
    results: dict, path: Path, y_group: str = "heldout", metric: str | None = None
) -> Path | None:
    """Scatter clean metric (x) against the mean of ``y_group``'s metrics (y) per defense; ``None`` if empty.

    ``metric`` (a key of that group) plots that one metric instead of the group's mean.

    Each point is the mean over seeds with ±1 sample-std error bars. The points of one family (``at``,
    ``lat@block2``, …) that differ only in budget are joined in budget order and labelled by ε; other points
    are labelled by defense name. The non-dominated points are joined as the Pareto front.
    """
    points = _pareto_points(results, y_group, None if metric is None else [metric])
    if not points:
        return None
    from matplotlib.lines import Line2D

    clean = _clean_metric(results)
    assert clean is not None  # _pareto_points returns [] otherwise
    single = next((m for m in _metrics(results) if m.key == metric), None)
    higher = _direction(results, y_group) if single is None else single.higher_is_better
    curves = _curves(points)
    colours = _family_colours(list(curves), {p.family: p.kind for p in points})
    fig = _new_figure(9.0 if len(curves) > 4 else 7.0, 5.5 if len(curves) > 4 else 5.0)
    ax = fig.add_subplot()
    stacked: dict[tuple[float, float], int] = {}
    handles = []
    for family, members in curves.items():
        colour, marker = colours[family], _KIND_STYLE.get(members[0].kind, _OTHER_STYLE)[1]
        curve = _is_curve(members)
        if curve:
            ax.plot([p.x for p in members], [p.y for p in members], color=colour, linewidth=1.2, alpha=0.8)
        for p in members:
            ax.errorbar(
                p.x,
                p.y,
                xerr=p.x_std,
                yerr=p.y_std,
                fmt=marker,
                color=colour,
                markersize=7,
                capsize=2,
                elinewidth=0.8,
            )
            # Stack the labels of points that sit on top of each other instead of over each other.
            spot = (round(p.x, 3), round(p.y, 3))
            stacked[spot] = stacked.get(spot, -1) + 1
            offset = (5, 4 + 9 * stacked[spot])
            text = f"{p.epsilon:g}" if curve else p.defense
            ax.annotate(text, (p.x, p.y), textcoords="offset points", xytext=offset, fontsize=7, color=colour)
        label = family if curve else ", ".join(p.defense for p in members)
        style = "-" if curve else "none"
        handles.append(Line2D([], [], color=colour, marker=marker, linestyle=style, label=label))
    if len(points) > 1 and higher is not None:
        front = _pareto_front(points, higher)
        ax.plot([p.x for p in front], [p.y for p in front], linestyle=":", color="0.4", zorder=0)
        handles.append(Line2D([], [], linestyle=":", color="0.4", label="Pareto front"))
    title = "defense (curve labels: ε)" if any(_is_curve(m) for m in curves.values()) else "defense"
    ax.legend(
        handles=handles,
        title=title,
        fontsize=8,
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),  # outside: never hides a point
    )
    better = "" if higher is None else f" ({'higher' if higher else 'lower'} is better{_arrow(higher)})"
    if single is not None:
        y_label = f"robust accuracy under {single.label}{better}"
    elif y_group == "trojan":
        y_label = "mean trojan ASR (lower is better ↓)"
    else:
        title = GROUP_TITLES.get(y_group, y_group).lower()
        what = "robust accuracy" if y_group in ("heldout", "seen") else "metric"
        y_label = f"mean {title} {what}{better}"
    ax.set_xlabel(f"{clean.label}{clean.arrow}")
    ax.set_ylabel(y_label)
    against = GROUP_TITLES.get(y_group, y_group) if single is None else f"held-out {single.label}"
    ax.set_title(f"{results.get('name', 'run')}: clean vs {against} (mean ± std over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save_png(fig, path)


@dataclass
class _Series:
    """One line of the by-layer plot: per layer, (mean, std) over seeds of one metric group."""

    kind: str
    epsilon: float | None
    points: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.kind}, ε={'?' if self.epsilon is None else f'{self.epsilon:g}'}"


def _layer_series(results: dict) -> tuple[list[str], dict[str, list[_Series]]] | None:
    """Layers (x axis) and, per metric group, one line per (kind, ε); ``None`` when < 2 layers are covered.

    Uses single-site ``lat``/``rlat`` records; groups are the clean metric, mean held-out robustness and mean
    trojan ASR, each a panel of its own so that a budget's effect on each metric stays visible.
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
    keys = _panel_keys(results)
    kinds = [k for k in LAYER_KINDS if any(r.get("kind") == k for r in recs)]
    panels: dict[str, list[_Series]] = {}
    for group in ("clean", "heldout", "trojan"):
        lines = []
        for kind in kinds:
            epsilons = {_number(r.get("epsilon")) for r in recs if r.get("kind") == kind}
            for epsilon in sorted(epsilons, key=lambda e: (e is None, e or 0.0)):
                line = _Series(kind, epsilon)
                for layer in layers:
                    chosen = [
                        r
                        for r in recs
                        if (r.get("kind"), str(r["sites"][0]), _number(r.get("epsilon")))
                        == (kind, layer, epsilon)
                    ]
                    vals = [v for v in (_group_mean(r, keys[group]) for r in chosen) if v is not None]
                    if vals:
                        s = _stats(vals)
                        line.points[layer] = (s["mean"], s["std"])
                if line.points:
                    lines.append(line)
        if lines:
            panels[group] = lines
    return (layers, panels) if panels else None


def _panel_keys(results: dict) -> dict[str, list[str]]:
    """The metric keys behind each by-layer panel: the clean metric, held-out robustness, trojan ASR."""
    clean = _clean_metric(results)
    return {
        "clean": [clean.key] if clean else [],
        "heldout": _group_keys(results, "heldout"),
        "trojan": _group_keys(results, "trojan"),
    }


def _reference_levels(results: dict, group: str) -> list[tuple[str, float]]:
    """Mean over seeds of a panel's metric for ``none`` and ``clean``: horizontal reference lines."""
    keys = _panel_keys(results)[group]
    levels = []
    for defense in _defenses(results):
        recs = [r for r in _records(results) if str(r.get("defense")) == defense]
        if recs[0].get("kind") in ("none", "clean"):
            vals = [v for v in (_group_mean(r, keys) for r in recs) if v is not None]
            if vals:
                levels.append((defense, statistics.fmean(vals)))
    return levels


def plot_by_layer(results: dict, path: Path) -> Path | None:
    """Plot metrics against the perturbed layer for single-site LAT/RLAT runs; ``None`` if < 2 layers.

    One panel per metric (clean, mean held-out robustness, mean trojan ASR); x follows ``layer_order``
    (unknown layers appended); one line per kind and ε (colour: ε, line style: kind), each point mean ± std
    over seeds; the ``none`` and ``clean`` defenses are drawn as horizontal reference lines.
    """
    prepared = _layer_series(results)
    if prepared is None:
        return None
    layers, panels = prepared
    import matplotlib as mpl

    epsilons = sorted({s.epsilon for lines in panels.values() for s in lines if s.epsilon is not None})
    shades = mpl.colormaps["viridis"]

    def colour(epsilon: float | None) -> Any:
        if epsilon is None:
            return _OTHER_STYLE[0]
        return shades(0.1 + 0.75 * epsilons.index(epsilon) / max(1, len(epsilons) - 1))

    clean = _clean_metric(results)
    titles = {
        "clean": f"{clean.label if clean else 'clean'}{clean.arrow if clean else ''}",
        "heldout": "mean held-out robust accuracy ↑",
        "trojan": "mean trojan ASR ↓",
    }
    markers = {"clean": "o", "heldout": "s", "trojan": "v"}
    fig = _new_figure(max(11.0, 1.2 * len(layers) * len(panels) + 3.0), 4.5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (group, lines) in zip(axes, panels.items(), strict=True):
        for s in lines:
            ax.errorbar(
                [layers.index(layer) for layer in s.points],
                [m for m, _ in s.points.values()],
                yerr=[sd for _, sd in s.points.values()],
                color=colour(s.epsilon),
                marker=markers[group],
                linestyle=_KIND_LINESTYLE.get(s.kind, "-"),
                capsize=3,
                label=s.label,
            )
        for defense, level in _reference_levels(results, group):
            ref_colour = _KIND_STYLE["none"][0] if defense == "none" else "black"
            ax.axhline(level, color=ref_colour, linestyle=":", linewidth=1.2, label=f"{defense} (reference)")
        ax.set_xticks(range(len(layers)), layers)
        ax.set_xlabel("perturbed layer (input → output)")
        ax.set_title(titles[group], fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    fig.suptitle(f"{results.get('name', 'run')}: metric by LAT layer (mean ± std over seeds)", fontsize=10)
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


# Statistics of a held-out attack run shown beside its score, when the task reports them: label, digits.
ATTACK_STATS = {
    "success_rate": ("success rate", 3),
    "avg_queries": ("avg queries", 1),
    "avg_words_changed": ("words changed", 2),
    "avg_perturbed_word_fraction": ("fraction of words changed", 3),
    "clean_accuracy": ("clean acc. on subset", 3),
    "examples": ("examples", 0),
    "seconds": ("seconds", 1),
}


def _attack_stats_section(results: dict) -> list[str]:
    """Per held-out attack: how it fared against each defense (mean ± std over seeds), plus one sample."""
    records = _records(results)
    attacks = list(dict.fromkeys(a for r in records for a in r.get("heldout_details") or {}))
    if not attacks:
        return []
    lines = [
        "## Held-out attack statistics",
        "",
        "Success rate: the share of attacked examples on which the attack succeeded (a classifier's"
        " examples are attacked only if it got them right). Queries are averaged over attacked examples,"
        " words changed over successful attacks.",
        "",
    ]
    for attack in attacks:
        details = {
            d: [
                r["heldout_details"][attack]
                for r in records
                if r["defense"] == d and attack in (r.get("heldout_details") or {})
            ]
            for d in _defenses(results)
        }
        found = [x for ds in details.values() for x in ds]
        keys = [k for k in ATTACK_STATS if any(_number(x.get(k)) is not None for x in found)]
        rows = []
        for defense, runs in details.items():
            row = [defense]
            for key in keys:
                values = [v for x in runs if (v := _number(x.get(key))) is not None]
                row.append(_fmt_stat(_stats(values), len(runs), ATTACK_STATS[key][1]) if values else "–")
            rows.append(row)
        lines += [f"**{attack}**", "", *_table(["Defense", *(ATTACK_STATS[k][0] for k in keys)], rows), ""]
        sampled = next(
            ((d, runs[0]["samples"][0]) for d, runs in details.items() if runs and runs[0].get("samples")),
            None,
        )
        if sampled:
            defense, sample = sampled
            lines += [
                f"A successful edit against `{defense}`:",
                "",
                f"> {_cell(sample.get('original', ''))}",
                ">",
                f"> → {_cell(sample.get('perturbed', ''))}",
                "",
            ]
    return lines


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


def _entrenchment_section(results: dict) -> list[str]:
    """Each defense's trojan ASR minus the undefended model's, paired by seed (both start from its base)."""
    kinds = _kinds(results)
    reference = next((d for d in _defenses(results) if kinds.get(d) == "none"), None)
    trojans = [m for m in _metrics(results) if m.group == "trojan"]
    if reference is None or not trojans:
        return []

    def by_seed(defense: str, key: str) -> dict[Any, float]:
        values = {}
        for r in _records(results):
            value = _number((r.get("metrics") or {}).get(key))
            if str(r.get("defense")) == defense and value is not None:
                values[r.get("seed")] = value
        return values

    rows, above_reference = [], []
    for defense in _defenses(results):
        if defense == reference:
            continue
        row = [defense]
        for m in trojans:
            base, mine = by_seed(reference, m.key), by_seed(defense, m.key)
            diffs = [value - base[seed] for seed, value in mine.items() if seed in base]
            if not diffs:
                row.append("–")
                continue
            stat = _stats(diffs)
            text = f"{stat['mean']:+.3f} ± {stat['std']:.3f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"
            if stat["mean"] > 0:
                text = f"**{text}**"
                above_reference.append(f"{defense} ({m.label})")
            row.append(text)
        rows.append(row)
    verdict = (
        f"**Mean ASR above the undefended model's:** {', '.join(above_reference)}."
        if above_reference
        else f"No defense has a mean ASR above `{reference}`'s on any trojan."
    )
    return [
        "## Entrenchment",
        "",
        f"Trojan ASR minus that of `{reference}` (the undefended model of the same seed): mean ± sample std"
        " of the per-seed differences, then in how many seeds the defense's ASR was higher. A positive mean"
        " (bold) means the defense left that trojan stronger than no defense at all.",
        "",
        *_table(["Defense", *(f"{m.label} − {reference}" for m in trojans)], rows),
        "",
        verdict,
        "",
    ]


def _pareto_section(results: dict) -> list[str]:
    """The defenses no other defense beats on both clean metric and robustness (or trojan ASR), by mean."""
    clean = _clean_metric(results)
    lines = ["## Pareto fronts", ""]
    by_metric = {m.key: m for m in _metrics(results)}
    fronts: list[tuple[str, list[_Point], bool | None]] = [
        (f"{what}** (means over seeds)", _pareto_points(results, group), _direction(results, group))
        for group, what in (("heldout", "mean held-out robust accuracy"), ("trojan", "mean trojan ASR"))
    ]
    fronts += [
        (
            f"{by_metric[key].label} alone**",
            _pareto_points(results, "heldout", [key]),
            by_metric[key].higher_is_better,
        )
        for key in _per_attack_plots(results)
    ]
    for what, points, higher in fronts:
        if clean is None or len(points) < 2 or higher is None:
            continue
        listed = ", ".join(f"`{p.defense}` ({p.x:.3f}, {p.y:.3f})" for p in _pareto_front(points, higher))
        lines += [f"**{clean.label} vs {what}: {listed}.", ""]
    if len(lines) == 2:
        return []
    return [
        *lines[:2],
        "Defenses on the front, by increasing clean metric: no other defense has a mean at least as good on"
        " both axes and better on one. Means only: compare the gaps with the standard deviations above.",
        "",
        *lines[2:],
    ]


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
        if name.startswith(PER_ATTACK_PREFIX):
            title = f"Clean accuracy vs held-out {name[len(PER_ATTACK_PREFIX) : -len('.png')]}"
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
    plots += [
        name for key, name in _per_attack_plots(results).items() if _pareto_points(results, "heldout", [key])
    ]
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
        _entrenchment_section(results),
        _pareto_section(results),
        _attack_stats_section(results),
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
