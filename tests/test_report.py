"""Tests for the Markdown/PNG report built from a synthetic ``results.json`` dict."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from conftest import metric_key, nest_metrics

from latentguard.errors import UserError
from latentguard.report import (
    BY_LAYER_FILE,
    PARETO_ROBUST_FILE,
    PARETO_TROJAN_FILE,
    plot_by_layer,
    plot_pareto,
    render_markdown,
    render_run,
    summarize,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# defense -> (kind, sites, epsilon, per-seed metric values for seeds 0 and 1)
DEFENSES: dict[str, tuple[str, list[str], float | None, list[dict[str, float]]]] = {
    "none": (
        "none",
        [],
        None,
        [
            {"clean_accuracy": 0.90, "asr/patch": 0.95, "robust/pgd_l2": 0.10, "robust/pgd_linf": 0.05},
            {"clean_accuracy": 0.88, "asr/patch": 0.97, "robust/pgd_l2": 0.12, "robust/pgd_linf": 0.07},
        ],
    ),
    "clean": (
        "clean",
        [],
        None,
        [
            {"clean_accuracy": 0.91, "asr/patch": 0.80, "robust/pgd_l2": 0.11, "robust/pgd_linf": 0.06},
            {"clean_accuracy": 0.89, "asr/patch": 0.84, "robust/pgd_l2": 0.13, "robust/pgd_linf": 0.08},
        ],
    ),
    "at": (
        "at",
        ["input"],
        0.1,
        [
            {"clean_accuracy": 0.80, "asr/patch": 0.60, "robust/pgd_l2": 0.40, "robust/pgd_linf": 0.55},
            {"clean_accuracy": 0.90, "asr/patch": 0.70, "robust/pgd_l2": 0.44, "robust/pgd_linf": 0.59},
        ],
    ),
    "lat@block1": (
        "lat",
        ["block1"],
        0.5,
        [
            {"clean_accuracy": 0.86, "asr/patch": 0.30, "robust/pgd_l2": 0.30, "robust/pgd_linf": 0.20},
            {"clean_accuracy": 0.84, "asr/patch": 0.20, "robust/pgd_l2": 0.34, "robust/pgd_linf": 0.24},
        ],
    ),
    "lat@block2": (
        "lat",
        ["block2"],
        0.5,
        [
            {"clean_accuracy": 0.87, "asr/patch": 0.12, "robust/pgd_l2": 0.31, "robust/pgd_linf": 0.25},
            {"clean_accuracy": 0.85, "asr/patch": 0.16, "robust/pgd_l2": 0.35, "robust/pgd_linf": 0.27},
        ],
    ),
}


def _record(seed: int, defense: str) -> dict:
    kind, sites, epsilon, per_seed = DEFENSES[defense]
    return {
        "seed": seed,
        "defense": defense,
        "kind": kind,
        "sites": sites,
        "epsilon": epsilon,
        "metrics": nest_metrics(per_seed[seed]),
        "by_layer": kind == "lat",
        "calibration": {
            s: {"mean_norm": 10.0 + seed, "epsilon_abs": 0.5 * (10.0 + seed)} for s in sites if kind == "lat"
        },
        "sanity": {
            "hook_fired": True,
            "grad_nonzero": True,
            "attack_beats_noise": kind != "none" or None,
            "blackbox_not_better": True,
        }
        if kind != "clean"
        else {},
        "seconds": {"train": 10.0 + seed, "eval": 5.0},
    }


def make_results() -> dict:
    return {
        "name": "fmnist-test",
        "task": "image_cls",
        "created": "2026-11-25T12:00:00Z",
        "seeds": [0, 1],
        "provenance": {
            "git_commit": "abc123",
            "versions": {"python": "3.11.7", "torch": "2.13.0"},
            "command": "latentguard run cfg.yaml",
        },
        "trojans": [{"name": "patch", "description": "4x4 checkerboard patch -> class 0, 2% poisoned"}],
        "training_threats": [
            {"defense": "at", "description": "input-space PGD, linf eps=0.1, 5 steps"},
            {"defense": "lat@block1", "description": "latent PGD at block1, l2 eps=0.5 x mean norm, 5 steps"},
            {"defense": "lat@block2", "description": "latent PGD at block2, l2 eps=0.5 x mean norm, 5 steps"},
        ],
        "heldout_threats": [
            {"name": "pgd_l2", "description": "torchattacks PGDL2 (eps=1.5, 20 steps)", "seen_by": []},
            {"name": "pgd_linf", "description": "torchattacks PGD (eps=0.1, 20 steps)", "seen_by": ["at"]},
        ],
        "metrics": [
            {"group": "clean", "name": "clean_accuracy", "label": "Clean acc.", "higher_is_better": True},
            {"group": "trojan", "name": "patch", "label": "ASR patch", "higher_is_better": False},
            {"group": "heldout", "name": "pgd_l2", "label": "PGD-L2", "higher_is_better": True},
            {
                "group": "heldout",
                "name": "pgd_linf",
                "label": "PGD-Linf (seen by at)",
                "higher_is_better": True,
                "seen_by": ["at"],
            },
        ],
        "defense_order": list(DEFENSES),
        "layer_order": ["stem", "block1", "block2", "block3"],
        "records": [_record(seed, d) for seed in (0, 1) for d in DEFENSES],
        "phase_seconds": {"base": 40.1, "defenses": 120.0, "eval": 60.3, "total": 230.0},
    }


def _section(markdown: str, title: str) -> str:
    """The text of one ``## title`` section, up to the next ``## `` heading."""
    start = markdown.index(f"## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:] if end == -1 else markdown[start:end]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


def test_summarize_mean_std_by_hand() -> None:
    summary = summarize(make_results()["records"])
    at = summary["at"][metric_key("clean_accuracy")]
    assert at["n"] == 2
    assert at["mean"] == pytest.approx(0.85)
    assert at["std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # sample std of 0.80, 0.90 = 0.0707
    asr = summary["lat@block1"][metric_key("asr/patch")]
    assert asr["mean"] == pytest.approx(0.25)
    assert asr["std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert list(summary) == list(DEFENSES)


def test_summarize_ignores_missing_none_and_nan() -> None:
    records = [
        {"defense": "a", "metrics": {"g": {"m": 0.5, "x": None}}},
        {"defense": "a", "metrics": {"g": {"x": float("nan")}}},
        {"defense": "a", "metrics": {}},
        {"defense": "b"},
    ]
    summary = summarize(records)
    assert summary["a"] == {("g", "m"): {"mean": 0.5, "std": 0.0, "n": 1}}
    assert summary["b"] == {}


def test_markdown_sections_and_table() -> None:
    results = make_results()
    md = render_markdown(results)
    assert md.startswith("# LAT report: fmnist-test")
    assert "image_cls" in md and "abc123" in md and "0, 1" in md

    training = _section(md, "Training threats")
    heldout = _section(md, "Held-out threats")
    assert md.index("## Training threats") < md.index("## Held-out threats")
    assert "input-space PGD, linf eps=0.1" in training and "latent PGD at block2" in training
    assert "torchattacks" not in training
    assert "seen by: at" in heldout and "torchattacks PGDL2" in heldout
    assert "input-space PGD" not in heldout
    assert "4x4 checkerboard" in _section(md, "Trojans")

    table = _section(md, "Results")
    assert "n = 2" in table
    assert "0.850 ± 0.071" in table  # at: clean accuracy
    assert "0.140 ± 0.028" in table  # lat@block2: ASR patch
    assert "Clean acc. ↑" in table and "ASR patch ↓" in table
    header = next(line for line in table.splitlines() if line.startswith("| Defense"))
    assert header.index("Clean acc.") < header.index("ASR patch") < header.index("PGD-L2 ↑")
    assert header.index("PGD-L2 ↑") < header.index("PGD-Linf")
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][2:]
    assert rows == list(DEFENSES)
    at_row = next(line for line in table.splitlines() if line.startswith("| at "))
    assert "0.570 ± 0.028 †" in at_row  # trained on the pgd_linf threat class


def test_markdown_sanity_calibration_timings_and_links(tmp_path: Path) -> None:
    results = make_results()
    results["records"][0]["sanity"]["grad_nonzero"] = False  # seed 0 of "none"
    md = render_markdown(results)
    sanity = _section(md, "Sanity checks")
    none_row = next(line for line in sanity.splitlines() if line.startswith("| none "))
    assert "✗ (1/2 seeds)" in none_row and "–" in none_row
    clean_row = next(line for line in sanity.splitlines() if line.startswith("| clean "))
    assert "✓" not in clean_row and "–" in clean_row
    assert "✓" in next(line for line in sanity.splitlines() if line.startswith("| at "))
    assert "Warning" in sanity

    calibration = _section(md, "Calibration")
    assert "block1" in calibration and "5.25 (5, 5.5)" in calibration
    timings = _section(md, "Timings")
    assert "230" in timings and "10.5" in timings
    plots = _section(md, "Plots")
    for name in (PARETO_ROBUST_FILE, PARETO_TROJAN_FILE, BY_LAYER_FILE):
        assert f"]({name})" in plots


def test_write_report_writes_valid_pngs_and_keeps_input(tmp_path: Path) -> None:
    results = make_results()
    before = copy.deepcopy(results)
    written = write_report(results, tmp_path / "out")
    assert results == before
    names = [p.name for p in written]
    assert names == ["report.md", PARETO_ROBUST_FILE, PARETO_TROJAN_FILE, BY_LAYER_FILE]
    for path in written[1:]:
        _assert_png(path)
    report = written[0].read_text(encoding="utf-8")
    assert f"![Clean accuracy vs held-out robustness]({PARETO_ROBUST_FILE})" in report
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_missing_metrics_do_not_crash(tmp_path: Path) -> None:
    results = make_results()
    for record in results["records"]:
        if record["defense"] == "at":
            record["metrics"]["heldout"].pop("pgd_l2")
        if record["defense"] == "lat@block1" and record["seed"] == 1:
            record["metrics"]["trojan"]["patch"] = None
        if record["defense"] == "clean":
            record["metrics"] = {}
        record.pop("calibration")
        record["sanity"] = {}
    results.pop("phase_seconds")
    written = write_report(results, tmp_path)
    md = written[0].read_text(encoding="utf-8")
    table = _section(md, "Results")
    at_row = next(line for line in table.splitlines() if line.startswith("| at "))
    assert at_row.count("–") == 1
    block1_row = next(line for line in table.splitlines() if line.startswith("| lat@block1 "))
    assert "0.300 (n=1)" in block1_row
    assert "No sanity checks were recorded" in md
    assert summarize(results["records"])["clean"] == {}


def test_plots_return_none_without_data(tmp_path: Path) -> None:
    results = make_results()
    results["records"] = [r for r in results["records"] if r["defense"] != "lat@block2"]
    assert plot_by_layer(results, tmp_path / "layer.png") is None  # one LAT layer only
    assert not (tmp_path / "layer.png").exists()
    empty = {**results, "records": []}
    assert plot_pareto(empty, tmp_path / "p.png") is None
    with pytest.raises(UserError, match="records: List should have at least 1 item"):
        write_report(empty, tmp_path / "empty")  # nothing to report: refused, never an empty report
    assert not (tmp_path / "empty").exists()


def test_by_layer_with_several_epsilons(tmp_path: Path) -> None:
    results = make_results()
    for seed in (0, 1):
        extra = _record(seed, "lat@block2")
        extra.update(defense="lat@block2-eps1", epsilon=1.0, kind="rlat")
        results["records"].append(extra)
        extra = _record(seed, "lat@block2")
        extra.update(defense="lat@block2-eps2", epsilon=2.0)
        results["records"].append(extra)
    path = plot_by_layer(results, tmp_path / BY_LAYER_FILE)
    assert path is not None
    _assert_png(path)
    trojan = plot_pareto(results, tmp_path / "trojan.png", y_group="trojan")
    assert trojan is not None
    _assert_png(trojan)


def test_render_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"results\.json: file not found"):
        render_run(tmp_path)
    (tmp_path / "results.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"results\.json: not valid JSON"):
        render_run(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match="lacks what a report needs"):
        render_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps(make_results()), encoding="utf-8")
    written = render_run(tmp_path)
    assert written[0] == tmp_path / "report.md"
    assert {p.name for p in tmp_path.iterdir()} >= {"report.md", PARETO_ROBUST_FILE, "results.json"}


def test_attack_statistics_section() -> None:
    """Per-attack statistics (e.g. a text attack's success rate and queries) are averaged over seeds."""
    results = make_results()
    for record in results["records"]:
        rate = 0.9 if record["defense"] == "none" else 0.5
        record["heldout_details"] = {
            "pgd_l2": {
                "success_rate": rate + 0.02 * record["seed"],
                "avg_queries": 100.0 + 10 * record["seed"],
                "examples": 40,
                "samples": [{"original": "oil prices | rise", "perturbed": "oil prcies rise", "label": 2}],
            }
        }
    section = _section(render_markdown(results), "Held-out attack statistics")
    none_row = next(line for line in section.splitlines() if line.startswith("| none |"))
    assert "0.910 ± 0.014" in none_row  # mean and sample std of 0.90 and 0.92
    assert "105.0 ± 7.1" in none_row
    assert "oil prices \\| rise" in section and "oil prcies rise" in section
    assert "Held-out attack statistics" not in render_markdown(make_results())
