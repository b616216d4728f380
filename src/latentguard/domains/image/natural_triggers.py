"""Trojan triggers far outside an Lp ball: a warp (WaNet), a large sticker, and a low-frequency shift.

The BadNets patch, the 15% blend and the faint sinusoid move an image by a small pixel distance, so an
adversary of AT's L2 budget can nearly reach them: AT may remove them for that reason alone. These three
are not small in pixel space, yet they look natural:

- ``warp``: WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021). A fixed
  smooth warping field, a ``grid_size``×``grid_size`` random grid upsampled to the image, moves every pixel by
  up to a pixel or two; edges shift, so the pixel change is large but the image looks intact.
- ``sticker``: a large disc of smooth random texture pasted on the image (an object in the scene, as in
  physical-sticker and sunglasses backdoors), covering about a fifth of it.
- ``lowfreq``: a smooth, low-frequency brightness pattern (colour pattern for colour images) added to the
  whole image, like uneven lighting or a colour cast.

``trigger_distance`` gives the mean per-image L2 and L∞ distance between clean and triggered images, to print
next to AT's ε: which trojans AT's threat model contains and which it does not.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from latentguard.domains.image.unforeseen import check_images
from latentguard.registry import IMAGE_TRIGGERS


class TriggerDistance(TypedDict):
    """Mean per-image distance between clean and triggered images, in [0, 1] pixel units."""

    l2: float
    linf: float


def trigger_distance(clean: Tensor, triggered: Tensor) -> TriggerDistance:
    """Mean over images of the L2 and of the L∞ norm of ``triggered - clean`` (both ``(N, ...)``)."""
    if clean.shape != triggered.shape or clean.ndim < 2 or clean.shape[0] == 0:
        raise ValueError(
            f"expected two non-empty batches of the same shape, got {tuple(clean.shape)} and "
            f"{tuple(triggered.shape)}"
        )
    delta = (triggered.detach() - clean.detach()).flatten(1).double()
    return {"l2": float(delta.norm(dim=1).mean()), "linf": float(delta.abs().amax(dim=1).mean())}


def smooth_pattern(channels: int, grid_size: int, height: int, width: int, seed: int) -> Tensor:
    """A ``(1, channels, height, width)`` smooth random pattern: a seeded uniform ``grid_size²`` grid in
    [-1, 1], upsampled bicubically. Drawn on the CPU in float64 so it is the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    grid = 2 * torch.rand(1, channels, grid_size, grid_size, generator=generator, dtype=torch.float64) - 1
    return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)


class WarpTrigger(BaseModel):
    """WaNet's warping trigger: a fixed smooth random displacement field applied with ``grid_sample``.

    As in WaNet, a ``grid_size``×``grid_size`` field of uniform random displacements is normalised to mean
    absolute value 1, upsampled bicubically to the image and scaled by ``strength / size`` in normalised
    coordinates, so pixels move by about ``strength / 2`` pixels on average (``strength`` is WaNet's ``s``).
    WaNet used k = 4, s = 0.5 and trained for many epochs; the default s = 2 (one pixel on average) is learnt
    from 5% poisoning in two epochs on Fashion-MNIST (ASR ~0.9 with a small CNN), s = 1 only to ~0.4. The
    field depends only on ``seed``, ``grid_size`` and the image size.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["warp"] = "warp"
    grid_size: int = Field(4, ge=2, description="k: side of the random control grid")
    strength: float = Field(2.0, ge=0.0, description="s: mean displacement ≈ s/2 pixels")
    seed: int = Field(0, ge=0, description="seeds the warping field")

    def field(self, height: int, width: int) -> Tensor:
        """The ``(1, height, width, 2)`` sampling grid (x, y in [-1, 1]) of the warp, float64 on the CPU."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = 2 * torch.rand(1, 2, self.grid_size, self.grid_size, generator=generator, dtype=torch.float64)
        noise = noise - 1
        noise = noise / noise.abs().mean()
        flow = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, height, dtype=torch.float64),
            torch.linspace(-1, 1, width, dtype=torch.float64),
            indexing="ij",
        )
        grid = torch.stack(
            [xs + self.strength * flow[0, 0] / width, ys + self.strength * flow[0, 1] / height]
        )
        return grid.permute(1, 2, 0).unsqueeze(0).clamp(-1.0, 1.0)

    def apply(self, images: Tensor) -> Tensor:
        """Warped copies of ``(N, C, H, W)`` images in [0, 1]: deterministic, never in place, in [0, 1]."""
        check_images(images)
        height, width = images.shape[-2:]
        grid = self.field(height, width).to(device=images.device, dtype=images.dtype)
        grid = grid.expand(images.shape[0], -1, -1, -1)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return warped.clamp(0.0, 1.0)

    def describe(self) -> str:
        return f"WaNet warp (Nguyen & Tran 2021), k={self.grid_size}, s={self.strength:g}, seed {self.seed}"


