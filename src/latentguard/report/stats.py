"""Statistics over seeds and access to a results dict: means, spreads, metrics and defenses in order."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


MetricKey = tuple[str, str]  # (group, name), as in results.MetricSpec


def _metric_items(record: dict) -> list[tuple[MetricKey, Any]]:
    """``((group, name), value)`` for every metric a record holds."""
    metrics = record.get("metrics") or {}
    return [
        ((g, n), v) for g, values in metrics.items() if isinstance(values, dict) for n, v in values.items()
    ]


def _value(record: dict, key: MetricKey) -> float | None:
    group, name = key
    return _number(((record.get("metrics") or {}).get(group) or {}).get(name))


def summarize(records: list[dict]) -> dict[str, dict[MetricKey, dict[str, float]]]:
    """Per defense, per metric key: ``{"mean", "std", "n"}`` over the records (seeds) that have the metric.

    Missing, ``None`` and non-finite values are treated as absent, so ``n`` can differ between metrics;
    a metric no record of a defense has is left out of that defense's entry.
    """
    values: dict[str, dict[MetricKey, list[float]]] = {}
    for record in records:
        per_metric = values.setdefault(str(record.get("defense")), {})
        for key, raw in _metric_items(record):
            number = _number(raw)
            if number is not None:
                per_metric.setdefault(key, []).append(number)
    return {
        defense: {key: _stats(vals) for key, vals in metrics.items()} for defense, metrics in values.items()
    }


# ------------------------------------------------------------------------------------------ results access


@dataclass(frozen=True)
class _Metric:
    """One column of the results table, as declared in ``results["metrics"]``. ``group`` is the column group
    shown: a held-out threat some defense trained on is shown as ``seen``."""

    key: MetricKey
    label: str
    group: str
    higher_is_better: bool | None
    seen_by: tuple[str, ...] = ()
    implanted: bool | None = None  # trojans: False when the undefended model never learnt it

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
        if not isinstance(m, dict) or not m.get("group") or not m.get("name"):
            continue
        hib = m.get("higher_is_better")
        seen = tuple(str(d) for d in m.get("seen_by") or [])
        group = str(m["group"])
        declared.append(
            _Metric(
                key=(group, str(m["name"])),
                label=str(m.get("label") or m["name"]),
                group="seen" if seen and group in ("heldout", "latent") else group,
                higher_is_better=hib if isinstance(hib, bool) else None,
                seen_by=seen,
                implanted=m.get("implanted"),
            )
        )
    known = {m.key for m in declared}
    for record in _records(results):
        for key, _ in _metric_items(record):
            if key not in known:
                known.add(key)
                declared.append(_Metric(key=key, label="/".join(key), group="other", higher_is_better=None))
    groups = list(GROUP_ORDER) + [g for g in dict.fromkeys(m.group for m in declared) if g not in GROUP_ORDER]
    return sorted(declared, key=lambda m: groups.index(m.group))  # stable: keeps order within a group


def _group_keys(results: dict, group: str) -> list[MetricKey]:
    """The metrics of a group a plot or front uses; a trojan that never implanted is left out (its removal
    cannot be measured)."""
    return [m.key for m in _metrics(results) if m.group == group and m.implanted is not False]


def _clean_metric(results: dict) -> _Metric | None:
    """The x-axis metric: ``clean_accuracy`` when declared, else the first clean-group metric."""
    clean = [m for m in _metrics(results) if m.group == "clean"]
    for m in clean:
        if m.key == ("clean", "clean_accuracy"):
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


def _group_mean(record: dict, keys: Sequence[MetricKey]) -> float | None:
    """Mean over the keys this record has a value for; ``None`` when it has none of them."""
    vals = [v for v in (_value(record, k) for k in keys) if v is not None]
    return statistics.fmean(vals) if vals else None
