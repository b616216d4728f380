"""No lost runs, no unsafe loading: SIGKILL and resume, malicious pickles, corrupted checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, flat_metrics
from torch import nn

from latentguard.errors import CheckpointError
from latentguard.runs import atomic_write_bytes, load_model, save_model


class Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(pickle.dumps({"weight": Exploit(marker)}))
    torch.save({"weight": Exploit(marker)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_model(weights, nn.Linear(2, 2))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the only torch.load form latentguard would ever use
        torch.load(tmp_path / "model.pt", weights_only=True)
    assert not marker.exists()


def test_truncated_checkpoint_is_an_error_not_garbage(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(path, nn.Linear(4, 4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(path, nn.Linear(4, 4))


def test_atomic_write_leaves_old_file_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.json"
    atomic_write_bytes(path, b'{"ok": 1}')

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b'{"ok": 2, "partial": ')
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "latentguard", *args]


def _wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float = 240) -> None:
    start = time.monotonic()
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path.name} appeared: {process.stderr.read().decode()}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_cli("run", *TINY_RUN, "--out", str(reference)), check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli("run", *TINY_RUN, "--out", str(killed)), stderr=subprocess.PIPE)
    # the first mid-training checkpoint of a defense phase: kill in the middle of training
    _wait_for(killed / "seed-0" / "at" / "checkpoint.safetensors", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists()

    subprocess.run(_cli("run", "--resume", str(killed), "--no-progress"), check=True, capture_output=True)
    expected = json.loads((reference / "results.json").read_text())["records"]
    resumed = json.loads((killed / "results.json").read_text())["records"]
    for want, got in zip(expected, resumed, strict=True):
        assert got["defense"] == want["defense"]
        assert flat_metrics(got["metrics"]) == pytest.approx(flat_metrics(want["metrics"]), abs=1e-6), got[
            "defense"
        ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device=cuda", "device: 'cuda' requested but CUDA is not available"),
        ("defenses.lat.sites=[blok2]", "unknown layer 'blok2'"),
        ("evaluation.latent_layers=[head.9]", "unknown layer 'head.9'"),
        ("task.data_dir=/nonexistent", "dataset-fashion-mnist"),
        ("evaluation.attacks.pgd_l2.kind=carlini", "evaluation.attacks.1.kind"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    from latentguard.cli import main

    out = tmp_path / "run"
    assert main(["run", "--quick", "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentguard: error:") and "\n" not in err and "Traceback" not in err
    assert message in err
    assert not out.exists()


def test_exploding_training_stops_with_the_step_and_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from latentguard.cli import main

    args = ["run", *TINY_RUN, "--out", str(tmp_path / "run"), "--set", "training.lr=1e30"]
    args += ["--set", "training.optimizer=sgd", "--set", "training.momentum=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "step" in err and "on_nonfinite=skip" in err
