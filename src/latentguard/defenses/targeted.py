"""``tlat``: targeted LAT (Sheshadri et al. 2024). The adversary pulls toward an undesired output and away
from the desired one; the model learns the desired output under it and unlearns the undesired one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from latentguard.defenses.base import Defense, DefenseConfig
from latentguard.engine.attack import Objective, TowardAway, unlikelihood
from latentguard.engine.io import ModelIO, PairedIO
from latentguard.errors import ConfigError
from latentguard.registry import DEFENSES

if TYPE_CHECKING:
    from latentguard.engine.trainer import Trainer


def paired(io: ModelIO) -> PairedIO:
    if not isinstance(io, PairedIO):
        raise ConfigError(
            f"defense kind 'tlat' needs batches that carry an undesired output ({type(io).__name__} "
            "has no undesired())"
        )
    return io


@DEFENSES.register("tlat")
class TargetedLAT(Defense):
    perturbs = True
    needs_sites = True
    learns_threat = True
    options = frozenset({"toward_weight", "away_weight", "undesired_weight"})

    def check(self, config: DefenseConfig) -> None:
        if not (config.toward_weight or config.away_weight):
            raise ValueError("tlat needs a positive toward_weight or away_weight")

    def objective(self, config: DefenseConfig, io: ModelIO) -> Objective:
        return TowardAway(paired(io).undesired, config.toward_weight, config.away_weight)

    def extra_terms(self, trainer: Trainer, batch: Any) -> dict[str, tuple[float, Tensor]]:
        weight = trainer.defense.undesired_weight
        if not weight:
            return {}
        other = paired(trainer.io).undesired(batch)
        nll = trainer.io.loss(trainer.io.forward(trainer.wrapped, other), other)
        return {"undesired": (weight, unlikelihood(nll).mean())}

    def label(self, config: DefenseConfig) -> str:
        return f"targeted latent PGD (toward {config.toward_weight:g}, away {config.away_weight:g})"

    def notes(self, config: DefenseConfig) -> list[str]:
        return [f"unlearn-undesired weight {config.undesired_weight:g}"]
