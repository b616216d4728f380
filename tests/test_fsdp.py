"""FSDP2 trains what one process trains: ``accelerate launch --use_fsdp --fsdp_version 2``, 2 CPU processes.

Accelerate turns ``--use_fsdp`` into FSDP only on GPU-like devices (on CPU it quietly runs DDP), so the
launched scripts lift that one check (``blobs_task.fsdp_on_cpu``); everything else is real: torch's
``fully_shard`` over gloo with the stem and block layers as their own FSDP units (size-based wrap), the
same sharding Accelerate applies on GPUs, gathering of weights and Adam state for checkpoints and saved
models, and scattering them back on resume. As in ``test_distributed.py`` each process takes half of the
same global batch, so only float32 rounding differs (measured ≤ 1e-7 on the weights): weights and metrics
must agree within 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import flat_metrics
from safetensors import safe_open
from safetensors.torch import load_file
from test_distributed import CONFIG, TASK_SCRIPT, TOLERANCE, TRAINED, _free_port, _records

RESUME_SCRIPT = Path(__file__).parent / "blobs_resume.py"


def _fsdp_launch() -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP", "--fsdp_min_num_params", "200",
        "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip


def _run_all(commands: dict[str, list[str]]) -> None:
    """Run the commands side by side; each must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {
        name: subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, command in commands.items()
    }
    for name, process in processes.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}: {output[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The output folder of the same config run by 1 process and by 2 FSDP2 processes."""
    root = tmp_path_factory.mktemp("fsdp")
    config = root / "blobs.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    commands = {"alone": [sys.executable], "fsdp": _fsdp_launch()}
    _run_all(
        {
            name: [*command, str(TASK_SCRIPT), "run", str(config), "--set", f"output_dir={root / name}"]
            for name, command in commands.items()
        }
    )
    folders = {}
    for name in commands:
        made = list((root / name).iterdir())
        assert len(made) == 1, f"{name} made {made}: every process wrote its own run"
        folders[name] = made[0]
    return folders


def test_fsdp_really_ran_on_two_processes(runs: dict[str, Path]) -> None:
    for name in TRAINED:
        assert json.loads((runs["fsdp"] / "seed-0" / name / "train.json").read_text())["processes"] == 2


def test_final_weights_equal_a_single_process_run(runs: dict[str, Path]) -> None:
    for name in ("base", *TRAINED):
        path = "base.safetensors" if name == "base" else f"{name}/model.safetensors"
        alone, sharded = (load_file(str(runs[key] / "seed-0" / path)) for key in ("alone", "fsdp"))
        assert alone.keys() == sharded.keys(), f"{name}: the saved model is whole, not a shard"
        for key, value in alone.items():
            assert sharded[key].shape == value.shape, f"{name}: {key} is a shard"
            torch.testing.assert_close(sharded[key], value, rtol=0, atol=TOLERANCE, msg=f"{name}: {key}")


def test_results_and_logged_metrics_equal_a_single_process_run(runs: dict[str, Path]) -> None:
    alone, sharded = (json.loads((runs[key] / "results.json").read_text())["records"] for key in runs)
    assert [r["defense"] for r in sharded] == [r["defense"] for r in alone]
    for want, got in zip(alone, sharded, strict=True):
        got_metrics, want_metrics = flat_metrics(got["metrics"]), flat_metrics(want["metrics"])
        assert got_metrics == pytest.approx(want_metrics, abs=TOLERANCE), want["defense"]
        for site, calibration in want["calibration"].items():
            assert got["calibration"][site] == pytest.approx(calibration, rel=TOLERANCE), site
    logged_alone, logged_sharded = _records(runs["alone"]), _records(runs["fsdp"])
    assert logged_sharded.keys() == logged_alone.keys()
    attacked = [record for (phase, _), record in logged_sharded.items() if phase == "seed-0/lat"]
    assert any("attack_gain" in record for record in attacked)
    kl = [
        record.get("loss/kl", 0.0)
        for (phase, _), record in logged_sharded.items()
        if phase == "seed-0/lat_kl"
    ]
    assert max(kl) > 0, "the KL term to the sharded reference weights is live"
    for key, record in logged_alone.items():
        if key[0] != "run":
            assert logged_sharded[key] == pytest.approx(record, rel=TOLERANCE, abs=TOLERANCE), key


def test_only_the_main_process_writes_the_report(runs: dict[str, Path]) -> None:
    folder = runs["fsdp"]
    assert (folder / "report.md").is_file() and (folder / "results.json").is_file()
    assert not list(folder.rglob("*checkpoint*")), "checkpoints are removed once a phase is done"
    assert not list(folder.rglob(".*.tmp")), "no half-written file is left behind"


def test_resuming_a_sharded_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """3 steps, a checkpoint gathered from the shards, a fresh FSDP2 trainer resuming it for 3 more (weights
    and Adam moments scattered back) ends where 6 uninterrupted steps in one process end."""
    whole, split = tmp_path / "whole.safetensors", tmp_path / "split.safetensors"
    _run_all(
        {
            "whole": [sys.executable, str(RESUME_SCRIPT), str(whole), "whole"],
            "split": [*_fsdp_launch(), str(RESUME_SCRIPT), str(split), "split"],
        }
    )
    with safe_open(str(split), framework="pt") as handle:
        assert json.loads(handle.metadata()["latentguard"]) == {"processes": 2, "sharded": True}
    alone, resumed = load_file(str(whole)), load_file(str(split))
    assert alone.keys() == resumed.keys()
    for key, value in alone.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=TOLERANCE, msg=key)
