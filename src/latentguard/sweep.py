"""Expand a run config into a sweep: chosen defense kinds over layer × epsilon grids, over seeds.

A sweep config is a run config plus a ``sweep:`` section with one grid per swept defense kind::

    sweep:
      at: {epsilons: [0.5, 1, 2, 3]}                                   # input space, as the template
      lat: {layers: [stem, block1, block2, block3], epsilons: [0.1, 0.25, 0.5, 1]}

Every grid point copies the config's defense of that kind (its template) with one layer and one epsilon,
named ``kind@layer:eps=E`` (``kind:eps=E`` when the template's sites are kept), so that tables and plots can
group the points of one family and label them by budget. Defenses of kinds not swept are kept as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, RootModel, ValidationError, field_validator

from latentguard.config import (
    DEFAULT_CONFIG,
    DefenseSpec,
    RunConfig,
    apply_override,
    format_validation_error,
    load_config,
    parse_override,
    read_yaml,
    validate_section,
)
from latentguard.defenses import defense_for
from latentguard.domains import task_class
from latentguard.engine.threat import Threat
from latentguard.errors import ConfigError
from latentguard.registry import DEFENSES

SECTION = "sweep"


class SweepGrid(BaseModel):
    """One defense kind swept over layers × epsilons."""

    model_config = ConfigDict(extra="forbid")

    layers: list[str] | None = Field(
        None, min_length=1, description="default: the task's named stages (lat, rlat); the template's (at)"
    )
    epsilons: list[PositiveFloat] | None = Field(None, min_length=1, description="default: the template's")


class SweepSpec(RootModel[dict[str, SweepGrid]]):
    """The ``sweep:`` section: a grid for each defense kind to sweep (any registered kind that perturbs)."""

    root: dict[str, SweepGrid] = Field(default_factory=dict)

    @field_validator("root")
    @classmethod
    def _perturbing_kinds(cls, grids: dict[str, SweepGrid]) -> dict[str, SweepGrid]:
        for kind in grids:
            if kind not in DEFENSES:
                raise ValueError(f"unknown defense {kind!r}; registered: {', '.join(DEFENSES.names())}")
            if not defense_for(kind).perturbs:
                raise ValueError(f"defense {kind!r} has no threat to sweep")
        return grids

    def grids(self) -> dict[str, SweepGrid]:
        return dict(self.root)


def point_name(kind: str, layer: str | None, epsilon: float) -> str:
    """``lat@block2:eps=0.5``; ``at:eps=1`` when the point keeps its template's sites."""
    where = f"@{layer}" if layer else ""
    return f"{kind}{where}:eps={epsilon:g}"


def expand(base: RunConfig, spec: SweepSpec, seeds: Iterable[int] = ()) -> RunConfig:
    """The base config's non-swept defenses, then every grid point of ``spec`` (kind by kind)."""
    kept = [d for d in base.defenses if d.kind not in spec.grids()]
    swept = [point for kind, grid in spec.grids().items() for point in _points(base, kind, grid)]
    fields = base.model_dump() | {
        "defenses": [d.model_dump(exclude_unset=True) for d in kept + swept],
        "seeds": list(seeds) or base.seeds,
        "name": f"{base.name}-sweep",
    }
    try:
        return RunConfig.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _points(base: RunConfig, kind: str, grid: SweepGrid) -> list[DefenseSpec]:
    template = next((d for d in base.defenses if d.kind == kind), None)
    if template is None or template.threat is None:
        raise ConfigError(f"defenses: sweeping {kind!r} needs one {kind} defense in the config as a template")
    if not isinstance(template.threat, Threat):
        raise ConfigError(
            f"defenses.{template.name}.threat: a swept template needs one threat, not one per site"
        )
    if grid.layers:
        layers: list[str | None] = list(grid.layers)
    elif not defense_for(kind).needs_sites:
        layers = [None]  # e.g. input-space AT: the pipeline fills in the task's input site
    else:
        layers = list(task_class(base.task["kind"]).default_layers)
    points = []
    for layer in layers:
        for epsilon in grid.epsilons or [template.threat.epsilon]:
            fields = template.model_dump(exclude_unset=True) | {"name": point_name(kind, layer, epsilon)}
            fields["threat"] = template.threat.model_copy(update={"epsilon": epsilon})
            if layer is not None:
                fields["sites"] = [layer]
            points.append(DefenseSpec.model_validate(fields))
    return points


def sweep_config(
    base: RunConfig, *, layers: list[str], epsilons: list[float], seeds: list[int], kind: str = "lat"
) -> RunConfig:
    """The base config's non-swept defenses plus ``kind`` at every (layer, epsilon)."""
    grid = SweepGrid(layers=layers or None, epsilons=epsilons or None)
    return expand(base, SweepSpec.model_validate({kind: grid}), seeds)


def load_sweep(
    path: Path | None = None,
    overrides: Iterable[str] = (),
    *,
    quick: bool = False,
    plugins: Iterable[str] = (),
) -> tuple[RunConfig, SweepSpec]:
    """Read a sweep config: the run config (validated as usual) and its ``sweep:`` section.

    ``--set`` overrides whose key starts with ``sweep.`` change the section; the others the run config.
    """
    raw = read_yaml(path or DEFAULT_CONFIG)
    section = {SECTION: raw.pop(SECTION, None) or {}}
    rest = []
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == SECTION:
            apply_override(section, keys, value)
        else:
            rest.append(text)
    base = load_config(overrides=rest, quick=quick, data=raw, plugins=plugins)
    return base, validate_section(SweepSpec, section[SECTION], SECTION)


def with_flags(spec: SweepSpec, kind: str, layers: list[str], epsilons: list[float]) -> SweepSpec:
    """``spec`` with ``kind``'s grid changed by command-line flags; LAT over the named stages if all empty."""
    if not (layers or epsilons) and spec.grids():
        return spec
    grid = spec.grids().get(kind) or SweepGrid()
    update = {"layers": layers or grid.layers, "epsilons": epsilons or grid.epsilons}
    return SweepSpec.model_validate({**spec.grids(), kind: SweepGrid.model_validate(update)})
