"""Sweep configs: a ``sweep:`` section with one layer × epsilon grid per defense kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from latentguard.cli import main
from latentguard.config import EMBEDDED, load_config
from latentguard.errors import ConfigError
from latentguard.sweep import SweepGrid, SweepSpec, expand, load_sweep, point_name, with_flags

IMAGE_SWEEP = EMBEDDED / "image_sweep.yaml"


def _write(tmp_path: Path, section: object) -> Path:
    """The embedded default config with ``section`` as its ``sweep:``."""
    data = yaml.safe_load((EMBEDDED / "fmnist.yaml").read_text(encoding="utf-8"))
    data["sweep"] = section
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_image_sweep_config_expands_every_kind() -> None:
    base, spec = load_sweep(IMAGE_SWEEP)
    config = expand(base, spec)
    names = [d.name for d in config.defenses]
    assert names[:2] == ["none", "clean"]
    assert names[2:6] == ["at:eps=0.25", "at:eps=0.5", "at:eps=1", "at:eps=2"]
    lat = [d for d in config.defenses if d.name.startswith("lat@")]
    assert len(lat) == 16 and {d.sites[0] for d in lat} == {"stem", "block1", "block2", "block3"}
    free = [d for d in config.defenses if d.name.startswith("free_lat@")]  # a template swept by its name
    assert [d.name for d in free] == [
        "free_lat@block2:eps=0.1",
        "free_lat@block2:eps=0.5",
        "free_lat@block3:eps=0.1",
        "free_lat@block3:eps=0.5",
    ]
    assert all(d.kind == "lat" and d.options == {"replays": 4} for d in free)
    assert "free_lat" not in names and "lat" not in names  # the templates themselves are not run
    rlat = [d.name for d in config.defenses if d.kind == "rlat"]
    assert rlat == ["rlat@stem:eps=0.5", "rlat@block3:eps=0.5"]
    at = config.defenses[5]
    assert at.sites == [] and at.threat is not None and at.threat.epsilon == 2.0 and at.threat.norm == "l2"
    assert at.pgd.steps == 3 and at.clean_weight == 0.5  # the rest comes from the template
    assert len(config.seeds) >= 5 and config.threads == 1
    assert config.name == "fmnist-image-sweep"


def test_set_overrides_reach_the_sweep_section_and_the_run_config() -> None:
    base, spec = load_sweep(IMAGE_SWEEP, ["sweep.lat.epsilons=[0.3]", "training.steps=7"])
    assert (
        "lat" in spec.grids()
        and spec.grids()["lat"].epsilons == [0.3]
        and spec.grids()["lat"].layers == ["stem", "block1", "block2", "block3"]
    )
    assert base.training.steps == 7
    assert next(d.name for d in expand(base, spec).defenses if d.kind == "lat") == "lat@stem:eps=0.3"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"lat": {"epsilon": [0.1]}}, r"sweep\.lat\.epsilon: unknown key"),
        ({"at": {"epsilons": [0.0]}}, r"sweep\.at\.epsilons\.0: .*greater than 0"),
        ({"lat": {"layers": []}}, r"sweep\.lat\.layers"),
        ({"bogus": {"epsilons": [1]}}, r"sweep\.bogus: no template to copy: no defense named .bogus."),
        ({"none": {"epsilons": [1]}}, r"sweep\.none: defense .none. has no threat to sweep"),
    ],
)
def test_bad_sweep_sections_name_the_field(tmp_path: Path, section: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(tmp_path, section))


def test_cli_reports_a_bad_sweep_section_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", str(_write(tmp_path, {"at": {"epsilons": [-1]}}))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentguard: error: sweep.at.epsilons.0") and len(err.splitlines()) == 1


def test_flags_change_one_kind_and_default_to_lat_over_the_stages() -> None:
    spec = SweepSpec({"at": SweepGrid(epsilons=[1.0]), "lat": SweepGrid(layers=["block2"], epsilons=[0.5])})
    assert with_flags(spec, "lat", [], []) == spec
    changed = with_flags(spec, "at", [], [0.5, 2.0])
    assert changed.grids()["at"] == SweepGrid(epsilons=[0.5, 2.0])
    assert changed.grids()["lat"] == spec.grids()["lat"]
    assert with_flags(spec, "lat", [], [0.1]).grids()["lat"] == SweepGrid(layers=["block2"], epsilons=[0.1])
    assert with_flags(SweepSpec(), "lat", [], []) == SweepSpec({"lat": SweepGrid()})
    config = expand(load_config(), with_flags(SweepSpec(), "lat", [], []))
    assert [d.name for d in config.defenses if d.kind == "lat"] == [
        point_name("lat", layer, 0.25) for layer in ("stem", "block1", "block2", "block3")
    ]


def test_at_points_on_named_layers_and_name_clashes() -> None:
    base = load_config()
    config = expand(base, SweepSpec({"at": SweepGrid(layers=["input"], epsilons=[0.5])}))
    assert [(d.name, d.sites) for d in config.defenses if d.kind == "at"] == [("at@input:eps=0.5", ["input"])]
    clash = load_config(overrides=["defenses.none.name=lat@block2:eps=0.25"])
    with pytest.raises(ConfigError, match=r"repeated: lat@block2:eps=0\.25"):
        expand(clash, SweepSpec({"lat": SweepGrid(layers=["block2"])}))


def test_a_grid_keyed_by_a_defense_name_sweeps_that_defense_and_keeps_the_others() -> None:
    base = load_config(overrides=["defenses.lat.name=noisy_lat"])
    config = expand(base, SweepSpec({"noisy_lat": SweepGrid(layers=["block1"], epsilons=[0.2])}))
    point = next(d for d in config.defenses if d.name == "noisy_lat@block1:eps=0.2")
    assert point.kind == "lat" and point.sites == ["block1"] and point.threat.epsilon == 0.2
    assert "noisy_lat" not in [d.name for d in config.defenses]
    assert [d.name for d in base.defenses if d.name != "noisy_lat"] == [
        d.name for d in config.defenses if d is not point
    ]
