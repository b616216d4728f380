"""The report of a layer × budget sweep: one Pareto curve per defense family, points labelled by budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentguard.report import (
    BY_LAYER_FILE,
    PARETO_ROBUST_FILE,
    PARETO_TROJAN_FILE,
    PER_ATTACK_PREFIX,
    render_markdown,
    write_report,
)
from latentguard.report.plots import _curves, _is_curve, _layer_series, _pareto_points, _reference_levels
from latentguard.sweep import point_name

SEEDS = (0, 1, 2)
LAYERS = ("block1", "block2")


def _record(
    seed: int, name: str, kind: str, sites: list[str], epsilon: float | None, strength: float
) -> dict:
    """Synthetic metrics: a stronger defense trades clean accuracy for robustness and a lower ASR."""
    jitter = 0.01 * seed
    return {
        "seed": seed,
        "defense": name,
        "kind": kind,
        "sites": sites,
        "epsilon": epsilon,
        "by_layer": kind in ("lat", "rlat"),
        "metrics": {
            "clean": {"clean_accuracy": 0.9 - 0.1 * strength + jitter},
            "trojan": {"patch": max(0.0, 0.9 - 0.8 * strength) + jitter},
            "heldout": {"pgd_linf": 0.05 + 0.6 * strength - jitter, "pgd_l2": 0.05 + 0.7 * strength},
        },
    }


def sweep_results() -> dict:
    """Records shaped like ``latentguard sweep configs/image_sweep.yaml`` writes (3 seeds)."""
    grid: list[tuple[str, str, list[str], float | None, float]] = [
        ("none", "none", [], None, 0.0),
        ("clean", "clean", [], None, 0.05),
    ]
    grid += [(point_name("at", None, e), "at", ["input"], e, e / 2) for e in (2.0, 0.5, 1.0, 0.25)]
    for depth, layer in enumerate(LAYERS):
        grid += [
            (point_name("lat", layer, e), "lat", [layer], e, e / (2 + depth)) for e in (0.1, 0.25, 0.5, 1.0)
        ]
    grid.append((point_name("rlat", "block2", 0.5), "rlat", ["block2"], 0.5, 0.1))
    return {
        "name": "sweep-test",
        "task": "image_cls",
        "created": "2026-11-25T12:00:00Z",
        "seeds": list(SEEDS),
        "metrics": [
            {"group": "clean", "name": "clean_accuracy", "label": "clean accuracy", "higher_is_better": True},
            {"group": "trojan", "name": "patch", "label": "ASR patch", "higher_is_better": False},
            {"group": "heldout", "name": "pgd_linf", "label": "pgd_linf", "higher_is_better": True},
            {
                "group": "heldout",
                "name": "pgd_l2",
                "label": "pgd_l2 (seen by at)",
                "higher_is_better": True,
                "seen_by": [n for n in (point_name("at", None, e) for e in (2.0, 0.5, 1.0, 0.25))],
            },
        ],
        "defense_order": [g[0] for g in grid],
        "layer_order": ["stem", *LAYERS, "block3"],
        "records": [_record(seed, *g) for seed in SEEDS for g in grid],
    }


def test_points_are_grouped_by_family_and_sorted_by_budget() -> None:
    curves = _curves(_pareto_points(sweep_results(), "heldout"))
    assert list(curves) == ["none", "clean", "at", "lat@block1", "lat@block2", "rlat@block2"]
    assert [p.epsilon for p in curves["at"]] == [0.25, 0.5, 1.0, 2.0]  # config order was 2, 0.5, 1, 0.25
    assert next(p.defense for p in curves["at"]) == "at:eps=0.25"
    assert all(_is_curve(curves[f]) for f in ("at", "lat@block1", "lat@block2"))
    assert not any(_is_curve(curves[f]) for f in ("none", "clean", "rlat@block2"))
    # Robustness rises with the budget along each curve in this synthetic sweep.
    ys = [p.y for p in curves["lat@block2"]]
    assert ys == sorted(ys)


def test_points_that_share_a_budget_are_not_a_curve() -> None:
    results = sweep_results()
    for record in results["records"]:
        if record["kind"] == "at":
            record["epsilon"] = 1.0  # e.g. the same budget with different PGD steps: not a budget curve
    curves = _curves(_pareto_points(results, "trojan"))
    assert len(curves["at"]) == 4 and not _is_curve(curves["at"])


def test_by_layer_panels_have_one_line_per_kind_and_budget() -> None:
    results = sweep_results()
    prepared = _layer_series(results)
    assert prepared is not None
    layers, panels = prepared
    assert layers == ["block1", "block2"]  # layer_order, restricted to the layers swept
    assert list(panels) == ["clean", "heldout", "trojan"]
    heldout = panels["heldout"]
    assert [(s.kind, s.epsilon) for s in heldout] == [
        ("lat", 0.1),
        ("lat", 0.25),
        ("lat", 0.5),
        ("lat", 1.0),
        ("rlat", 0.5),
    ]
    mean, std = heldout[3].points["block2"]  # lat@block2:eps=1, strength 1/3; pgd_l2 is "seen", not held out
    assert mean == pytest.approx(0.05 + 0.6 / 3 - 0.01) and std == pytest.approx(0.01)
    assert list(heldout[4].points) == ["block2"]
    assert _reference_levels(results, "trojan") == [
        ("none", pytest.approx(0.91)),
        ("clean", pytest.approx(0.87)),
    ]


def test_sweep_report_writes_every_plot(tmp_path: Path) -> None:
    written = write_report(sweep_results(), tmp_path)
    assert [p.name for p in written[1:]] == [PARETO_ROBUST_FILE, PARETO_TROJAN_FILE, BY_LAYER_FILE]
    for path in written[1:]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _section(markdown: str, title: str) -> str:
    start = markdown.index(f"## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end]


def test_entrenchment_pairs_each_seed_with_the_undefended_model() -> None:
    results = sweep_results()
    assert "No defense has a mean ASR above `none`'s" in _section(render_markdown(results), "Entrenchment")
    for record in results["records"]:
        if record["defense"] == "clean" and record["seed"] == 0:
            record["metrics"]["trojan"]["patch"] = (
                0.99  # none has 0.90 at seed 0; clean is 0.04 below at seeds 1, 2
            )
    section = _section(render_markdown(results), "Entrenchment")
    clean_row = next(line for line in section.splitlines() if line.startswith("| clean |"))
    assert "**+0.003 ± 0.075 (1/3)**" in clean_row  # differences +0.09, -0.04, -0.04
    assert "above the undefended model's:** clean (ASR patch)." in section
    assert "| none |" not in section


def test_pareto_section_lists_only_non_dominated_defenses() -> None:
    results = sweep_results()
    for record in results["records"]:
        if record["defense"] == "lat@block1:eps=1":
            record["metrics"]["clean"]["clean_accuracy"] -= (
                0.05  # same robustness as at:eps=1, lower clean accuracy
            )
    section = _section(render_markdown(results), "Pareto fronts")
    heldout = next(
        line for line in section.splitlines() if line.startswith("**clean accuracy vs mean held-out")
    )
    assert "`at:eps=1` (0.860, 0.340)" in heldout  # clean: 0.85 + 0.01 * seed over seeds 0..2
    assert "lat@block1:eps=1`" not in heldout
    assert any(line.startswith("**clean accuracy vs mean trojan ASR") for line in section.splitlines())


def test_several_held_out_attacks_get_a_pareto_plot_and_front_each(tmp_path: Path) -> None:
    """A mean over attacks of different classes can hide that a defense wins on one: each is shown alone."""
    results = sweep_results()
    results["metrics"].append(
        {"group": "heldout", "name": "spatial", "label": "spatial", "higher_is_better": True}
    )
    for record in results["records"]:  # LAT at block2 is the best against this attack, AT the worst
        layer_bonus = 0.3 if record["sites"] == ["block2"] and record["kind"] == "lat" else 0.0
        record["metrics"]["heldout"]["spatial"] = 0.2 + layer_bonus - (0.1 if record["kind"] == "at" else 0.0)
    written = [p.name for p in write_report(results, tmp_path)]
    per_attack = [f"{PER_ATTACK_PREFIX}pgd_linf.png", f"{PER_ATTACK_PREFIX}spatial.png"]
    assert written[-2:] == per_attack
    report = (tmp_path / "report.md").read_text()
    assert f"![Clean accuracy vs held-out spatial]({per_attack[1]})" in report
    fronts = _section(report, "Pareto fronts")
    spatial_front = next(line for line in fronts.splitlines() if "vs spatial alone" in line)
    assert "`lat@block2:eps=0.1`" in spatial_front and "`at:" not in spatial_front
    assert write_report(sweep_results(), tmp_path / "one")[-1].name == BY_LAYER_FILE  # one attack: no extra


def test_verdict_compares_the_best_lat_and_at_at_matched_clean_accuracy() -> None:
    results = sweep_results()
    for record in results["records"]:  # the most robust LAT gives up clean accuracy: it may not compete
        if record["defense"] == "lat@block1:eps=1":
            record["metrics"]["clean"]["clean_accuracy"] = 0.5
            record["metrics"]["heldout"]["pgd_linf"] = 0.99
    section = _section(render_markdown(results), "Verdict: LAT against AT per threat")
    row = next(line for line in section.splitlines() if line.startswith("| pgd_linf |"))
    assert "lat@block1:eps=1" not in row  # excluded by the matched clean level, though the most robust
    best_at = "`at:eps=0.25`"  # the only AT setting whose clean accuracy reaches the LAT family's level
    assert best_at in row and row.rstrip(" |").endswith("3/3")
    assert "| ASR patch |" in section and "positive value means LAT is better" in section
    lower = section[section.index("### The verdict at lower clean levels") :]
    header = next(line for line in lower.splitlines() if line.startswith("| Threat |"))
    assert [f"`at:eps={e}`" in header for e in ("0.25", "0.5", "1", "2")] == [False, True, True, True]
    row = next(line for line in lower.splitlines() if line.startswith("| pgd_linf |"))
    assert "lat@block1:eps=1`" not in row and row.count("/3)") == 3  # still below every level
