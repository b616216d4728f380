"""The Markdown report: header, threat tables, results with their spread, entrenchment, timing."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentguard.report.plots import (
    _direction,
    _layer_series,
    _pareto_front,
    _pareto_points,
    _per_attack_plots,
    _Point,
)
from latentguard.report.stats import (
    BY_LAYER_FILE,
    GROUP_TITLES,
    PARETO_ROBUST_FILE,
    PARETO_TROJAN_FILE,
    PER_ATTACK_PREFIX,
    MetricKey,
    _clean_metric,
    _defenses,
    _kinds,
    _Metric,
    _metrics,
    _number,
    _records,
    _stats,
    _value,
    summarize,
)

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
    """``mean ± std``; a plain value when it rests on one seed (a std of one value means nothing)."""
    text = f"{stat['mean']:.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {stat['std']:.{digits}f}"
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


def _inside(distance: float | None, epsilon: float) -> str:
    return "–" if distance is None else "yes" if distance <= epsilon else "no"


def _trojan_section(results: dict) -> list[str]:
    trojans = results.get("trojans") or []
    lines = ["## Trojans", ""]
    if not trojans:
        return [*lines, "No trojans were implanted in this run.", ""]
    budgets = results.get("input_budgets") or []
    norms = sorted({b["norm"] for b in budgets} | {"l2", "linf"}, key=["l2", "linf"].index)
    measured = any(t.get("distance") for t in trojans)
    header = [
        "Trojan",
        "Description",
        f"implanted (undefended ASR ≥ {results.get('implant_threshold', 0.5):g})",
    ]
    header += [f"mean {n.upper().replace('LINF', 'L∞')} to clean" for n in norms]
    header += (
        [f"inside {b['defense']}'s {b['norm']} ε={b['epsilon']:g}?" for b in budgets] if measured else []
    )
    threshold = results.get("implant_threshold", 0.5)
    rows = []
    for t in trojans:
        distance = t.get("distance") or {}
        asr, implanted = t.get("undefended_asr"), t.get("implanted")
        status = "–" if implanted is None else f"{'yes' if implanted else '**no**'} ({asr:.2f})"
        row = [t.get("name", "?"), t.get("description", ""), status]
        row += [_fmt_num(distance.get(n)) for n in norms]
        if measured:
            row += [_inside(distance.get(b["norm"]), b["epsilon"]) for b in budgets]
        rows.append(row)
    if not measured:
        header, rows = header[:3], [row[:3] for row in rows]
    absent = [t.get("name", "?") for t in trojans if t.get("implanted") is False]
    if absent:
        note_absent = (
            f" **Not implanted: {', '.join(absent)}** — the undefended model's ASR stayed below"
            f" {threshold:g}, so removal is not measurable: left out of the entrenchment check, the Pareto"
            " fronts and plots against trojan ASR, and the verdict."
        )
    else:
        note_absent = ""
    note = (
        " The distance columns are the mean over test images of the input-space distance between a triggered"
        " image and its clean version; *inside* says whether that mean lies within an AT defense's training"
        " ball, i.e. whether AT's threat model could contain the trigger."
        if measured
        else ""
    )
    return [
        *lines,
        "Implanted by poisoning the base model's training data; ASR is measured on triggered inputs whose"
        " true label differs from the target (lower is better)." + note + note_absent,
        "",
        *_table(header, rows, "l" * len(header)),
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
    groups = list(dict.fromkeys(m.group for m in metrics))
    spread = (
        "Mean ± sample standard deviation over seeds (n = {n} per cell unless a cell says otherwise)"
        if common_n > 1
        else "One seed: plain values (n = {n})"
    ).format(n=common_n)
    lines += [
        f"{spread}; – means not measured. ↑ higher is better, ↓ lower is better.",
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
            if stat is not None and d in m.seen_by:
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


def _by_seed(results: dict, defense: str, key: MetricKey) -> dict[Any, float]:
    """``{seed: value}`` of one defense's metric."""
    values = {}
    for r in _records(results):
        value = _value(r, key)
        if str(r.get("defense")) == defense and value is not None:
            values[r.get("seed")] = value
    return values


