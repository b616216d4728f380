"""``rlat``: random latent noise of LAT's radius, the control that tells an adversary from mere noise."""

from __future__ import annotations

from typing import Any

from torch import nn

from latentguard.defenses.base import Defense
from latentguard.engine.attack import AttackResult, LatentAttack
from latentguard.engine.io import ModelIO
from latentguard.registry import DEFENSES


@DEFENSES.register("rlat")
class RandomLatentNoise(Defense):
    perturbs = True
    needs_sites = True
    by_layer = True
    uses_steps = False
    what = "random latent noise"

    def perturb(self, attack: LatentAttack, model: nn.Module, io: ModelIO, batch: Any) -> AttackResult:
        return attack.noise(model, io, batch)