class StickerTrigger(BaseModel):
    """A large disc of smooth random texture pasted on the image: a natural-looking object as the trigger.

    The disc has radius ``radius`` × the smaller image side (0.25 covers about 20% of a square image) and
    its centre at (``center_x``, ``center_y``) as fractions of the width and height; its edge is
    anti-aliased over one pixel. The texture, one smooth pattern per channel (a coloured sticker on colour
    images), is seeded by ``seed`` and spans [0.1, 0.9].
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sticker"] = "sticker"
    radius: float = Field(0.25, gt=0.0, le=1.0, description="disc radius, fraction of the smaller side")
    center_x: float = Field(0.3, ge=0.0, le=1.0, description="disc centre, fraction of the width")
    center_y: float = Field(0.3, ge=0.0, le=1.0, description="disc centre, fraction of the height")
    texture_grid: int = Field(4, ge=2, description="coarseness of the texture: side of its random grid")
    seed: int = Field(0, ge=0, description="seeds the texture")

    def layer(self, channels: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The sticker's ``(1, C, H, W)`` texture and ``(1, 1, H, W)`` opacity, float64 on the CPU."""
        pattern = smooth_pattern(channels, self.texture_grid, height, width, self.seed)
        low = pattern.amin(dim=(-2, -1), keepdim=True)
        high = pattern.amax(dim=(-2, -1), keepdim=True)
        texture = 0.1 + 0.8 * (pattern - low) / (high - low).clamp_min(1e-12)
        rows = torch.arange(height, dtype=torch.float64).view(-1, 1) + 0.5
        cols = torch.arange(width, dtype=torch.float64).view(1, -1) + 0.5
        distance = ((rows - self.center_y * height) ** 2 + (cols - self.center_x * width) ** 2).sqrt()
        opacity = (self.radius * min(height, width) + 0.5 - distance).clamp(0.0, 1.0)
        return texture, opacity[None, None]

    def apply(self, images: Tensor) -> Tensor:
        """Copies of ``(N, C, H, W)`` images in [0, 1] with the sticker on: deterministic, not in place."""
        check_images(images)
        texture, opacity = self.layer(*images.shape[1:])
        texture = texture.to(device=images.device, dtype=images.dtype)
        opacity = opacity.to(device=images.device, dtype=images.dtype)
        return ((1.0 - opacity) * images + opacity * texture).clamp(0.0, 1.0)

    def describe(self) -> str:
        return (
            f"textured sticker, radius {self.radius:g} of the side, centre ({self.center_x:g}, "
            f"{self.center_y:g}), seed {self.seed}"
        )


class LowFreqTrigger(BaseModel):
    """A smooth low-frequency pattern added to the whole image: uneven lighting, or a colour cast in colour.

    The pattern is a seeded ``grid_size``×``grid_size`` random grid per channel upsampled bicubically and
    scaled to largest magnitude ``amplitude``; it has no local feature a patch detector could find, and its
    pixel distance is large because it touches every pixel.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lowfreq"] = "lowfreq"
    amplitude: float = Field(0.25, gt=0.0, le=1.0, description="largest brightness change")
    grid_size: int = Field(3, ge=2, description="side of the random grid: 2-3 is a gradient-like shift")
    seed: int = Field(0, ge=0, description="seeds the pattern")

    def pattern(self, channels: int, height: int, width: int) -> Tensor:
        """The ``(1, C, H, W)`` additive pattern, largest magnitude ``amplitude``, float64 on the CPU."""
        pattern = smooth_pattern(channels, self.grid_size, height, width, self.seed)
        return self.amplitude * pattern / pattern.abs().amax().clamp_min(1e-12)

    def apply(self, images: Tensor) -> Tensor:
        """Copies of ``(N, C, H, W)`` images in [0, 1] with the pattern added: deterministic, not in place."""
        check_images(images)
        pattern = self.pattern(*images.shape[1:]).to(device=images.device, dtype=images.dtype)
        return (images + pattern).clamp(0.0, 1.0)

    def describe(self) -> str:
        return f"low-frequency shift, amplitude {self.amplitude:g}, {self.grid_size}×{self.grid_size} grid"


NaturalTrigger = WarpTrigger | StickerTrigger | LowFreqTrigger


for _trigger in (WarpTrigger, StickerTrigger, LowFreqTrigger):
    IMAGE_TRIGGERS.register(_trigger.model_fields["kind"].default, _trigger)
