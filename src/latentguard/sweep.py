"""Expand a run config into a sweep: one LAT (or RLAT) defense per layer × epsilon, over seeds."""

from __future__ import annotations

from latentguard.config import DefenseSpec, RunConfig
from latentguard.domains import task_class
from latentguard.errors import ConfigError


def sweep_config(
    base: RunConfig, *, layers: list[str], epsilons: list[float], seeds: list[int], kind: str = "lat"
) -> RunConfig:
    """The base config's non-swept defenses plus ``kind`` at every (layer, epsilon)."""
    template = next((d for d in base.defenses if d.kind == kind), None)
    if template is None:
        raise ConfigError(f"defenses: sweeping {kind!r} needs one {kind} defense in the config as a template")
    layers = layers or list(task_class(base.task["kind"]).default_layers)
    epsilons = epsilons or [template.threat.epsilon]  # type: ignore[union-attr]
    swept = []
    for layer in layers:
        for epsilon in epsilons:
            threat = template.threat.model_copy(update={"epsilon": epsilon})  # type: ignore[union-attr]
            fields = template.model_dump() | {"name": f"{kind}@{layer}:eps={epsilon:g}", "sites": [layer]}
            fields["threat"] = threat
            swept.append(DefenseSpec.model_validate(fields))
    kept = [d for d in base.defenses if d.kind != kind]
    return base.model_copy(
        update={"defenses": kept + swept, "seeds": seeds or base.seeds, "name": f"{base.name}-sweep"}
    )
