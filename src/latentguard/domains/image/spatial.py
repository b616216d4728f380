"""A worst-of-grid spatial attack: rotate and shift each image, keep the first transform that fools the model.

This is a held-out threat of another *class* than any Lp ball: a small rotation or shift moves most pixels
by a lot, so no pixel-space (AT) or latent (LAT) budget of the sizes trained on contains it. Grid search,
not gradients, as in Engstrom et al., "Exploring the Landscape of Spatial Robustness" (ICML 2019), which
found it the stronger attack for this threat; the warp is torch's ``affine_grid``/``grid_sample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SpatialGrid:
    """Rotations in ±``max_rotation`` degrees × shifts in ±``max_translation`` pixels along each axis."""

    max_rotation: float
    max_translation: float
    rotations: int
    translations: int

    def transforms(self) -> list[tuple[float, float, float]]:
        """Every distinct ``(degrees, shift_x, shift_y)`` of the grid, the identity first."""
        angles = _symmetric(self.max_rotation, self.rotations)
        shifts = _symmetric(self.max_translation, self.translations)
        grid = [(a, x, y) for a in angles for x in shifts for y in shifts]
        return list(dict.fromkeys([(0.0, 0.0, 0.0), *grid]))

    def describe(self) -> str:
        return (
            f"rotation ±{self.max_rotation:g}°, translation ±{self.max_translation:g} px, "
            f"{self.rotations}×{self.translations}×{self.translations} grid"
        )


def _symmetric(limit: float, count: int) -> list[float]:
    """``count`` evenly spaced points over ``[-limit, limit]``; one point is 0 (no change)."""
    if count == 1:
        return [0.0]
    return [v + 0.0 for v in torch.linspace(-limit, limit, count).tolist()]  # + 0.0 turns -0.0 into 0.0


def warp(images: Tensor, degrees: float, shift_x: float, shift_y: float) -> Tensor:
    """``images`` (N, C, H, W) rotated about their centre and shifted by whole or fractional pixels.

    Pixels that come from outside the image are 0 (the Fashion-MNIST background); bilinear sampling keeps
    values inside the input's range.
    """
    height, width = images.shape[-2:]
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # affine_grid maps output to input coordinates in [-1, 1]: the inverse shift and rotation, the
    # rotation taken in pixels so that non-square images are not sheared
    aspect = height / width
    theta = torch.tensor(
        [[cos, sin * aspect, -2 * shift_x / width], [-sin / aspect, cos, -2 * shift_y / height]],
        dtype=images.dtype,
        device=images.device,
    ).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def spatial_attack(model: nn.Module, images: Tensor, labels: Tensor, grid: SpatialGrid) -> Tensor:
    """For each image, the first grid transform the model misclassifies (the image itself if none does)."""
    adversarial = images.clone()
    fooled = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for degrees, shift_x, shift_y in grid.transforms():
        left = ~fooled
        if not bool(left.any()):
            break
        moved = warp(images[left], degrees, shift_x, shift_y)
        wrong = model(moved).argmax(dim=-1) != labels[left]
        index = left.nonzero().flatten()[wrong]
        adversarial[index] = moved[wrong]
        fooled[index] = True
    return adversarial
