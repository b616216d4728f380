"""Issue 21: resume against an edited config, signals, locks, full and read-only disks, damaged run files,
duplicate YAML keys and non-finite numbers."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_RUN, flat_metrics

from latentguard.config import load_config
from latentguard.errors import ConfigError
from latentguard.lock import RunLocked

# -- config values that validation used to let through ---------------------------------------------------


def test_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "name: x\nseeds: [0]\ntask: {kind: image_cls}\ndefenses: [{name: n, kind: none}]\nseeds: [1]\n"
    )
    with pytest.raises(ConfigError, match=r"duplicate key 'seeds' \(lines 2 and 5\)"):
        load_config(path)


def test_duplicate_key_in_a_nested_mapping_and_in_set(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("task:\n  kind: image_cls\n  kind: text_cls\ndefenses: [{name: n, kind: none}]\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'kind' \(lines 2 and 3\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        load_config(overrides=["defenses.lat.pgd={steps: 2, steps: 3}"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("defenses.lat.threat.epsilon=.inf", "defenses.3.threat.epsilon"),
        ("defenses.lat.threat.epsilon=inf", "defenses.3.threat.epsilon"),
        ("training.lr=.nan", "training.lr"),
        ("task.base_lr=-.inf", "task.base_lr"),
        ("evaluation.attacks.pgd_l2.epsilon=.nan", "evaluation.attacks.1.epsilon"),
        ("evaluation.latent_threat.epsilon=.inf", "evaluation.latent_threat.epsilon"),
    ],
)
def test_non_finite_numbers_are_rejected_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: must be a finite number"):
        config = load_config(overrides=[override])
        from latentguard.domains import build_task

        build_task(config.task, config.evaluation.attacks, 0, "cpu")  # domain sections are checked here


# -- a finished tiny run, copied by each test that damages or edits it ----------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "latentguard", *args]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cli(*args), capture_output=True, text=True, timeout=600)


def _records(run_dir: Path) -> dict[str, dict[str, Any]]:
    records = json.loads((run_dir / "results.json").read_text())["records"]
    return {r["defense"]: flat_metrics(r["metrics"]) for r in records}


def _one_error_line(stderr: str) -> str:
    line = stderr.strip()
    assert line.startswith("latentguard: error:") and "\n" not in line and "Traceback" not in line, stderr
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = _run("run", *TINY_RUN, "--set", "threads=1", "--out", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run copy"  # a space: the printed resume command must quote it
    shutil.copytree(finished, run_dir)
    (run_dir / ".lock").unlink()
    return run_dir


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*.safetensors")}


def _edit(run_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = run_dir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _lat_and_pgd_epsilon(config: dict[str, Any]) -> None:
    next(d for d in config["defenses"] if d["name"] == "lat")["threat"]["epsilon"] = 1.0
    config["evaluation"]["attacks"][0]["epsilon"] = 0.2


# -- 1. resume against an edited config ------------------------------------------------------------------


def test_edited_config_reruns_exactly_what_changed_and_matches_fresh_run(copy: Path, tmp_path: Path) -> None:
    _edit(copy, _lat_and_pgd_epsilon)
    before, results_before = _mtimes(copy), (copy / "results.json").read_bytes()

    strict = _run("run", "--resume", str(copy), "--strict-resume")
    assert strict.returncode == 2
    line = _one_error_line(strict.stderr)
    assert "defense.threat.epsilon: 0.25 → 1.0" in line
    assert "evaluation.attacks.pgd.epsilon: 0.05 → 0.2" in line
    assert _mtimes(copy) == before and (copy / "results.json").read_bytes() == results_before

    resumed = _run("run", "--resume", str(copy), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    notes = [line for line in resumed.stderr.splitlines() if line.startswith("latentguard: note:")]
    retrained = {n.split(":")[2].strip() for n in notes if "safetensors" in n}
    assert retrained == {"seed-0/lat/model.safetensors"}, notes
    assert sum("re-running pgd" in n for n in notes) == 4  # none, clean, at, rlat: that attack alone
    after = _mtimes(copy)
    assert {k for k in before if after[k] != before[k]} == {"seed-0/lat/model.safetensors"}

    fresh = tmp_path / "fresh"
    done = _run("run", str(copy / "config.yaml"), "--out", str(fresh))
    assert done.returncode == 0, done.stderr
    expected, got = _records(fresh), _records(copy)
    assert got.keys() == expected.keys()
    for defense, metrics in expected.items():
        assert got[defense] == pytest.approx(metrics, abs=1e-6), defense
    results = json.loads((copy / "results.json").read_text())
    assert next(r for r in results["records"] if r["defense"] == "lat")["epsilon"] == 1.0

    again = _run("run", "--resume", str(copy), "--strict-resume")  # now everything fits: nothing to redo
    assert again.returncode == 0 and "note" not in again.stderr, again.stderr


def test_changed_base_section_redoes_everything_downstream(copy: Path) -> None:
    from latentguard.config import load_config
    from latentguard.fingerprint import scan

    _edit(copy, lambda c: c["task"].update(base_lr=c["task"]["base_lr"] * 2))
    stale = scan(load_config(copy / "config.yaml"), copy)
    assert stale[0].startswith("seed-0/base.safetensors (task.base_lr:")
    # every defense is built on the base model, every evaluation on its defense
    assert sum("model.safetensors (the base model it was built on)" in s for s in stale) == 5
    assert sum("eval.json (the trained model it was built on)" in s for s in stale) == 5


def test_bookkeeping_settings_redo_nothing(copy: Path) -> None:
    from latentguard.config import load_config
    from latentguard.fingerprint import scan

    _edit(copy, lambda c: c["training"].update(log_every=3, checkpoint_every=5) or c.update(threads=2))
    assert scan(load_config(copy / "config.yaml"), copy) == []


# -- 7. damaged run files ---------------------------------------------------------------------------------


def test_damaged_eval_json_is_rerun_on_resume(copy: Path, finished: Path) -> None:
    (copy / "seed-0" / "lat" / "eval.json").write_text("{}")
    (copy / "results.json").unlink()
    resumed = _run("run", "--resume", str(copy), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "seed-0/lat/eval.json: damaged or incomplete record; re-running this evaluation" in resumed.stderr
    assert _records(copy) == _records(finished)


def test_damaged_train_json_retrains_that_defense(copy: Path, finished: Path) -> None:
    (copy / "seed-0" / "at" / "train.json").write_text('{"seconds": 1}')
    (copy / "results.json").unlink()
    resumed = _run("run", "--resume", str(copy), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "seed-0/at/train.json: damaged or missing record; redoing seed-0/at/model.safetensors"
        in resumed.stderr
    )
    for defense, metrics in _records(finished).items():
        assert _records(copy)[defense] == pytest.approx(metrics, abs=1e-6), defense


@pytest.mark.parametrize("content", ["{}", '{"records": [], "metrics": [], "created": "x"}', "[1, 2]"])
def test_report_refuses_results_that_lack_what_it_needs(copy: Path, content: str) -> None:
    (copy / "results.json").write_text(content)
    report = (copy / "report.md").read_bytes()
    done = _run("report", str(copy))
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "results.json: lacks what a report needs" in line and "report was left as it is" in line
    assert shlex.quote(str(copy)) in line  # the command that rebuilds it, quoted
    assert (copy / "report.md").read_bytes() == report


# -- 9. an unfinished run, locks ---------------------------------------------------------------------------


def test_report_on_an_unfinished_run_says_how_to_finish_it(copy: Path) -> None:
    (copy / "results.json").unlink()
    evaluation = next(copy.glob("seed-0/*/eval.json"))
    evaluation.unlink()  # one point not done: the run is unfinished
    done = _run("report", str(copy))
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "this run is unfinished: 1 of" in line and evaluation.parent.name in line
    assert f"finish it with: latentguard run --resume '{copy}'" in line


def test_report_of_a_run_whose_points_are_all_done_writes_it(copy: Path) -> None:
    report = (copy / "report.md").read_text()
    (copy / "results.json").unlink()
    done = _run("report", str(copy))  # e.g. the shards of a job array finished, none wrote the report
    assert done.returncode == 0, done.stderr
    assert (copy / "results.json").is_file() and (copy / "report.md").read_text().split("## Results")[1] == (
        report.split("## Results")[1]
    )


def test_a_second_process_on_a_locked_run_folder_says_who_holds_it(copy: Path) -> None:
    from latentguard.lock import run_lock

    with run_lock(copy, "latentguard run --resume x"):
        done = _run("run", "--resume", str(copy))
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert f"in use by pid {os.getpid()} on {socket.gethostname()} since " in line
    assert "(latentguard run --resume x)" in line
    again = _run("run", "--resume", str(copy))  # released with the block: the resume goes through
    assert again.returncode == 0, again.stderr


def test_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    from latentguard.lock import run_lock

    code = "import sys, time; from pathlib import Path; from latentguard.lock import run_lock\n"
    code += "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"pid {holder.pid} on"), run_lock(tmp_path):
        pass
    holder.kill()
    holder.wait()
    with run_lock(tmp_path):  # no stale lock after a kill
        pass


# -- 3 and 9. SIGTERM in the base model's training: one line, the real folder; the base checkpoint resumes -


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 240) -> None:
    start = time.monotonic()
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path.name} appeared: {process.communicate()[1]}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def test_sigterm_in_base_training_prints_where_and_resume_matches(tmp_path: Path, finished: Path) -> None:
    run_dir = tmp_path / "killed run"
    process = subprocess.Popen(
        _cli("run", *TINY_RUN, "--set", "threads=1", "--out", str(run_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(run_dir / "seed-0" / "base.checkpoint.safetensors", process)  # base training checkpoints now
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    line = stderr.strip()
    assert "\n" not in line and "Traceback" not in line, stderr
    assert line == (
        "latentguard: stopped by SIGTERM (seed 0: training the base model (implanting the trojans)); "
        f"continue with: latentguard run --resume '{run_dir}'"
    )
    assert not (run_dir / "seed-0" / "base.safetensors").exists()
    assert not list(run_dir.rglob("*.tmp"))  # no torn file
    resumed = _run("run", "--resume", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    for defense, metrics in _records(finished).items():
        assert _records(run_dir)[defense] == pytest.approx(metrics, abs=1e-6), defense


# -- 4. evaluation progress ---------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [True, False])
def test_evaluation_shows_a_bar_per_model_over_its_attacks_unless_disabled(
    capsys: pytest.CaptureFixture[str], progress: bool
) -> None:
    from blobs_task import BlobConfig, BlobTask

    from latentguard.config import DefenseSpec, EvaluationConfig
    from latentguard.engine.attack import PGDConfig
    from latentguard.evaluate import evaluate

    task = BlobTask(BlobConfig(), seed=0, device="cpu")
    pgd = PGDConfig(steps=2)
    config = EvaluationConfig(latent_layers=["stem", "block"], latent_pgd=pgd, latent_examples=32)
    model = task.build_model()
    evaluate(model, task, config, DefenseSpec(name="none", kind="none"), 0, progress=progress)
    err = capsys.readouterr().err
    if progress:
        assert "seed 0 none eval" in err and "latent/block" in err and "4/5" in err and "sanity" in err
    else:
        assert err == ""


# -- 6. a full disk, a read-only folder ---------------------------------------------------------------------


def test_full_disk_ends_in_one_line_no_torn_file_and_resume_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], finished: Path
) -> None:
    from safetensors import SafetensorError

    import latentguard.runs
    from latentguard.cli import main

    real_save = latentguard.runs.save_file

    def full_disk(tensors: dict[str, Any], filename: str, metadata: dict[str, str]) -> None:
        if f"{os.sep}lat{os.sep}" in filename:  # the disk fills up while lat trains
            Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the error safetensors raises
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(latentguard.runs, "save_file", full_disk)
    run_dir = tmp_path / "full"
    assert main(["run", *TINY_RUN, "--set", "threads=1", "--out", str(run_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        f"latentguard: error: {run_dir}/seed-0/lat: cannot write (No space left on device); free space "
        f"(or make the folder writable), then: latentguard run --resume {run_dir}"
    )
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]  # no torn file
    assert not (run_dir / "seed-0" / "lat" / "checkpoint.safetensors").exists()

    monkeypatch.undo()  # space freed
    resumed = _run("run", "--resume", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    for defense, metrics in _records(finished).items():
        assert _records(run_dir)[defense] == pytest.approx(metrics, abs=1e-6), defense


def test_read_only_folder_report_is_one_line(
    copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import tempfile

    from latentguard.cli import main

    def read_only(*args: Any, dir: str | None = None, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir or "", ".report.md.tmp"))

    report = (copy / "report.md").read_bytes()
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["report", str(copy)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"latentguard: error: {copy}: cannot write (Read-only file system)"
    assert (copy / "report.md").read_bytes() == report


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of our own (root with CAP_SYS_ADMIN only); unmounted afterwards."""
    point = tmp_path / "mnt"
    point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_read_only_run_folder_on_resume_and_as_out_is_one_line(mount_point: Path, finished: Path) -> None:
    run_dir = mount_point / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "results.json").unlink()  # something left to do
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
    resumed = _run("run", "--resume", str(run_dir))
    assert resumed.returncode == 2
    line = _one_error_line(resumed.stderr)
    assert f"{run_dir}: cannot write (Read-only file system)" in line
    assert f"then: latentguard run --resume {run_dir}" in line
    fresh = _run("run", "--quick", "--out", str(mount_point / "new"))
    assert fresh.returncode == 2
    assert _one_error_line(fresh.stderr) == (
        f"latentguard: error: {mount_point}: cannot write (Read-only file system); free space, make the "
        "folder writable or choose another --out"
    )


def test_ctrl_c_names_the_real_folder_and_stage(tmp_path: Path) -> None:
    from latentguard.signals import Interrupted, interruptible

    run_dir = tmp_path / "my run"
    with pytest.raises(Interrupted) as stopped, interruptible(lambda: (run_dir, "starting"), "train"):
        raise KeyboardInterrupt  # before the folder holds a run: nothing to resume
    before = "latentguard: stopped by SIGINT (starting), before the run folder held a run"
    assert stopped.value.message() == before
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    stage = "seed 1: evaluating lat"
    with pytest.raises(Interrupted) as stopped, interruptible(lambda: (run_dir, stage), "train"):
        raise KeyboardInterrupt
    assert stopped.value.exit_code == 130
    assert stopped.value.message() == (
        f"latentguard: stopped by SIGINT (seed 1: evaluating lat); continue with: latentguard train --resume "
        f"'{run_dir}'"
    )
