"""Typed run configs: YAML in, validated models out, one-line errors naming the field.

The ``task`` section and the held-out ``evaluation.attacks`` belong to a domain: they are kept as raw
mappings here and validated by the domain's own models (errors still name ``task.…``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from latentguard.config_checks import DuplicateKeyError, load_yaml, reject_nonfinite
from latentguard.defenses.base import DefenseConfig
from latentguard.engine.attack import PGDConfig
from latentguard.engine.threat import UNION_TAGS, Threat
from latentguard.engine.trainer import TrainConfig
from latentguard.errors import ConfigError
from latentguard.registry import Registry, load_plugins

EMBEDDED = Path(__file__).parent / "configs"
DEFAULT_CONFIG = EMBEDDED / "fmnist.yaml"


class DefenseSpec(DefenseConfig):
    """A defense in a run: a trainer setting plus a unique name for tables and folders."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.@:=+-]+$", description="letters, digits and _.@:=+-")


class EvaluationConfig(BaseModel):
    """Held-out evaluation: domain attacks from independent libraries plus latent PGD at other layers."""

    model_config = ConfigDict(extra="forbid")

    attacks: list[dict[str, Any]] = Field(default_factory=list, description="domain attack specs")
    latent_layers: list[str] = Field(default_factory=list)
    latent_threat: Threat = Threat(norm="l2", epsilon=1.0, epsilon_mode="relative")
    latent_pgd: PGDConfig = PGDConfig(steps=20)
    latent_examples: int = Field(500, ge=1)
    sanity_examples: int = Field(128, ge=2)
    batch_size: int = Field(250, ge=1)
    implant_threshold: float = Field(
        0.5, ge=0, le=1, description="a trojan whose undefended ASR is below this did not implant: flagged"
    )


class RunConfig(BaseModel):
    """Everything one ``latentguard run`` needs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    plugins: list[str] = Field(
        default_factory=list, description="modules imported first: they register tasks, triggers, attacks..."
    )
    task: dict[str, Any]
    defenses: list[DefenseSpec] = Field(..., min_length=1)
    training: TrainConfig = TrainConfig()
    batch_size: int = Field(128, ge=1)
    evaluation: EvaluationConfig = EvaluationConfig()
    seeds: list[int] = Field([0], min_length=1)
    device: str = "cpu"
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads; set it when other jobs share the cores (default: torch's)"
    )
    allow_repeated_sites: list[str] = Field(
        default_factory=list,
        description="sites whose module may run more than once per forward (each call gets the same δ)",
    )
    output_dir: Path = Path("runs")
    tensorboard: bool = False
    progress: bool = True
    quick: dict[str, Any] = Field(default_factory=dict, description="overrides applied by --quick")

    @field_validator("task")
    @classmethod
    def _task_kind(cls, task: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(task.get("kind"), str):
            raise ValueError("task needs a 'kind' (e.g. image_cls)")
        return task

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not (device == "cpu" or device.startswith(("cuda", "mps"))):
            raise ValueError(f"expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
        return device

    @field_validator("defenses")
    @classmethod
    def _unique_names(cls, defenses: list[DefenseSpec]) -> list[DefenseSpec]:
        names = [d.name for d in defenses]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"defense names must be unique; repeated: {', '.join(dupes)}")
        return defenses

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be unique")
        return seeds


def _problem(error: Any, prefix: str) -> str:
    parts = (*([prefix] if prefix else []), *(part for part in error["loc"] if part not in UNION_TAGS))
    where = ".".join(str(part) if str(part).isprintable() else repr(part) for part in parts) or "config"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    if (
        "input" in error
        and error["type"] not in ("missing", "extra_forbidden")
        and not isinstance(error["input"], dict)
    ):
        shown = repr(error["input"])
        message += f" (got {shown[:60]})"
    return f"{where}: {message}"


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Every problem as ``field.path: what was expected``, unknown keys first, on one line."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # stable
    return "; ".join(dict.fromkeys(_problem(error, prefix) for error in errors))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. training.steps=100")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"--set {text!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path]``; list items are addressed by index or by their ``name``."""
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where)
            if last:
                node[index] = value
                return
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{where}: cannot set a key inside a {type(node).__name__} value")


def _list_index(items: list[Any], part: str, where: str) -> int:
    if re.fullmatch(r"-?[0-9]+", part):
        index = int(part)
        if -len(items) <= index < len(items):
            return index
        raise ConfigError(f"{where}: index out of range (list has {len(items)} items)")
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    raise ConfigError(f"{where}: no list item named {part!r}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__})") from None
    try:
        data = load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def load_config(
    path: Path | None = None,
    overrides: Iterable[str] = (),
    *,
    quick: bool = False,
    data: Mapping[str, Any] | None = None,
    plugins: Iterable[str] = (),
) -> RunConfig:
    """Read, override and validate a run config (the embedded default when no path is given). ``plugins``
    (``--plugin``) join the config's own, and all are imported before anything is validated."""
    raw = copy.deepcopy(dict(data)) if data is not None else read_yaml(path or DEFAULT_CONFIG)
    if quick:
        quick_overrides = raw.get("quick") or {}
        if not isinstance(quick_overrides, dict):
            raise ConfigError("quick: expected a mapping of dotted keys to values")
        for key, value in quick_overrides.items():
            apply_override(raw, str(key).split("."), value)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    modules = raw.get("plugins") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError("plugins: expected a list of module names, e.g. [my_package.plugins]")
    raw["plugins"] = list(dict.fromkeys([*modules, *plugins]))
    load_plugins(raw["plugins"])
    reject_nonfinite(raw)  # `.inf` / `.nan` in YAML, before anything is built from them
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    reject_nonfinite(config)  # also "inf" / "nan" strings that a float field parsed
    return config


def validate_section(model: type[BaseModel], data: Any, prefix: str) -> Any:
    """Validate a domain-owned section, naming fields from the config root in errors."""
    try:
        valid = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix)) from None
    reject_nonfinite(valid, prefix)
    return valid


def validate_attacks(kinds: type[BaseModel] | Registry[Any], attacks: list[Any]) -> list[Any]:
    """A domain's ``evaluation.attacks``, each validated by its spec model (a ``Registry`` of spec models:
    the one its ``kind`` names), with unique names: results are keyed by attack name."""
    specs = []
    for i, spec in enumerate(attacks):
        where = f"evaluation.attacks.{i}"
        model = kinds
        if isinstance(kinds, Registry):
            kind = spec.get("kind") if isinstance(spec, dict) else None
            if not isinstance(kind, str):
                raise ConfigError(
                    f"{where}.kind: required key is missing (one of {', '.join(kinds.names())})"
                )
            model = kinds.get(kind, f"{where}.kind")
        specs.append(validate_section(model, spec, where))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError("evaluation.attacks: attack names must be unique")
    return specs


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
