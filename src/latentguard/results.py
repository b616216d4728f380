"""The typed results schema: what the pipeline writes to ``results.json`` and the report reads.

Metrics are keyed by ``(group, name)``: ``clean`` (clean performance), ``trojan`` (attack success rate per
trojan), ``heldout`` (robust score per held-out attack) and ``latent`` (robust score under latent PGD per
layer). Which defenses trained on a threat is declared once, on the metric (``seen_by``), never recovered
from a key's spelling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latentguard.errors import UserError

GROUPS = ("clean", "trojan", "heldout", "latent")
Metrics = dict[str, dict[str, float | None]]  # group -> name -> value (None: not measured)


class MetricSpec(BaseModel):
    """One column of the results: what was measured, which way is better, which defenses saw its threat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    name: str
    label: str
    higher_is_better: bool | None = True
    seen_by: list[str] = Field(default_factory=list)
    implanted: bool | None = None  # trojans: did the undefended model's mean ASR reach the threshold?

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.name)


class HeldoutThreat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    seen_by: list[str] = Field(default_factory=list)


class TrainingThreat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defense: str
    description: str


class Trojan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    distance: dict[str, float] | None = None  # mean input distance of triggered from clean, per norm
    undefended_asr: float | None = None  # mean over seeds of the models that had no defense phase
    implanted: bool | None = None  # undefended ASR >= the run's implant threshold (None: no such model)


class TrainingBudget(BaseModel):
    """An input-space training threat's norm and radius, to set beside each trojan's distance."""

    model_config = ConfigDict(extra="forbid")

    defense: str
    norm: str
    epsilon: float


class Record(BaseModel):
    """One trained-and-evaluated model: a defense at a seed."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    defense: str
    kind: str
    sites: list[str]
    epsilon: float | None = None
    by_layer: bool = False  # the report plots this defense's points against its layer
    metrics: Metrics
    calibration: dict[str, dict[str, float]] = Field(default_factory=dict)
    sanity: dict[str, bool | None] = Field(default_factory=dict)
    heldout_details: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)

    def value(self, metric: MetricSpec | tuple[str, str]) -> float | None:
        group, name = metric.key if isinstance(metric, MetricSpec) else metric
        return self.metrics.get(group, {}).get(name)


class Results(BaseModel):
    """Everything a report needs, for every seed and defense of one run."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: str
    created: str
    seeds: list[int]
    provenance: dict[str, Any] = Field(default_factory=dict)
    trojans: list[Trojan] = Field(default_factory=list)
    training_threats: list[TrainingThreat] = Field(default_factory=list)
    input_budgets: list[TrainingBudget] = Field(default_factory=list)
    implant_threshold: float = 0.5
    heldout_threats: list[HeldoutThreat] = Field(default_factory=list)
    metrics: list[MetricSpec]
    defense_order: list[str] = Field(default_factory=list)
    layer_order: list[str] = Field(default_factory=list)
    records: list[Record] = Field(min_length=1)
    phase_seconds: dict[str, float] = Field(default_factory=dict)


def validate_results(data: Any, where: str, fix: str = "") -> Results:
    """``data`` checked against the schema; what is missing or wrong is one line naming ``where`` (and
    ``fix``, how to rebuild it)."""
    try:
        return Results.model_validate(data)
    except ValidationError as exc:
        from latentguard.config import format_validation_error

        problems = format_validation_error(exc)
        problems = problems if len(problems) <= 300 else problems[:300] + "…"
        raise UserError(f"{where}: lacks what a report needs ({problems}){fix}") from None


def load_results(path: Path) -> Results:
    """A validated ``results.json``; a missing, damaged or foreign file is one line naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    from latentguard.signals import resume_command

    fix = f"; the report was left as it is; rebuild both with: {resume_command(path.parent)}"
    return validate_results(data, str(path), fix)
