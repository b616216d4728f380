"""A run's points on several processes (parallel.py): local workers, a local Ray cluster and job-array shards
give the sequential sweep's numbers; claims keep processes off each other's points; a worker killed mid-point
is finished by --resume; a failing point is reported without stopping the others.

The sweep is the blob task's (``blobs_task.py``, run as the CLI): 2 seeds × 3 defenses (clean, input-space
AT and one swept LAT point, both with PGD's random start), 8 points with the two base models.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from latentguard.errors import UserError
from latentguard.parallel import (
    HOST,
    LEASE_SECONDS,
    Claim,
    Point,
    all_points,
    parse_shard,
    share,
)
from latentguard.sweep import load_sweep

TASK_SCRIPT = Path(__file__).parent / "blobs_task.py"
CONFIG: dict[str, Any] = {
    "name": "blobs",
    "task": {"kind": "blobs", "train_size": 256, "test_size": 128, "base_steps": 8},
    "defenses": [
        {"name": "clean", "kind": "clean"},
        {"name": "at", "kind": "at", "threat": {"norm": "l2", "epsilon": 0.5}, "pgd": {"steps": 3}},
        {
            "name": "lat",
            "kind": "lat",
            "sites": ["stem"],
            "threat": {"norm": "l2", "epsilon": 0.5, "epsilon_mode": "relative"},
            "pgd": {"steps": 3},
            "clean_weight": 0.5,
        },
    ],
    "sweep": {"lat": {"layers": ["block"], "epsilons": [0.5]}},
    "training": {"steps": 6, "lr": 0.01, "log_every": 1, "checkpoint_every": 2},
    "batch_size": 32,
    "seeds": [0, 1],
    "evaluation": {
        "latent_layers": ["block"],
        "latent_threat": {"norm": "l2", "epsilon": 0.5, "epsilon_mode": "relative"},
        "latent_pgd": {"steps": 3},
        "latent_examples": 64,
        "sanity_examples": 16,
        "batch_size": 64,
    },
    "threads": 1,
    "progress": False,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMPARED = ("seed", "defense", "metrics", "calibration", "sanity", "heldout_details")

pytestmark = pytest.mark.slow


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, str(TASK_SCRIPT), *map(str, args)]


def _run(*args: str | Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _numbers(run_dir: Path) -> list[dict[str, Any]]:
    records = json.loads((run_dir / "results.json").read_text())["records"]
    return [{key: record[key] for key in COMPARED} for record in records]


def _report_tables(run_dir: Path) -> str:
    """report.md without its header (command, dates) and timings: what the numbers make."""
    text = (run_dir / "report.md").read_text()
    return text[text.index("## Training threats") : text.index("## Timings")]


def _claims(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.claim"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parallel") / "blobs.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def sequential(config_file: Path) -> Path:
    """The sweep run one point after another in one process: the reference."""
    out = config_file.parent / "sequential"
    _run("sweep", config_file, "--out", out)
    assert len(_numbers(out)) == 6
    return out


def test_workers_give_the_sequential_numbers(config_file: Path, sequential: Path) -> None:
    out = config_file.parent / "workers"
    process = subprocess.Popen(_cli("sweep", config_file, "--out", out, "--workers", "2"), env=ENV, text=True)
    owners = set()  # the processes that held claims: the points really ran in worker processes
    while process.poll() is None:
        for path in out.glob("seed-*/**/*.claim"):  # the points' claims (the report's is the main process's)
            with contextlib.suppress(OSError, ValueError):  # released meanwhile, or not yet written
                owners.add(json.loads(path.read_text())["pid"])
        time.sleep(0.01)
    assert process.returncode == 0
    assert len(owners) >= 2 and process.pid not in owners, owners
    assert _numbers(out) == _numbers(sequential)
    assert _report_tables(out) == _report_tables(sequential)
    assert not _claims(out) and not (out / "failures.json").exists()


def test_a_local_ray_cluster_gives_the_sequential_numbers(config_file: Path, sequential: Path) -> None:
    out = config_file.parent / "ray"
    _run("sweep", config_file, "--out", out, "--ray")
    assert _numbers(out) == _numbers(sequential)
    assert not _claims(out)


def test_shards_in_parallel_then_report(config_file: Path, sequential: Path) -> None:
    out = config_file.parent / "shards"
    shards = [
        subprocess.Popen(
            _cli("sweep", config_file, "--out", out, "--shard", f"{i}/2"), env=ENV, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    for shard in shards:
        _, err = shard.communicate(timeout=600)
        assert shard.returncode == 0, err.decode()[-3000:]
    assert (out / "report.md").exists()  # the last shard to finish wrote it
    (out / "results.json").unlink()
    (out / "report.md").unlink()
    _run("report", out)  # from the points' files
    assert _numbers(out) == _numbers(sequential)
    assert _report_tables(out) == _report_tables(sequential)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["phase"] == "seed-0/base" and m.get("step") == 8 for m in metrics) == 1  # trained once


def test_report_names_the_missing_points(config_file: Path) -> None:
    out = config_file.parent / "half"
    done = _run("sweep", config_file, "--out", out, "--shard", "1/2")  # seed-0/at, seed-1/clean, seed-1/lat…
    assert "left to other processes" in done.stdout
    failed = _run("report", out, expect=2)
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "3 of 8 points are not done" in lines[0], lines
    assert "seed-0/clean" in lines[0] and "seed-1/at" in lines[0] and "seed-0/at" not in lines[0]


def test_a_failing_point_is_reported_and_the_others_finish(config_file: Path) -> None:
    out = config_file.parent / "failing"
    done = _run(
        "sweep",
        config_file,
        "--out",
        out,
        "--workers",
        "2",
        "--set",
        "defenses.at.clean_weight=1e39",
        expect=1,
    )
    assert "point seed-0/at failed (seed 0, defense {" in done.stderr
    assert '"clean_weight": 1e+39' in done.stderr and "NonFiniteError" in done.stderr
    assert "2 of 8 points failed" in done.stderr.strip().splitlines()[-1]
    failures = json.loads((out / "failures.json").read_text())
    assert [f["point"] for f in failures] == ["seed-0/at", "seed-1/at"]
    assert "Traceback" in failures[0]["traceback"]
    for seed in (0, 1):
        for name in ("clean", "lat@block:eps=0.5"):
            assert (out / f"seed-{seed}" / name / "eval.json").exists()
    assert not (out / "results.json").exists() and not _claims(out)


def test_a_worker_killed_mid_point_is_finished_by_resume(config_file: Path, sequential: Path) -> None:
    out = config_file.parent / "killed"
    process = subprocess.Popen(
        _cli("sweep", config_file, "--out", out, "--workers", "2"), env=ENV, stderr=subprocess.PIPE
    )
    victim = None
    while victim is None and process.poll() is None:
        for path in out.glob("seed-*/*/point.claim"):
            try:
                victim = json.loads(path.read_text())["pid"]
            except (OSError, ValueError):
                continue
            os.kill(victim, signal.SIGKILL)  # a worker, holding the claim of a defense point
            break
        time.sleep(0.005)
    assert victim is not None and victim != process.pid
    _, err = process.communicate(timeout=600)
    assert process.returncode != 0, err.decode()[-2000:]
    assert "a worker process died" in err.decode()
    assert not (out / "results.json").exists()
    assert _claims(out)  # the dead worker's claim is still there: --resume takes it over

    _run("sweep", "--resume", out, "--workers", "2")
    assert _numbers(out) == _numbers(sequential)
    assert not _claims(out) and not (out / "failures.json").exists()


# ------------------------------------------------------------------------------------------ claims, shares
def test_a_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    first, second = Claim(tmp_path / "p.claim"), Claim(tmp_path / "p.claim")
    assert first.acquire()
    assert not second.acquire()  # its owner (this process) is alive
    first.release()
    assert not (tmp_path / "p.claim").exists()
    assert second.acquire()
    second.release()


def test_a_claim_of_a_dead_local_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    path = tmp_path / "p.claim"
    path.write_text(json.dumps({"host": HOST, "pid": int(dead.stdout), "started": None}))
    claim = Claim(path)
    assert claim.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    claim.release()


def test_a_claim_from_another_host_lasts_while_its_heartbeat_does(tmp_path: Path) -> None:
    path = tmp_path / "p.claim"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": None}))
    assert not Claim(path).acquire()
    old = time.time() - LEASE_SECONDS - 1
    os.utime(path, (old, old))
    claim = Claim(path)
    assert claim.acquire()
    claim.release()


def test_shards_cover_every_point_once_with_the_bases_they_need(config_file: Path) -> None:
    config, spec = load_sweep(config_file)
    from latentguard.sweep import expand

    points = all_points(expand(config, spec))
    keys = [p.key for p in points]
    assert keys[:5] == ["seed-0", "seed-0/clean", "seed-0/at", "seed-0/lat@block:eps=0.5", "seed-1"]
    for count in (1, 2, 3, 5, 9):
        shares = [share(points, (i, count)) for i in range(count)]
        assert sorted(p.key for mine in shares for p in mine if p.defense) == sorted(keys[1:4] + keys[5:])
        assert sum(len(mine) for mine in shares) >= len(points)
        for mine in shares:
            assert {p.base for p in mine} <= set(mine)
            assert [p for p in points if p in mine] == mine  # in the sequential order
    assert [p.key for p in share(points, (1, 2))] == [
        "seed-0",
        "seed-0/at",
        "seed-1",
        "seed-1/clean",
        keys[-1],
    ]
    assert Point(3).key == "seed-3" and Point(3, "lat").base == Point(3)


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_a_bad_shard_is_a_one_line_error(text: str) -> None:
    with pytest.raises(UserError, match="--shard: expected I/N"):
        parse_shard(text)
    assert parse_shard("3/8") == (3, 8)
