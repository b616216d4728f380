"""Bring your own model, data, trigger, attack and defense: a plugin under tests/ registers them, and a run
on a folder of PNGs uses all four; the import-path forms work with no registration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from latentguard.cli import main

pytestmark = pytest.mark.slow


def write_png_folder(root: Path, per_class: int = 48, side: int = 32) -> Path:
    """Three colour classes (red, green, blue dominant) of noisy 32×32 PNGs in class subfolders."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("red", "green", "blue")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.uniform(0, 0.5, size=(side, side, 3))
            pixels[..., label] += 0.45
            Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def config(data: Path, *, trigger: str, attack: str, model: str, defense: str) -> dict:
    return {
        "name": "byo",
        "task": {
            "kind": "image_cls",
            "data": str(data),
            "model": model,
            "model_kwargs": {"width": 4},
            "base_train_size": 80,
            "defense_train_size": 30,
            "base_epochs": 3,
            "trojans": [{"kind": trigger, "target": 0, "poison_rate": 0.2, "amount": 0.4}],
        },
        "defenses": [
            {"name": "none", "kind": "none"},
            {"name": "mine", "kind": defense, "threat": {"norm": "l2", "epsilon": 1.0}},
            {
                "name": "lat",
                "kind": "lat",
                "sites": ["layer1"],
                "threat": {"norm": "l2", "epsilon": 0.5, "epsilon_mode": "relative"},
                "pgd": {"steps": 2},
            },
        ],
        "training": {"steps": 3},
        "batch_size": 16,
        "evaluation": {
            "attacks": [{"name": "noise", "kind": attack, "sigma": 0.2, "examples": 16}],
            "latent_layers": ["layer2"],
            "latent_pgd": {"steps": 2},
            "latent_examples": 16,
            "sanity_examples": 8,
        },
        "threads": 1,
        "progress": False,
        "quick": {"training.steps": 2},
    }


def run(tmp_path: Path, cfg: dict, *extra: str) -> tuple[dict, str]:
    path = tmp_path / "byo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(path), "--quick", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_registered_plugin_kinds_run_end_to_end(tmp_path: Path) -> None:
    data = write_png_folder(tmp_path / "pngs")
    cfg = config(
        data, trigger="quadrant", attack="gaussian_noise", model="tiny_resnet", defense="input_noise"
    )
    results, report = run(tmp_path, cfg, "--plugin", "lg_test_plugin")
    assert results["trojans"][0]["name"] == "quadrant"
    assert "quadrant trigger" in report and "gaussian_noise" in report
    record = next(r for r in results["records"] if r["defense"] == "mine")
    assert record["kind"] == "input_noise" and record["sites"] == ["input"]
    assert (
        set(record["metrics"]["heldout"]) == {"noise"} and 0.0 <= record["metrics"]["trojan"]["quadrant"] <= 1
    )
    assert "random input noise at input" in report
    # the plugin's attack is its own threat class: held out for every defense, so no † anywhere on it
    noise = next(m for m in results["metrics"] if m["name"] == "noise")
    assert noise["seen_by"] == []
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["plugins"] == ["lg_test_plugin"]


def test_import_path_kinds_need_no_registration(tmp_path: Path) -> None:
    data = write_png_folder(tmp_path / "pngs")
    cfg = config(
        data,
        trigger="lg_test_plugin:quadrant_shift",
        attack="lg_test_plugin:gaussian_noise",
        model="lg_test_plugin:tiny_resnet",
        defense="lg_test_plugin:InputNoise",
    )
    results, report = run(tmp_path, cfg)
    assert results["trojans"][0]["name"] == "quadrant_shift"
    assert "user attack lg_test_plugin:gaussian_noise (sigma=0.2)" in report


def test_bad_plugin_settings_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_png_folder(tmp_path / "pngs", per_class=4)
    cfg = config(
        data, trigger="lg_test_plugin:quadrant_shift", attack="gaussian_noise", model="cnn", defense="clean"
    )
    cfg["task"]["trojans"][0]["brightness"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "task.trojans.0" in err and "brightness" in err
    assert not (tmp_path / "never").exists()


def test_trojan_target_checked_against_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_png_folder(tmp_path / "pngs")
    cfg = config(data, trigger="quadrant", attack="gaussian_noise", model="tiny_resnet", defense="clean")
    cfg["task"]["trojans"][0]["target"] = 5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--plugin", "lg_test_plugin", "--out", str(tmp_path / "never")]) == 2
    assert "task.trojans.0.target: 5 is not a class" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_trojan_that_never_implanted_is_flagged_not_reported_as_removed(tmp_path: Path) -> None:
    data = write_png_folder(tmp_path / "pngs")
    cfg = config(data, trigger="quadrant", attack="gaussian_noise", model="tiny_resnet", defense="clean")
    cfg["task"]["trojans"] = [{"kind": "lg_test_plugin:no_change", "target": 0, "poison_rate": 0.05}]
    cfg["evaluation"]["implant_threshold"] = 0.9  # a trigger that changes nothing cannot reach it
    results, report = run(tmp_path, cfg, "--plugin", "lg_test_plugin")
    trojan = results["trojans"][0]
    assert trojan["implanted"] is False and trojan["undefended_asr"] < 0.9
    assert "**Not implanted: no_change**" in report and "removal is not measurable" in report
    assert "ASR no_change (not implanted)" in report
    entrenchment = report.split("## Entrenchment")[1].split("\n## ")[0] if "## Entrenchment" in report else ""
    assert "no_change" not in entrenchment
