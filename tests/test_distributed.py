"""Several processes train what one process trains: ``accelerate launch`` with 2 CPU processes (gloo).

The whole pipeline runs on a tiny MLP task (``blobs_task.py``) once alone and once under
``accelerate launch --num_processes 2`` with the same config: the same global batch (each process takes half
of it), seed and steps. DDP averages the halves' gradients where one process averages over the whole batch,
so float32 rounding differs (measured ≤ 1e-7 on the weights): weights and metrics must agree within 1e-5.
The attacks use no random start and the model has no dropout or batch norm, so nothing else may differ.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import flat_metrics
from safetensors.torch import load_file

TASK_SCRIPT = Path(__file__).parent / "blobs_task.py"
TOLERANCE = 1e-5

LAT: dict[str, Any] = {
    "name": "lat",
    "kind": "lat",
    "sites": ["block"],
    "threat": {"norm": "l2", "epsilon": 0.5, "epsilon_mode": "relative"},
    "pgd": {"steps": 3, "random_start": False},
    "clean_weight": 0.5,
}
CONFIG: dict[str, Any] = {
    "name": "blobs",
    "task": {"kind": "blobs", "train_size": 256, "test_size": 128, "base_steps": 8},
    "defenses": [
        {"name": "none", "kind": "none"},
        {"name": "clean", "kind": "clean"},
        {
            "name": "at",
            "kind": "at",
            "threat": {"norm": "l2", "epsilon": 0.5},
            "pgd": {"steps": 3, "random_start": False},
            "clean_weight": 0.5,
        },
        LAT,
        {**LAT, "name": "lat_kl", "kl_weight": 1.0},
    ],
    "training": {"steps": 6, "lr": 0.01, "log_every": 1, "checkpoint_every": 2},
    "batch_size": 32,
    "evaluation": {
        "latent_layers": ["block"],
        "latent_threat": {"norm": "l2", "epsilon": 0.5, "epsilon_mode": "relative"},
        "latent_pgd": {"steps": 3, "random_start": False},
        "latent_examples": 64,
        "sanity_examples": 16,
        "batch_size": 64,
    },
    "threads": 1,
    "progress": False,
}
TRAINED = ("clean", "at", "lat", "lat_kl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The output folder of the same config run by 1 and by 2 processes (launched side by side)."""
    root = tmp_path_factory.mktemp("distributed")
    config = root / "blobs.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    commands = {1: [sys.executable], 2: launch}
    processes = {
        count: subprocess.Popen(
            [*command, str(TASK_SCRIPT), "run", str(config), "--set", f"output_dir={root / str(count)}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for count, command in commands.items()
    }
    for count, process in processes.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"{count} process(es): {output[-3000:]}"
    folders = {}
    for count in commands:
        made = list((root / str(count)).iterdir())
        assert len(made) == 1, f"{count} process(es) made {made}: every process wrote its own run"
        folders[count] = made[0]
    return folders


def test_each_process_count_really_ran(runs: dict[int, Path]) -> None:
    for count, folder in runs.items():
        for name in TRAINED:
            assert json.loads((folder / "seed-0" / name / "train.json").read_text())["processes"] == count


def test_final_weights_equal_a_single_process_run(runs: dict[int, Path]) -> None:
    for name in ("base", *TRAINED):
        path = "base.safetensors" if name == "base" else f"{name}/model.safetensors"
        alone, shared = (load_file(str(runs[count] / "seed-0" / path)) for count in (1, 2))
        assert alone.keys() == shared.keys()
        for key, value in alone.items():
            torch.testing.assert_close(shared[key], value, rtol=0, atol=TOLERANCE, msg=f"{name}: {key}")


def test_results_equal_a_single_process_run(runs: dict[int, Path]) -> None:
    alone, shared = (json.loads((runs[count] / "results.json").read_text())["records"] for count in (1, 2))
    assert [r["defense"] for r in shared] == [r["defense"] for r in alone]
    for want, got in zip(alone, shared, strict=True):
        got_metrics, want_metrics = flat_metrics(got["metrics"]), flat_metrics(want["metrics"])
        assert got_metrics == pytest.approx(want_metrics, abs=TOLERANCE), want["defense"]
        for site, calibration in want["calibration"].items():
            assert got["calibration"][site] == pytest.approx(calibration, rel=TOLERANCE), site


def _records(folder: Path) -> dict[tuple[str, int | None], dict[str, Any]]:
    """The metric log by (phase, step); a record written twice (by two processes) fails here."""
    records: dict[tuple[str, int | None], dict[str, Any]] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        key = (record.pop("phase"), record.get("step"))
        assert key not in records, f"written twice: {key}"
        records[key] = record
    return records


def test_logged_metrics_are_gathered_and_written_once(runs: dict[int, Path]) -> None:
    alone, shared = _records(runs[1]), _records(runs[2])
    assert shared.keys() == alone.keys()
    assert any(phase == "seed-0/lat" and "attack_gain" in record for (phase, _), record in shared.items())
    assert any(
        phase == "seed-0/lat_kl" and record.get("loss/kl", 0) > 0 for (phase, _), record in shared.items()
    )
    for key, record in alone.items():
        if key[0] != "run":  # the run's wall time
            assert shared[key] == pytest.approx(record, rel=TOLERANCE, abs=TOLERANCE), key


def test_only_the_main_process_writes_the_report(runs: dict[int, Path]) -> None:
    folder = runs[2]
    assert (folder / "report.md").is_file() and (folder / "results.json").is_file()
    assert not list(folder.rglob("*checkpoint*")), "checkpoints are removed once a phase is done"
    assert not list(folder.rglob(".*.tmp")), "no half-written file is left behind"
