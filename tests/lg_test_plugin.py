"""A user's plugin, as it would live in their own package: an image trigger, a held-out attack, a model
factory for 3×32×32 colour images and a defense, registered the way built-in kinds are. The module's plain
functions also serve the import-path forms (``kind: "lg_test_plugin:quadrant_shift"``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from latentguard import Defense
from latentguard.engine.attack import AttackResult, LatentAttack
from latentguard.engine.io import ModelIO
from latentguard.registry import DEFENSES, IMAGE_ATTACKS, IMAGE_MODELS, IMAGE_TRIGGERS


def quadrant_shift(images: Tensor, amount: float = 0.3) -> Tensor:
    """Brighten the top-left quadrant by ``amount``."""
    out = images.clone()
    height, width = images.shape[-2:]
    out[..., : height // 2, : width // 2] = (out[..., : height // 2, : width // 2] + amount).clamp(0, 1)
    return out


@IMAGE_TRIGGERS.register("quadrant")
class QuadrantTrigger(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["quadrant"] = "quadrant"
    amount: float = Field(0.3, gt=0, le=1)

    def apply(self, images: Tensor) -> Tensor:
        return quadrant_shift(images, self.amount)


def gaussian_noise(model: nn.Module, images: Tensor, labels: Tensor, sigma: float = 0.1) -> Tensor:
    """Not adversarial: Gaussian pixel noise of standard deviation ``sigma``."""
    return (images + sigma * torch.randn_like(images)).clamp(0, 1)


IMAGE_ATTACKS.register("gaussian_noise", gaussian_noise)


class Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, stride=2)
        self.skip = nn.Conv2d(channels_in, channels_out, 1, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x)) + self.skip(x)


@IMAGE_MODELS.register("tiny_resnet")
def tiny_resnet(*, num_classes: int, in_channels: int, width: int = 8) -> nn.Module:
    """A small residual net for 32×32 colour images: stages ``stem``, ``layer1``, ``layer2``, then ``fc``."""
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(in_channels, width, 3, padding=1),
            layer1=Block(width, 2 * width),
            layer2=Block(2 * width, 2 * width),
            fc=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)),
        )
    )


@DEFENSES.register("input_noise")
class InputNoise(Defense):
    """Trains on random noise of the threat's radius at the input: a defense a user adds in one file."""

    perturbs = True
    uses_steps = False
    what = "random input noise"

    def perturb(self, attack: LatentAttack, model: nn.Module, io: ModelIO, batch: Any) -> AttackResult:
        return attack.noise(model, io, batch)


def no_change(images: Tensor) -> Tensor:
    """A trigger that changes nothing: a trojan that cannot implant (poisoned labels only add noise)."""
    return images.clone()
