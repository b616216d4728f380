"""Issue 21: resume against an edited config, signals, locks, full and read-only disks, damaged run files,
duplicate YAML keys and non-finite numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentguard.config import load_config
from latentguard.errors import ConfigError

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
