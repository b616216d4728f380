"""Defenses without an adversary: ``none`` (the trojaned model as it is) and ``clean`` (fine-tuning)."""

from __future__ import annotations

from latentguard.defenses.base import Defense
from latentguard.registry import DEFENSES


@DEFENSES.register("none")
class NoDefense(Defense):
    trains = False
    what = "no defense phase"


@DEFENSES.register("clean")
class CleanFineTuning(Defense):
    clean_loss = True
    what = "clean fine-tuning"