VERDICT = ("lat", "at")  # the comparison the verdict table makes: latent against input-space AT
MATCH_TOLERANCE = 0.01  # clean accuracy a setting may lose against the matched level and still compete


def _reach(results: dict, metric: _Metric) -> str:
    """For a trojan: whether its trigger lies inside the largest input-space ball an AT defense trained in."""
    if metric.group != "trojan":
        return ""
    trojan = next((t for t in results.get("trojans") or [] if t.get("name") == metric.key[1]), {})
    distance = trojan.get("distance") or {}
    widest: dict[str, float] = {}
    for budget in results.get("input_budgets") or []:
        widest[budget["norm"]] = max(widest.get(budget["norm"], 0.0), budget["epsilon"])
    inside = [norm for norm, eps in widest.items() if norm in distance and distance[norm] <= eps]
    known = [norm for norm in widest if norm in distance]
    if not known:
        return ""
    return " (inside AT's largest ball)" if inside else " (outside every AT ball)"


@dataclass(frozen=True)
class _Duel:
    """One threat's best LAT against its best AT at one clean level, with the paired per-seed differences."""

    metric: Any
    lat: str
    at: str
    diffs: list[float]

    def difference(self) -> str:
        stat = _stats(self.diffs)
        return f"{stat['mean']:+.3f} ± {stat['std']:.3f}" if stat["n"] > 1 else f"{stat['mean']:+.3f}"

    def ahead(self) -> str:
        return f"{sum(d > 0 for d in self.diffs)}/{len(self.diffs)}"


class _Verdict:
    """Best LAT against best AT per held-out threat and trojan, among settings above a clean level."""

    def __init__(self, results: dict) -> None:
        self.results = results
        self.clean = _clean_metric(results)
        kinds = _kinds(results)
        self.families = {kind: [d for d in _defenses(results) if kinds.get(d) == kind] for kind in VERDICT}
        self.summary = summarize(_records(results))

    def ready(self) -> bool:
        return self.clean is not None and all(self.families.values())

    def mean(self, defense: str, key: MetricKey) -> float | None:
        stat = self.summary.get(defense, {}).get(key)
        return None if stat is None else stat["mean"]

    def clean_of(self, defense: str) -> float:
        assert self.clean is not None
        value = self.mean(defense, self.clean.key)
        return -math.inf if value is None else value

    def matched_level(self) -> float:
        """The lower of the two families' best clean means, minus the tolerance."""
        return min(max(self.clean_of(d) for d in ds) for ds in self.families.values()) - MATCH_TOLERANCE

    def duels(self, level: float) -> list[_Duel]:
        eligible = {k: [d for d in ds if self.clean_of(d) >= level] for k, ds in self.families.items()}
        duels = []
        for m in _metrics(self.results):
            if m.group not in ("heldout", "latent", "seen", "trojan") or m.higher_is_better is None:
                continue
            if m.implanted is False:  # no removal to compare
                continue
            sign = 1.0 if m.higher_is_better else -1.0
            best = {}
            for kind, names in eligible.items():
                scored = [(sign * v, d) for d in names if (v := self.mean(d, m.key)) is not None]
                if scored:
                    best[kind] = max(scored)[1]
            if len(best) < 2:
                continue
            lat, at = (best[k] for k in VERDICT)
            mine, theirs = _by_seed(self.results, lat, m.key), _by_seed(self.results, at, m.key)
            diffs = [sign * (mine[s] - theirs[s]) for s in mine if s in theirs]
            if diffs:
                duels.append(_Duel(m, lat, at, diffs))
        return duels


