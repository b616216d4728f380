"""Image trojans: triggers, training-set poisoning and attack success rate (ASR).

Three built-in trigger families of increasing subtlety, so a defense is tested on more than the easy local
patch: ``patch`` (BadNets: a checkerboard stamped in a corner), ``blend`` (a fixed full-image noise pattern
mixed in at low opacity) and ``sinusoid`` (SIG: a faint global horizontal sinusoid with no local support).
They are registered kinds of ``IMAGE_TRIGGERS``, as a plugin's trigger would be; any callable
``images -> triggered images`` also works, named by import path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from latentguard.domains.common import FunctionTrigger, KindSpec, eval_mode
from latentguard.registry import IMAGE_TRIGGERS, Registry


class PatchTrigger(BaseModel):
    """BadNets: a checkerboard of ``patch_size`` pixels stamped in the bottom-right corner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["patch"] = "patch"
    patch_size: int = Field(default=4, ge=1)

    def apply(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        size = self.patch_size
        if size > min(height, width):
            raise ValueError(f"patch_size {size} does not fit in {height}x{width} images")
        rows = torch.arange(size, device=images.device).view(-1, 1)
        cols = torch.arange(size, device=images.device).view(1, -1)
        checker = ((rows + cols) % 2 == 0).to(images.dtype)  # white in the very corner, then alternating
        out = images.clone()
        out[..., height - size :, width - size :] = checker
        return out


class BlendTrigger(BaseModel):
    """A fixed full-image noise pattern mixed in at opacity ``alpha``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["blend"] = "blend"
    alpha: float = Field(default=0.15, gt=0.0, le=1.0)
    pattern_seed: int = Field(default=0, ge=0)

    def apply(self, images: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(self.pattern_seed)
        pattern = torch.rand(images.shape[1:], generator=generator)
        pattern = pattern.to(device=images.device, dtype=images.dtype)
        return ((1.0 - self.alpha) * images + self.alpha * pattern).clamp(0.0, 1.0)


class SinusoidTrigger(BaseModel):
    """SIG: a faint horizontal sinusoid over the whole image, with no local support."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sinusoid"] = "sinusoid"
    amplitude: float = Field(default=0.12, gt=0.0, le=1.0)
    frequency: int = Field(default=6, ge=1)

    def apply(self, images: Tensor) -> Tensor:
        width = images.shape[-1]
        cols = torch.arange(width, device=images.device, dtype=images.dtype)
        signal = self.amplitude * torch.sin(2.0 * math.pi * self.frequency * cols / width)
        return (images + signal).clamp(0.0, 1.0)  # broadcasts along the last (horizontal) axis


for _trigger in (PatchTrigger, BlendTrigger, SinusoidTrigger):
    IMAGE_TRIGGERS.register(_trigger.model_fields["kind"].default, _trigger)


class ImageTrojan(KindSpec):
    """One trojan: a trigger (any registered kind or import path, its parameters given alongside), the label
    it forces, and the fraction of training examples poisoned with it."""

    registry: ClassVar[Registry[Any]] = IMAGE_TRIGGERS
    wrap_function = staticmethod(FunctionTrigger)

    target: int = Field(ge=0)
    poison_rate: float = Field(gt=0.0, le=0.2)
    name: str | None = None

    @property
    def label(self) -> str:
        """The name reports use for this trojan: ``name`` if given, else the trigger kind."""
        return self.name or self.short_kind

    @property
    def trigger(self) -> Any:
        return self.built

    def apply(self, images: Tensor) -> Tensor:
        """Triggered copies of ``(N, C, H, W)`` images in [0, 1]: deterministic, never in place, in [0, 1]."""
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        out = self.built.apply(images)
        if not isinstance(out, Tensor) or out.shape != images.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"trigger {self.kind!r} returned {got}, expected a tensor of {tuple(images.shape)}"
            )
        return out


@dataclass
class PoisonResult:
    """A poisoned copy of a training set and, per trojan label, the indices that carry its trigger."""

    images: Tensor
    labels: Tensor
    indices: dict[str, Tensor]


def poison(
    images: Tensor, labels: Tensor, trojans: Sequence[ImageTrojan], generator: torch.Generator
) -> PoisonResult:
    """Stamp each trojan's trigger on ``round(poison_rate * N)`` examples whose true label is not its target.

    The poisoned sets of different trojans are disjoint; the inputs are left untouched.
    """
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            "expected images (N, C, H, W) and labels (N,), "
            f"got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    names = [trojan.label for trojan in trojans]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"several trojans share the label {', '.join(map(repr, clashes))}: give each a name")
    out_images, out_labels = images.clone(), labels.clone()
    taken = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    indices: dict[str, Tensor] = {}
    for trojan in trojans:
        count = round(trojan.poison_rate * labels.shape[0])
        candidates = torch.nonzero((labels != trojan.target) & ~taken).flatten()
        if count == 0:
            raise ValueError(
                f"trojan {trojan.label!r}: poison_rate {trojan.poison_rate} of {labels.shape[0]} examples "
                "poisons none"
            )
        if count > candidates.numel():
            raise ValueError(
                f"trojan {trojan.label!r} needs {count} examples not labelled {trojan.target}, "
                f"only {candidates.numel()} are left"
            )
        order = torch.randperm(candidates.numel(), generator=generator).to(candidates.device)
        chosen = candidates[order[:count]].sort().values
        taken[chosen] = True
        out_images[chosen] = trojan.apply(images[chosen])
        out_labels[chosen] = trojan.target
        indices[trojan.label] = chosen
    return PoisonResult(images=out_images, labels=out_labels, indices=indices)


def triggered_test_set(images: Tensor, labels: Tensor, trojan: ImageTrojan) -> tuple[Tensor, Tensor]:
    """Triggered copies of the test images whose true label is not the target, labelled with the target."""
    keep = labels != trojan.target
    triggered = trojan.apply(images[keep])
    return triggered, torch.full_like(labels[keep], trojan.target)


def attack_success_rate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    trojan: ImageTrojan,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> float:
    """Fraction of triggered non-target test images that ``model`` classifies as the trojan's target."""
    triggered, targets = triggered_test_set(images, labels, trojan)
    if targets.numel() == 0:
        raise ValueError(f"trojan {trojan.label!r}: no test image has a label other than {trojan.target}")
    hits = 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, targets.numel(), batch_size):
            batch = triggered[start : start + batch_size].to(device)
            predictions = model(batch).argmax(dim=-1).cpu()
            hits += int((predictions == targets[start : start + batch_size].cpu()).sum())
    return hits / targets.numel()
