"""Config tests: the embedded default, --quick and --set overrides, one-line errors, the CLI's exit code."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentguard.cli import EXIT_USER_ERROR, main
from latentguard.config import DEFAULT_CONFIG, RunConfig, load_config, read_yaml
from latentguard.errors import ConfigError


def by_name(config: RunConfig, name: str) -> Any:
    return next(d for d in config.defenses if d.name == name)


def config_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- loading and overrides -----------------------------------------------------------------------------------
def test_embedded_default_config_loads() -> None:
    assert DEFAULT_CONFIG.is_file()
    config = load_config()
    assert config.name == "fmnist"
    assert config.task["kind"] == "image_cls"
    assert [d.name for d in config.defenses] == ["none", "clean", "at", "lat", "rlat"]
    lat = by_name(config, "lat")
    assert lat.kind == "lat" and lat.sites == ["block2"]
    assert lat.threat.norm == "l2" and lat.threat.epsilon_mode == "relative"
    assert lat.pgd.steps == 5
    assert config.training.steps == 160
    assert config.batch_size == 128
    assert load_config(DEFAULT_CONFIG) == config


def test_quick_overrides_apply() -> None:
    full = load_config()
    quick = load_config(quick=True)
    assert quick.training.steps == 12 and full.training.steps == 160
    assert quick.training.checkpoint_every == 6
    assert quick.batch_size == 64
    assert quick.task["base_train_size"] == 4000 and full.task["base_train_size"] == 50000
    assert quick.evaluation.latent_pgd.steps == 5
    attacks = {a["name"]: a for a in quick.evaluation.attacks}
    assert attacks["pgd_linf"]["examples"] == 100
    assert attacks["square_linf"]["queries"] == 50
    assert quick.defenses == full.defenses  # untouched sections stay as they were


def test_set_overrides_by_dotted_path_and_list_item_name() -> None:
    config = load_config(
        overrides=[
            "training.steps=7",
            "training.lr=0.01",
            "defenses.lat.pgd.steps=3",
            "defenses.lat.sites=[block1, block3]",
            "defenses.3.clean_weight=0.25",
            "evaluation.attacks.pgd_l2.epsilon=0.5",
            "seeds=[1, 2]",
        ]
    )
    assert config.training.steps == 7
    assert config.training.lr == pytest.approx(0.01)
    lat = by_name(config, "lat")
    assert lat.pgd.steps == 3
    assert lat.sites == ["block1", "block3"]
    assert lat.clean_weight == 0.25
    assert by_name(config, "at").pgd.steps == 5  # only the named item changes
    assert by_name(config, "rlat").sites == ["block2"]
    assert next(a for a in config.evaluation.attacks if a["name"] == "pgd_l2")["epsilon"] == 0.5
    assert config.seeds == [1, 2]


def test_set_is_applied_after_quick() -> None:
    config = load_config(quick=True, overrides=["training.steps=3"])
    assert config.training.steps == 3
    assert config.batch_size == 64


def test_load_config_does_not_mutate_the_data_it_is_given() -> None:
    data = read_yaml(DEFAULT_CONFIG)
    snapshot = copy.deepcopy(data)
    load_config(data=data, quick=True, overrides=["defenses.lat.pgd.steps=3", "task.width=8"])
    assert data == snapshot


# -- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "path", "words"),
    [
        ("training.foo=1", "training.foo", "unknown key"),
        ("bogus=1", "bogus", "unknown key"),
        ("defenses.lat.threat.radius=2", "defenses.3.threat.radius", "unknown key"),
        ("training.steps=abc", "training.steps", "integer"),
        ("batch_size=[1, 2]", "batch_size", "integer"),
        ("defenses.lat.threat.epsilon=-1", "defenses.3.threat.epsilon", "greater than 0"),
        ("defenses.lat.pgd.steps=0", "defenses.3.pgd.steps", "greater than or equal to 1"),
        ("training.steps=0", "training.steps", "greater than or equal to 1"),
        ("defenses.lat.threat.norm=l3", "defenses.3.threat.norm", "l2"),
        ("defenses.lat.kind=magic", "defenses.3.kind", "magic"),
        ("defenses.at.threat.bounds=[1, 0]", "defenses.2.threat", "low < high"),
        ("device=tpu", "device", "tpu"),
    ],
)
def test_bad_values_name_the_field(override: str, path: str, words: str) -> None:
    message = config_error(overrides=[override])
    assert message.startswith(f"{path}:"), message
    assert words in message


def test_duplicate_defense_names_name_the_defenses_field() -> None:
    message = config_error(overrides=["defenses.rlat.name=lat"])
    assert "lat" in message
    assert message.startswith("defenses"), message


def test_missing_required_key_names_it() -> None:
    data = read_yaml(DEFAULT_CONFIG)
    del data["defenses"]
    assert config_error(data=data).startswith("defenses: required key is missing")


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("defenses.nope.pgd.steps=3", "defenses.nope: no list item named 'nope'"),
        ("defenses.9.kind=lat", "defenses.9: index out of range"),
        ("name.first=x", "name.first: cannot set a key inside a str"),
        ("training.steps", "expected key=value"),
        ("=3", "expected key=value"),
        ("training.steps=[1", "not valid YAML"),
    ],
)
def test_bad_overrides(override: str, words: str) -> None:
    assert words in config_error(overrides=[override])


def test_malformed_list_index_is_a_config_error() -> None:
    """`int()` of a token that only looks numeric after lstrip('-') must not escape as ValueError."""
    assert "defenses" in config_error(overrides=["defenses.--1.name=x"])


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = config_error(missing)
    assert str(missing) in message and "not found" in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: x\ndefenses: [1, 2\n", "not valid YAML at line"),
        ("- just\n- a list\n", "mapping"),
        ("", "mapping"),
        ("name: !!python/object:os.system x\n", "not valid YAML"),
    ],
    ids=["syntax", "list", "empty", "python-tag"],
)
def test_invalid_yaml(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = config_error(path)
    assert str(path) in message and words in message


def test_unreadable_config_paths(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert "cannot read" in config_error(binary)
    assert str(tmp_path) in config_error(tmp_path)  # a folder, not a file


def test_quick_block_must_be_a_mapping() -> None:
    data = read_yaml(DEFAULT_CONFIG)
    data["quick"] = ["training.steps=3"]
    assert config_error(data=data, quick=True).startswith("quick")


# -- CLI -----------------------------------------------------------------------------------------------------
def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("latentguard: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert "not valid YAML" in _cli_error(capsys, ["run", str(bad)])
    assert "not found" in _cli_error(capsys, ["train", str(tmp_path / "missing.yaml")])
    line = _cli_error(capsys, ["run", "--set", "defenses.lat.pgd.steps=0"])
    assert "defenses.3.pgd.steps" in line
    line = _cli_error(capsys, ["sweep", "--quick", "--set", "training.what=1"])
    assert "training.what: unknown key" in line


def test_cli_debug_shows_the_exception(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError):
        main(["--debug", "run", "--set", "training.steps=0"])


# -- property: malformed configs only ever raise ConfigError -------------------------------------------------
def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a nested config (list items by index), containers included."""
    found: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = (*prefix, key)
        found.append(path)
        found.extend(_paths(value, path))
    return found


BASE = read_yaml(DEFAULT_CONFIG)
KNOWN = _paths(BASE)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["lat", "l2", "linf", "relative", "cpu", "cuda:0", "block2", "input", "1e-3", "-1", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
extra_keys = st.text(alphabet="abcxyz_0129", min_size=1, max_size=8)


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def _containers(data: Any) -> list[Any]:
    found = [data]
    for path in _paths(data):
        value = _get(data, path)
        if isinstance(value, dict):
            found.append(value)
    return found


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    changes=st.lists(st.tuples(st.sampled_from(KNOWN), values), max_size=4),
    extras=st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), extra_keys, values), max_size=2),
    quick=st.booleans(),
)
def test_malformed_configs_raise_only_config_error(
    changes: list[tuple[tuple[Any, ...], Any]], extras: list[tuple[int, str, Any]], quick: bool
) -> None:
    data = copy.deepcopy(BASE)
    for path, value in changes:
        try:
            parent = _get(data, path[:-1])
            parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change replaced a container on this path
    for index, key, value in extras:
        holders = _containers(data)
        holders[index % len(holders)][key] = value
    try:
        config = load_config(data=data, quick=quick)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return
    assert isinstance(config, RunConfig)
