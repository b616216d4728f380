"""Untargeted adversarial training: ``at`` in input (or embedding) space and ``lat`` at hidden layers.

Both maximise the task loss with the same PGD engine and train on the perturbed forward; they differ only in
where the perturbation lives, which is what makes them a fair comparison.

``lat`` has one option, off by default: ``options: {replays: m}`` makes it *free* LAT (Shafahi et al. 2019,
"Adversarial Training for Free!", carried to latent space; ``engine/free.py``). There is no PGD inner loop:
each batch is trained on ``m`` times in a row, every replay is one forward with δ at the sites and one
backward that gives the weights their update and δ its ascent step, and δ is carried to the next replay and
the next batch. ``training.steps`` still counts model updates, so a run sees ``steps / m`` distinct batches
(the paper trains for ``epochs / m`` to make the same count). ``options.step`` is δ's ascent step per
replay as a fraction of the radius (default 1.0, the paper's). The ``pgd`` settings are not used.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from latentguard.defenses.base import Defense, DefenseConfig
from latentguard.engine.attack import AttackResult, LatentAttack
from latentguard.engine.free import FreeAdversary
from latentguard.engine.io import ModelIO
from latentguard.engine.site import Intervention
from latentguard.registry import DEFENSES


@DEFENSES.register("at")
class InputAdversarialTraining(Defense):
    perturbs = True
    learns_threat = True
    what = "PGD"


class FreeOptions(BaseModel):
    """``lat``'s ``options`` for free LAT (absent: exact LAT with a PGD inner loop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replays: int = Field(ge=1, le=1000, description="model updates per batch, each with one δ step")
    step: float = Field(1.0, gt=0, le=10, description="δ's ascent step per replay, × the radius")


def free_options(config: DefenseConfig) -> FreeOptions | None:
    """The free-LAT settings of a ``lat`` config, ``None`` for exact LAT; a bad one is a ``ValueError``."""
    if not config.options:
        return None
    try:
        return FreeOptions.model_validate(config.options)
    except ValidationError as exc:
        problems = "; ".join(
            f"options.{'.'.join(map(str, e['loc']))}: {e['msg']}".replace("Field required", "needed")
            for e in exc.errors()
        )
        raise ValueError(f"lat: {problems} (free LAT takes replays and step)") from None


@DEFENSES.register("lat")
class LatentAdversarialTraining(Defense):
    perturbs = True
    needs_sites = True
    learns_threat = True
    by_layer = True
    what = "latent PGD"

    def __init__(self) -> None:
        self.free: FreeAdversary | None = None  # set by begin() when the options ask for free LAT

    def check(self, config: DefenseConfig) -> None:
        free_options(config)

    def begin(self, config: DefenseConfig, attack: LatentAttack | None) -> None:
        options = free_options(config)
        if options is not None and attack is not None:
            self.free = FreeAdversary(attack.threats(), options.step)

    def replays(self, config: DefenseConfig) -> int:
        options = free_options(config)
        return 1 if options is None else options.replays

    def perturb(self, attack: LatentAttack, model: nn.Module, io: ModelIO, batch: Any) -> AttackResult:
        if self.free is None:
            return attack(model, io, batch)
        return self.free.prepare(attack.radii(), io.positions(batch))

    def intervention(self, model: nn.Module, attack: LatentAttack, result: AttackResult) -> Intervention:
        if self.free is None:
            return super().intervention(model, attack, result)
        return self.free.intervention(model, attack.sites, result)

    def after_backward(self, hooks: Intervention) -> None:
        if self.free is not None:
            self.free.update(hooks.deltas, hooks.activations)

    def state(self) -> dict[str, Tensor]:
        return self.free.state() if self.free is not None else {}

    def load_state(self, tensors: dict[str, Tensor], device: Any) -> None:
        if self.free is not None:
            self.free.load_state(tensors, device)

    def label(self, config: DefenseConfig) -> str:
        options = free_options(config)
        if options is None:
            return self.what
        return f"free latent PGD ({options.replays} replays per batch, δ step {options.step:g} × radius)"

    def inner_steps(self, config: DefenseConfig) -> int | None:
        return None if free_options(config) is not None else super().inner_steps(config)
