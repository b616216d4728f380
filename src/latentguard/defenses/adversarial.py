"""Untargeted adversarial training: ``at`` in input (or embedding) space and ``lat`` at hidden layers.

Both maximise the task loss with the same PGD engine and train on the perturbed forward; they differ only in
where the perturbation lives, which is what makes them a fair comparison.
"""

from __future__ import annotations

from latentguard.defenses.base import Defense
from latentguard.registry import DEFENSES


@DEFENSES.register("at")
class InputAdversarialTraining(Defense):
    perturbs = True
    learns_threat = True
    what = "PGD"


@DEFENSES.register("lat")
class LatentAdversarialTraining(Defense):
    perturbs = True
    needs_sites = True
    learns_threat = True
    by_layer = True
    what = "latent PGD"
