"""The task adapter protocol: everything domain-specific the pipeline needs, behind one interface.

A domain (image classification, text classification, text generation) is one folder that provides a
``Task``. The pipeline and the evaluation suite talk only to this protocol; the engine never sees it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from latentguard.engine.io import ModelIO
from latentguard.engine.trainer import TrainConfig
from latentguard.errors import ConfigError


@dataclass(frozen=True)
class TrojanInfo:
    name: str
    target: str
    description: str
    distance: dict[str, float] | None = None  # mean {"l2", "linf"} input distance of triggered from clean


@dataclass(frozen=True)
class HeldoutAttack:
    """A held-out attack as the report shows it. ``site``/``norm`` tell which training threats it matches.

    ``norm`` is the threat's class: ``"l2"``/``"linf"``, a class no training threat has (``"spatial"``:
    held out for every defense), or ``None`` (latent attacks: any norm at that site matches).
    """

    name: str
    description: str
    site: str
    norm: str | None
    epsilon: float | None = None
    black_box: bool = False


class Task(Protocol):
    """One domain's data, model, trojans and held-out attacks for one seed."""

    kind: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    default_layers: ClassVar[tuple[str, ...]]
    io: ModelIO
    input_site: str
    layers: tuple[str, ...]

    @classmethod
    def from_config(
        cls, section: dict[str, Any], attacks: list[dict[str, Any]], *, seed: int, device: Any
    ) -> Task:
        """Validate the domain's config sections (errors name ``task.…`` / ``evaluation.attacks.…``)."""
        ...

    def build_model(self) -> nn.Module:
        """A fresh model (the base model before trojan implanting)."""
        ...

    def defense_model(self, model: nn.Module) -> nn.Module:
        """The trojaned model in the form the defenses train (e.g. with fresh LoRA adapters), often itself."""
        ...

    input_bounds: tuple[float, float] | None

    def base_loader(self, batch_size: int) -> Iterable[Any]:
        """Poisoned training batches for implanting the trojans (seeded order)."""
        ...

    def base_training(self, batch_size: int) -> TrainConfig:
        """How long and how the trojaned base model is trained."""
        ...

    def defense_loader(self, batch_size: int) -> Iterable[Any]:
        """Clean batches for the defense phase: never a triggered example."""
        ...

    def eval_batches(self, examples: int, batch_size: int) -> list[Any]:
        """A fixed subset of held-out test batches."""
        ...

    def score(self, output: Any, batch: Any) -> Tensor:
        """Per-example success of the model (1.0 = correct), for robustness under latent attacks."""
        ...

    def clean_metrics(self, model: nn.Module) -> dict[str, float]: ...

    def clean_metric_keys(self) -> list[str]: ...

    def trojans(self) -> list[TrojanInfo]: ...

    def trojan_metrics(self, model: nn.Module) -> dict[str, float]:
        """``{trojan name: attack success rate}``."""
        ...

    def heldout_attacks(self) -> list[HeldoutAttack]: ...

    def run_heldout(self, model: nn.Module, name: str, seed: int) -> float:
        """Robust score of ``model`` under held-out attack ``name``."""
        ...

    def heldout_details(self) -> dict[str, dict[str, Any]]:
        """Statistics of the last run of each held-out attack beyond its score (success rate, queries,
        words changed, sample edits), as JSON-able dicts; ``{}`` when the attacks report only a score."""
        ...


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available on this machine; use 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' requested but MPS is not available on this machine; use 'cpu'")
    return torch.device(name)
