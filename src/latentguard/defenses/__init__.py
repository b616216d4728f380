"""The built-in defenses, each one registered object (``none``, ``clean``, ``at``, ``lat``, ``rlat``,
``tlat``); a plugin registers its own the same way (``docs/extending.md``)."""

from latentguard.defenses import adversarial, noise, standard, targeted
from latentguard.defenses.base import Defense, DefenseConfig, defense_for

__all__ = ["Defense", "DefenseConfig", "adversarial", "defense_for", "noise", "standard", "targeted"]
