"""The sweep expansion and the step-by-step metric logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentguard.config import load_config
from latentguard.errors import ConfigError
from latentguard.runs import MetricLog
from latentguard.sweep import sweep_config


def test_sweep_expands_layers_by_epsilons_and_keeps_baselines() -> None:
    base = load_config()
    config = sweep_config(base, layers=["stem", "block3"], epsilons=[0.1, 0.4], seeds=[0, 1], kind="lat")
    names = [d.name for d in config.defenses]
    assert names[:4] == ["none", "clean", "at", "rlat"]
    assert names[4:] == ["lat@stem:eps=0.1", "lat@stem:eps=0.4", "lat@block3:eps=0.1", "lat@block3:eps=0.4"]
    swept = config.defenses[-1]
    assert swept.sites == ["block3"] and swept.threat is not None and swept.threat.epsilon == 0.4
    assert swept.pgd == base.defenses[3].pgd  # everything else comes from the template
    assert config.seeds == [0, 1]


def test_sweep_defaults_to_the_tasks_named_stages() -> None:
    config = sweep_config(load_config(), layers=[], epsilons=[], seeds=[], kind="lat")
    assert [d.sites[0] for d in config.defenses if d.kind == "lat"] == ["stem", "block1", "block2", "block3"]


def test_sweep_needs_a_template_defense() -> None:
    base = load_config(overrides=["defenses=[{name: clean, kind: clean}]"])
    with pytest.raises(ConfigError, match="template"):
        sweep_config(base, layers=["stem"], epsilons=[0.1], seeds=[], kind="lat")


def test_metric_log_writes_json_lines_and_tensorboard(tmp_path: Path) -> None:
    log = MetricLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    write = log.writer("seed-0/lat")
    write({"step": 1, "loss": 0.5})
    write({"step": 2, "loss": 0.25})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"phase": "seed-0/lat", "step": 1, "loss": 0.5},
        {"phase": "seed-0/lat", "step": 2, "loss": 0.25},
    ]
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
