"""End to end: ``latentguard run --quick`` on real Fashion-MNIST, checked through its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import flat_metrics

from latentguard.cli import main

FAST = [
    "--set", "task.base_train_size=3000",
    "--set", "task.defense_train_size=500",
    "--set", "task.test_size=300",
    "--set", "training.steps=6",
    "--set", "evaluation.attacks.pgd_linf.examples=60",
    "--set", "evaluation.attacks.pgd_l2.examples=60",
    "--set", "evaluation.attacks.autoattack_linf.examples=8",
    "--set", "evaluation.attacks.square_linf.examples=16",
    "--set", "evaluation.attacks.spatial.examples=60",
    "--set", "evaluation.latent_examples=60",
]  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    assert main(["run", "--quick", "--no-progress", "--out", str(run_dir), *FAST]) == 0
    return run_dir


def test_run_writes_every_artifact(quick_run: Path) -> None:
    for name in ("config.yaml", "provenance.json", "metrics.jsonl", "results.json", "report.md"):
        assert (quick_run / name).is_file(), name
    assert (quick_run / "pareto_clean_vs_robust.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (quick_run / "seed-0" / "base.safetensors").is_file()
    provenance = json.loads((quick_run / "provenance.json").read_text())
    assert provenance["versions"]["torch"].startswith("2.")
    steps = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("phase") == "seed-0/lat" and "loss" in r for r in steps)


def test_results_cover_every_defense_and_metric(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    defenses = [r["defense"] for r in results["records"]]
    assert defenses == ["none", "clean", "at", "lat", "rlat"]
    keys = set(flat_metrics(results["records"][0]["metrics"]))
    assert {"clean_accuracy", "asr/patch", "asr/blend", "asr/sinusoid"} <= keys
    assert {"robust/pgd_linf", "robust/pgd_l2", "robust/autoattack_linf", "robust/square_linf"} <= keys
    assert "robust/spatial" in keys
    assert {"latent/stem", "latent/block1", "latent/block2", "latent/block3"} <= keys
    for record in results["records"]:
        metrics = flat_metrics(record["metrics"])
        assert 0.0 <= metrics["clean_accuracy"] <= 1.0
        # a stronger attack never leaves more examples correct than the clean model gets right
        assert metrics["robust/autoattack_linf"] <= 1.0
        assert record["sanity"]["hook_fired"] is True
        assert record["sanity"]["grad_nonzero"] is True
    lat = next(r for r in results["records"] if r["defense"] == "lat")
    assert lat["calibration"]["block2"]["epsilon_abs"] > 0
    seen = {t["name"]: t["seen_by"] for t in results["heldout_threats"]}
    assert seen["pgd_l2"] == ["at"] and seen["pgd_linf"] == [] and seen["spatial"] == []
    assert seen["latent/block2"] == ["lat"] and seen["latent/block3"] == []


def test_report_separates_training_and_heldout_threats(quick_run: Path) -> None:
    report = (quick_run / "report.md").read_text()
    training = report.index("Training threats")
    heldout = report.index("Held-out threats")
    assert training < heldout
    assert "latent PGD at block2" in report[training:heldout]
    assert "torchattacks" in report[heldout:] and "spatial attack (rotation ±10°" in report[heldout:]
    for defense in ("none", "clean", "at", "lat", "rlat"):
        assert f"| {defense} " in report
    assert "±" in report


def test_resume_of_a_finished_run_changes_nothing(quick_run: Path) -> None:
    before = json.loads((quick_run / "results.json").read_text())
    assert main(["run", "--resume", str(quick_run), "--no-progress"]) == 0
    after = json.loads((quick_run / "results.json").read_text())
    assert after["records"] == before["records"]


def test_report_command_rebuilds_the_report(quick_run: Path) -> None:
    (quick_run / "report.md").unlink()
    assert main(["report", str(quick_run)]) == 0
    assert (quick_run / "report.md").is_file()


def test_an_attack_added_to_a_finished_run_is_all_that_runs_on_resume(quick_run: Path) -> None:
    """Runs last: it changes the shared run folder."""
    config = yaml.safe_load((quick_run / "config.yaml").read_text())
    added = {
        "name": "pgd_linf_big",
        "kind": "pgd",
        "norm": "linf",
        "epsilon": 0.2,
        "steps": 5,
        "examples": 20,
    }
    config["evaluation"]["attacks"].append(added)
    (quick_run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = json.loads((quick_run / "results.json").read_text())["records"]
    models = {p: p.stat().st_mtime_ns for p in quick_run.glob("seed-0/*/model.safetensors")}
    assert main(["run", "--resume", str(quick_run), "--no-progress"]) == 0
    after = json.loads((quick_run / "results.json").read_text())["records"]
    assert {p: p.stat().st_mtime_ns for p in models} == models  # nothing retrained
    for old, new in zip(before, after, strict=True):
        flat = flat_metrics(new["metrics"])
        assert {k: v for k, v in flat.items() if k != "robust/pgd_linf_big"} == flat_metrics(old["metrics"])
        outcome = new["heldout_details"]["pgd_linf_big"]
        assert outcome["examples"] == 20
        robust = new["metrics"]["heldout"]["pgd_linf_big"]
        assert robust == outcome["robust_accuracy"] <= outcome["clean_accuracy"]
        assert new["seconds"]["eval"] > old["seconds"]["eval"]
    assert "pgd_linf_big" in (quick_run / "report.md").read_text()
