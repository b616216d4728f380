"""PNG plots of a run: clean vs robustness (Pareto) and metrics by LAT layer."""

from __future__ import annotations

import io
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentguard.report.stats import (
    _DPI,
    _KIND_LINESTYLE,
    _KIND_SHADES,
    _KIND_STYLE,
    _OTHER_STYLE,
    GROUP_TITLES,
    PER_ATTACK_PREFIX,
    MetricKey,
    _arrow,
    _clean_metric,
    _defenses,
    _group_keys,
    _group_mean,
    _metrics,
    _number,
    _records,
    _stats,
    _value,
)
from latentguard.runs import atomic_write_bytes

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
    """The curve a defense belongs to: its kind, plus the layer for by-layer kinds (``lat@block2``)."""
    kind = str(record.get("kind") or "?")
    sites = record.get("sites")
    if record.get("by_layer") and isinstance(sites, list) and sites:
        return f"{kind}@{'+'.join(str(s) for s in sites)}"
    return kind


def _pareto_points(results: dict, y_group: str, y_keys: Sequence[MetricKey] | None = None) -> list[_Point]:
    """Per defense: clean metric vs the per-seed mean of ``y_keys`` (default: ``y_group``'s metrics), each
    mean ± std over seeds."""
    clean = _clean_metric(results)
    y_keys = _group_keys(results, y_group) if y_keys is None else list(y_keys)
    if clean is None or not y_keys:
        return []
    points = []
    for defense in _defenses(results):
        recs = [r for r in _records(results) if str(r.get("defense")) == defense]
        xs = [x for x in (_value(r, clean.key) for r in recs) if x is not None]
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


def _per_attack_plots(results: dict) -> dict[MetricKey, str]:
    """Held-out metric key -> plot file, when there are several: their mean mixes threat classes."""
    keys = _group_keys(results, "heldout")
    if len(keys) < 2:
        return {}
    return {key: f"{PER_ATTACK_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]+', '_', key[1])}.png" for key in keys}


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
        if r.get("by_layer") and isinstance(r.get("sites"), list) and len(r["sites"]) == 1
    ]
    found = list(dict.fromkeys(str(r["sites"][0]) for r in recs))
    if len(found) < 2:
        return None
    order = [str(x) for x in results.get("layer_order") or []]
    layers = [x for x in order if x in found] + [x for x in found if x not in order]
    keys = _panel_keys(results)
    kinds = list(dict.fromkeys(str(r.get("kind")) for r in recs))
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


def _panel_keys(results: dict) -> dict[str, list[MetricKey]]:
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
