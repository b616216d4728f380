"""latentguard: Latent Adversarial Training for any PyTorch model, by naming a layer.

The Python API in one place: threats, the PGD attack, the trainer and the evaluation helpers. The CLI
(``latentguard run``) builds the same objects from a YAML config.
"""

from latentguard.defenses.base import Defense, DefenseConfig
from latentguard.engine.attack import AttackResult, LatentAttack, PGDConfig, Targeted, TowardAway, untargeted
from latentguard.engine.io import ClassifierIO, ModelIO
from latentguard.engine.site import Intervention, frozen
from latentguard.engine.threat import Threat
from latentguard.engine.trainer import TrainConfig, Trainer, TrainResult
from latentguard.errors import UserError
from latentguard.evaluate import accuracy, latent_robustness

__version__ = "0.1.0"

__all__ = [
    "AttackResult",
    "ClassifierIO",
    "Defense",
    "DefenseConfig",
    "Intervention",
    "LatentAttack",
    "ModelIO",
    "PGDConfig",
    "Targeted",
    "Threat",
    "TowardAway",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "UserError",
    "accuracy",
    "frozen",
    "latent_robustness",
    "untargeted",
]
