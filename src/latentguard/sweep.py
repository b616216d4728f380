"""Expand a run config into a sweep: chosen defense kinds over layer × epsilon grids, over seeds.

A sweep config is a run config plus a ``sweep:`` section with one grid per swept template::

    sweep:
      at: {epsilons: [0.5, 1, 2, 3]}                                   # input space, as the template
      lat: {layers: [stem, block1, block2, block3], epsilons: [0.1, 0.25, 0.5, 1]}
      free_lat: {layers: [block2], epsilons: [0.5]}                    # the defense *named* free_lat

A grid's key names its template: the config's defense of that name, else its first defense of that kind.
Every grid point copies the template with one layer and one epsilon, named ``key@layer:eps=E``
(``key:eps=E`` when the template's sites are kept), so that tables and plots can group the points of one
family and label them by budget. Defenses that are no grid's template are kept as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, RootModel, ValidationError

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
    """The ``sweep:`` section: a grid per template, keyed by a defense's name or kind (checked by
    :func:`templates` against the run config)."""

    root: dict[str, SweepGrid] = Field(default_factory=dict)

    def grids(self) -> dict[str, SweepGrid]:
        return dict(self.root)


def templates(base: RunConfig, spec: SweepSpec) -> dict[str, DefenseSpec]:
    """Each grid's template: the defense named like the grid's key, else the first of that kind."""
    found = {}
    for key in spec.grids():
        template = next((d for d in base.defenses if d.name == key), None)
        if template is None:
            template = next((d for d in base.defenses if d.kind == key), None)
        if template is None:
            known = ", ".join(d.name for d in base.defenses)
            kind = "" if key in DEFENSES else f"; registered kinds: {', '.join(DEFENSES.names())}"
            raise ConfigError(
                f"sweep.{key}: no template to copy: no defense named {key!r} and none of kind {key!r} in"
                f" defenses ({known}){kind}"
            )
        if not defense_for(template.kind).perturbs:
            raise ConfigError(f"sweep.{key}: defense {template.kind!r} has no threat to sweep")
        if template.threat is None:
            raise ConfigError(f"sweep.{key}: the template {template.name!r} needs a threat to sweep")
        if not isinstance(template.threat, Threat):
            raise ConfigError(
                f"defenses.{template.name}.threat: a swept template needs one threat, not one per site"
            )
        found[key] = template
    return found


def point_name(kind: str, layer: str | None, epsilon: float) -> str:
    """``lat@block2:eps=0.5``; ``at:eps=1`` when the point keeps its template's sites."""
    where = f"@{layer}" if layer else ""
    return f"{kind}{where}:eps={epsilon:g}"


def expand(base: RunConfig, spec: SweepSpec, seeds: Iterable[int] = ()) -> RunConfig:
    """The base config's defenses that are no template, then every grid point of ``spec`` (grid by grid)."""
    chosen = templates(base, spec)
    kept = [d for d in base.defenses if all(d is not t for t in chosen.values())]
    swept = [p for key, grid in spec.grids().items() for p in _points(base, key, chosen[key], grid)]
    fields = base.model_dump() | {
        "defenses": [d.model_dump(exclude_unset=True) for d in kept + swept],
        "seeds": list(seeds) or base.seeds,
        "name": f"{base.name}-sweep",
    }
    try:
        return RunConfig.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _points(base: RunConfig, key: str, template: DefenseSpec, grid: SweepGrid) -> list[DefenseSpec]:
    assert isinstance(template.threat, Threat)  # checked by templates()
    if grid.layers:
        layers: list[str | None] = list(grid.layers)
    elif not defense_for(template.kind).needs_sites:
        layers = [None]  # e.g. input-space AT: the pipeline fills in the task's input site
    else:
        layers = list(task_class(base.task["kind"]).default_layers)
    points = []
    for layer in layers:
        for epsilon in grid.epsilons or [template.threat.epsilon]:
            fields = template.model_dump(exclude_unset=True) | {"name": point_name(key, layer, epsilon)}
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
    spec = validate_section(SweepSpec, section[SECTION], SECTION)
    templates(base, spec)  # every grid names a defense that can be swept, before anything runs
    return base, spec


def with_flags(spec: SweepSpec, kind: str, layers: list[str], epsilons: list[float]) -> SweepSpec:
    """``spec`` with ``kind``'s grid changed by command-line flags; LAT over the named stages if all empty."""
    if not (layers or epsilons) and spec.grids():
        return spec
    grid = spec.grids().get(kind) or SweepGrid()
    update = {"layers": layers or grid.layers, "epsilons": epsilons or grid.epsilons}
    return SweepSpec.model_validate({**spec.grids(), kind: SweepGrid.model_validate(update)})