def _verdict_section(results: dict) -> list[str]:
    """Per held-out threat and trojan: the best LAT against the best AT at matched clean accuracy, by seed.

    Matched: both families compete only with settings whose mean clean metric is at least the lower of the
    two families' best clean means (minus ``MATCH_TOLERANCE``), so neither wins by giving up clean accuracy.
    The same comparison is then repeated at each lower AT setting's clean level (a walk down the front).
    """
    verdict = _Verdict(results)
    if not verdict.ready():
        return []
    assert verdict.clean is not None
    level = verdict.matched_level()
    duels = verdict.duels(level)
    if not duels:
        return []
    rows = [
        [
            d.metric.label + _reach(results, d.metric),
            f"`{d.lat}` {verdict.mean(d.lat, d.metric.key):.3f}",
            f"`{d.at}` {verdict.mean(d.at, d.metric.key):.3f}",
            d.difference(),
            d.ahead(),
        ]
        for d in duels
    ]
    return [
        "## Verdict: LAT against AT per threat",
        "",
        f"For each held-out threat and trojan, the best `{VERDICT[0]}` setting against the best"
        f" `{VERDICT[1]}` setting among those whose mean {verdict.clean.label} is at least {level:.3f} (the"
        f" lower of the two families' best, minus {MATCH_TOLERANCE:g}). *LAT − AT* is the paired per-seed"
        " difference, signed so that a positive value means LAT is better (higher robustness, lower ASR),"
        " mean ± sample std; *LAT ahead* counts the seeds where it is positive. A trojan is *inside AT's"
        " largest ball* when its trigger's mean input distance from the clean image is within the largest"
        " input-space budget an AT defense trained at (Trojans section).",
        "",
        *_table(["Threat", "best LAT", "best AT", "LAT − AT", "LAT ahead"], rows, "lllrr"),
        "",
        *_lower_levels(verdict, level),
    ]


def _lower_levels(verdict: _Verdict, top: float) -> list[str]:
    """The verdict again at each AT setting's clean level below the matched one, down the front."""
    assert verdict.clean is not None
    levels = sorted(
        {round(verdict.clean_of(a) - MATCH_TOLERANCE, 6): a for a in verdict.families[VERDICT[1]]}.items(),
        reverse=True,
    )
    levels = [(level, at) for level, at in levels if level < top - 1e-9]
    columns = [(level, at, {d.metric.key: d for d in verdict.duels(level)}) for level, at in levels]
    if not columns:
        return []
    header = ["Threat", *(f"≥ {level:.3f} (`{at}`)" for level, at, _ in columns)]
    rows = []
    for metric in [d.metric for d in verdict.duels(top)]:
        cells = [metric.label]
        for _, _, duels in columns:
            duel = duels.get(metric.key)
            cells.append("–" if duel is None else f"{duel.difference()} ({duel.ahead()}) `{duel.lat}`")
        rows.append(cells)
    return [
        "### The verdict at lower clean levels",
        "",
        f"The same comparison with each `{VERDICT[1]}` setting's mean {verdict.clean.label} (minus"
        f" {MATCH_TOLERANCE:g}) as the level, below the matched one: *LAT − AT* (LAT ahead) and the best LAT"
        f" at that level; the best `{VERDICT[1]}` is the most robust setting at or above the level.",
        "",
        *_table(header, rows, "l" + "r" * len(columns)),
        "",
    ]


def _entrenchment_section(results: dict) -> list[str]:
    """Each defense's trojan ASR minus the undefended model's, paired by seed (both start from its base)."""
    kinds = _kinds(results)
    reference = next((d for d in _defenses(results) if kinds.get(d) == "none"), None)
    trojans = [m for m in _metrics(results) if m.group == "trojan" and m.implanted is not False]
    if reference is None or not trojans:
        return []

    def by_seed(defense: str, key: MetricKey) -> dict[Any, float]:
        return _by_seed(results, defense, key)

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
        _verdict_section(results),
        _entrenchment_section(results),
        _pareto_section(results),
        _attack_stats_section(results),
        _sanity_section(results),
        _calibration_section(results),
        _timing_section(results),
        _plot_section(names),
    ]
    return "\n".join(line for section in sections for line in section).rstrip("\n") + "\n"
