"""Adversarial non-Lp image attacks: the "unforeseen" classes of Kaufmann et al. and StAdv's flow fields.

Kaufmann, Kang, Sun, Hendrycks, Brown and Steinhardt, "Testing Robustness Against Unforeseen Adversaries"
(2019) measure robustness against attack *classes* a defense was not trained on: JPEG, Fog, Snow, Gabor and
Elastic, each an adversarially optimised perturbation with its own budget that no Lp ball of a useful size
contains. Xiao et al., "Spatially Transformed Adversarial Examples" (ICLR 2018) add StAdv, a per-pixel flow
field kept smooth by a penalty. Their reference code (``advex-uar``, ``perceptual-advex``) hard-codes CUDA,
3 channels and torchvision, so the attacks are written here from the papers: batched, differentiable, on the
images' device and dtype, for any channel count. kornia supplies the image operations where it has them
(blur and motion kernels, filtering, colour conversion, elastic warps, remapping).

Every attack is one search: a few tensors of parameters inside a box (the budget), rendered into images,
optimised by signed-gradient ascent on the cross-entropy from a random start in the box, keeping per image
the iterate of highest loss among those that fool the model (of highest loss overall if none does).
``steps = 0`` returns the random start: the same budget with random instead of adversarial parameters. A
budget of 0 returns the images unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, ClassVar, Literal

import kornia
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from latentguard.registry import IMAGE_ATTACKS

KAUFMANN = "Kaufmann et al. 2019, Testing Robustness Against Unforeseen Adversaries"
XIAO = "Xiao et al. 2018, Spatially Transformed Adversarial Examples"

# Standard JPEG quantisation tables (ITU-T T.81, Annex K), for quality 50.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *([(99,) * 8] * 4),
)


def kornia_version() -> str:
    """The installed kornia version, for ``describe`` lines."""
    try:
        return metadata.version("kornia")
    except metadata.PackageNotFoundError:  # pragma: no cover - kornia imported above, so it is installed
        return kornia.__version__


def check_images(images: Tensor) -> None:
    """Reject anything but a floating ``(N, C, H, W)`` batch: every attack and corruption assumes one."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"expected float images of shape (N, C, H, W), got {tuple(images.shape)} {images.dtype}"
        )


def uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, like: Tensor
) -> Tensor:
    """Uniform draws in ``[low, high]`` from a CPU generator, moved to ``like``'s device and dtype."""
    draw = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (low + (high - low) * draw).to(device=like.device, dtype=like.dtype)


def site_mask(images: Tensor, spacing: int, generator: torch.Generator) -> Tensor:
    """A ``(N, 1, H, W)`` 0/1 mask with one site every ``spacing`` pixels, at a random offset per image."""
    count, _, height, width = images.shape
    offsets = torch.randint(0, spacing, (count, 2, 1, 1), generator=generator).to(images.device)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    hit = ((rows - offsets[:, 0]) % spacing == 0) & ((cols - offsets[:, 1]) % spacing == 0)
    return hit.unsqueeze(1).to(images.dtype)


@dataclass
class Search:
    """What one attack optimises: parameter tensors inside boxes, and how they turn into images.

    ``render`` maps the parameters to adversarial images in [0, 1]; ``penalty`` (optional) is a per-image
    cost the ascent subtracts from the loss (StAdv's flow smoothness).
    """

    variables: list[Tensor]
    bounds: list[tuple[float, float]]
    render: Callable[[list[Tensor]], Tensor]
    penalty: Callable[[list[Tensor]], Tensor] | None = None


class UnforeseenAttack(BaseModel):
    """Shared search loop of the non-Lp attacks; a subclass says what its parameters are and how they render.

    A subclass declares its fields (``kind`` first, its budget, ``steps``, ``step_size``, ``seed``) and
    writes ``_search``, ``budget`` and ``describe``. Which test images it attacks is the evaluation's
    choice (``examples`` of the attack's config entry).
    """

    model_config = ConfigDict(extra="forbid")

    threat_class: ClassVar[str] = ""
    budget_name: ClassVar[str] = "epsilon"
    # the half-width of the parameter box when the budget is 1: sets the default step size
    unit_box: ClassVar[bool] = False

    if TYPE_CHECKING:  # declared by each subclass, after its ``kind`` (pydantic orders base fields first)
        steps: int
        step_size: float | None
        seed: int

    @property
    def budget(self) -> float:
        """The attack's budget (the value of its ``budget_name`` field)."""
        return float(getattr(self, self.budget_name))

    @property
    def step(self) -> float:
        """The ascent step in parameter units: ``step_size``, else 2.5 × the box half-width / ``steps``."""
        if self.step_size is not None:
            return self.step_size
        half_width = 1.0 if self.unit_box else self.budget
        return 2.5 * half_width / max(self.steps, 1)

    def _search(self, images: Tensor, generator: torch.Generator) -> Search:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def _budget_text(self) -> str:
        return f"{self.budget_name}={self.budget:g}, {self.steps} steps of {self.step:.3g}"

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial copies of ``images`` (N, C, H, W) in [0, 1] for ``model`` (already in eval mode).

        Seeded by ``seed`` through a private generator: the caller's random state is not touched.
        """
        check_images(images)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"expected labels of shape ({images.shape[0]},), got {tuple(labels.shape)}")
        clean = images.detach()
        generator = torch.Generator().manual_seed(self.seed)
        search = self._search(clean, generator)
        variables = [
            v.detach().clamp(lo, hi) for v, (lo, hi) in zip(search.variables, search.bounds, strict=True)
        ]
        best = clean.clone()
        best_loss = torch.full(labels.shape, -math.inf, device=clean.device, dtype=clean.dtype)
        best_fooled = torch.zeros(labels.shape, dtype=torch.bool, device=clean.device)
        with torch.enable_grad():
            for index in range(self.steps + 1):
                variables = [v.requires_grad_(True) for v in variables]
                adversarial = search.render(variables)
                logits = model(adversarial)
                losses = F.cross_entropy(logits, labels, reduction="none")
                with torch.no_grad():
                    fooled = logits.argmax(dim=-1) != labels
                    # prefer an iterate that fools the model, then the higher loss
                    better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (losses > best_loss))
                    best[better] = adversarial[better].detach()
                    best_loss = torch.where(better, losses.detach(), best_loss)
                    best_fooled |= fooled
                if index == self.steps:
                    break
                objective = losses.sum()
                if search.penalty is not None:
                    objective = objective - search.penalty(variables).sum()
                grads = torch.autograd.grad(objective, variables)
                with torch.no_grad():
                    variables = [
                        (v + self.step * g.sign()).clamp(lo, hi)
                        for v, g, (lo, hi) in zip(variables, grads, search.bounds, strict=True)
                    ]
        return best.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------- JPEG


def jpeg_table(quality: int, chroma: bool, like: Tensor) -> Tensor:
    """The standard 8×8 JPEG quantisation table scaled to ``quality`` (1-100) as the IJG encoder does."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    base = torch.tensor(_CHROMA_TABLE if chroma else _LUMA_TABLE, dtype=torch.float64)
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    table = torch.floor((base * scale + 50.0) / 100.0).clamp(1.0, 255.0)
    return table.to(device=like.device, dtype=like.dtype)


def dct_matrix(like: Tensor, size: int = 8) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (``D @ x`` transforms a column); JPEG's 8×8 DCT is ``D X Dᵀ``."""
    k = torch.arange(size, dtype=torch.float64).view(-1, 1)
    n = torch.arange(size, dtype=torch.float64).view(1, -1)
    matrix = torch.cos(math.pi * (2 * n + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(device=like.device, dtype=like.dtype)


def blocks_to_pixels(coefficients: Tensor, height: int, width: int) -> Tensor:
    """Inverse 8×8 block DCT of ``(N, C, Hb, Wb, 8, 8)`` coefficients, cropped to ``height × width``."""
    count, channels, rows, cols = coefficients.shape[:4]
    d = dct_matrix(coefficients)
    blocks = torch.einsum("uk,ncijuv,vl->ncijkl", d, coefficients, d)
    pixels = blocks.permute(0, 1, 2, 4, 3, 5).reshape(count, channels, rows * 8, cols * 8)
    return pixels[..., :height, :width]


def pixels_to_blocks(images: Tensor) -> Tensor:
    """8×8 block DCT of ``(N, C, H, W)`` images (edge-padded to multiples of 8): ``(N, C, Hb, Wb, 8, 8)``."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, -width % 8, 0, -height % 8), mode="replicate")
    count, channels, full_h, full_w = padded.shape
    blocks = padded.reshape(count, channels, full_h // 8, 8, full_w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    d = dct_matrix(images)
    return torch.einsum("ku,ncijuv,lv->ncijkl", d, blocks, d)


class JPEGAttack(UnforeseenAttack):
    """L∞ attack on the quantised 8×8 DCT coefficients of the image (Kaufmann et al.'s JPEG).

    The image is read as JPEG reads it: YCbCr for 3 channels (each channel alone otherwise), 8×8 blocks on a
    0-255 scale, DCT, division by the quality-``quality`` quantisation table. The adversary moves every
    quantised coefficient by at most ``epsilon`` (in quantisation steps) and decodes. Decoding is linear, so
    this adds ``IDCT(Q ⊙ δ) / 255`` to the image: a perturbation made of JPEG's own blocky basis patterns,
    large in high frequencies (coarse quantisation) and small in low ones.
    """

    kind: Literal["jpeg"] = "jpeg"
    epsilon: float = Field(0.2, ge=0.0, description="L∞ bound on quantised DCT coefficients (steps)")
    steps: int = Field(20, ge=0)
    step_size: float | None = Field(None, gt=0.0, description="None: 2.5 × epsilon / steps")
    quality: int = Field(50, ge=1, le=100, description="JPEG quality whose tables scale the coefficients")
    seed: int = Field(0, ge=0)

    threat_class: ClassVar[str] = "jpeg"

    def decode(self, images: Tensor, coefficients: Tensor) -> Tensor:
        """``images`` with their quantised DCT coefficients moved by ``coefficients``, clamped to [0, 1].

        Colour images move in YCbCr (luma table for Y, chroma table for Cb and Cr) and go back to RGB;
        other channel counts move each channel with the luma table.
        """
        height, width = images.shape[-2:]
        luma = jpeg_table(self.quality, chroma=False, like=images)
        if images.shape[1] != 3:
            return (images + blocks_to_pixels(coefficients * luma, height, width) / 255.0).clamp(0.0, 1.0)
        chroma = jpeg_table(self.quality, chroma=True, like=images)
        table = torch.stack([luma, chroma, chroma])[None, :, None, None]
        change = blocks_to_pixels(coefficients * table, height, width) / 255.0
        # kornia's conversions invert each other exactly; ycbcr_to_rgb clamps to [0, 1]
        return kornia.color.ycbcr_to_rgb(kornia.color.rgb_to_ycbcr(images) + change)

    def _search(self, images: Tensor, generator: torch.Generator) -> Search:
        count, channels, height, width = images.shape
        shape = (count, channels, math.ceil(height / 8), math.ceil(width / 8), 8, 8)
        start = uniform(shape, -self.epsilon, self.epsilon, generator, images)

        def render(variables: list[Tensor]) -> Tensor:
            return self.decode(images, variables[0])

        return Search([start], [(-self.epsilon, self.epsilon)], render)

    def describe(self) -> str:
        return (
            f"JPEG attack ({KAUFMANN}): L∞ on quantised 8×8 DCT coefficients "
            f"(quality {self.quality} tables), "
            f"{self._budget_text()}; block DCT in torch, "
            f"YCbCr from kornia {kornia_version()}"
        )


# ---------------------------------------------------------------------------------------------- Fog


def diamond_square(noise: list[Tensor], decay: float) -> Tensor:
    """A fractal height map from the diamond-square algorithm, on a torus, normalised to [0, 1] per image.

    ``noise[k]`` is ``(N, 3, 2**k, 2**k)`` in [-1, 1]: the random displacements of level ``k`` for the square
    centres and the two kinds of edge midpoints. Each level doubles the resolution, placing every new point
    at the mean of its four neighbours plus a displacement whose scale shrinks by ``decay`` per level.
    Returns ``(N, 2**K, 2**K)`` for ``K = len(noise)``; differentiable in ``noise``.
    """
    count = noise[0].shape[0]
    grid = torch.zeros(count, 1, 1, device=noise[0].device, dtype=noise[0].dtype)
    scale = 1.0
    for level in noise:
        size = grid.shape[-1]
        right, down = grid.roll(-1, dims=-1), grid.roll(-1, dims=-2)
        centre = (grid + right + down + right.roll(-1, dims=-2)) / 4 + scale * level[:, 0]
        # the midpoint between grid[i, j] and grid[i, j+1] also neighbours the centres above and below it
        top = (grid + right + centre + centre.roll(1, dims=-2)) / 4 + scale * level[:, 1]
        # the midpoint between grid[i, j] and grid[i+1, j] also neighbours the centres left and right of it
        left = (grid + down + centre + centre.roll(1, dims=-1)) / 4 + scale * level[:, 2]
        even_rows = torch.stack([grid, top], dim=-1).reshape(count, size, 2 * size)
        odd_rows = torch.stack([left, centre], dim=-1).reshape(count, size, 2 * size)
        grid = torch.stack([even_rows, odd_rows], dim=-2).reshape(count, 2 * size, 2 * size)
        scale /= decay
    return grid


class FogAttack(UnforeseenAttack):
    """Adversarial fog (Kaufmann et al.'s Fog): the random inputs of diamond-square fractal noise, optimised.

    The fog map is a diamond-square fractal whose per-level displacements (in [-1, 1]) are the adversary's
    parameters; it is normalised to [0, 1] and mixed in as ``(x + epsilon · fog) / (1 + epsilon)``, the same
    for every channel (grey fog). ``epsilon`` is the fog's strength; ``wibble_decay`` its smoothness.
    """

    kind: Literal["fog"] = "fog"
    epsilon: float = Field(0.2, ge=0.0, description="fog strength: weight of the fog map in the mix")
    steps: int = Field(20, ge=0)
    step_size: float | None = Field(None, gt=0.0, description="None: 2.5 / steps (parameters in [-1, 1])")
    wibble_decay: float = Field(2.0, gt=1.0, description="how fast the fractal's detail fades per level")
    seed: int = Field(0, ge=0)

    threat_class: ClassVar[str] = "fog"
    unit_box: ClassVar[bool] = True

    def _search(self, images: Tensor, generator: torch.Generator) -> Search:
        count, _, height, width = images.shape
        levels = max(1, math.ceil(math.log2(max(height, width))))
        starts = [uniform((count, 3, 2**k, 2**k), -1.0, 1.0, generator, images) for k in range(levels)]

        def render(variables: list[Tensor]) -> Tensor:
            fog = diamond_square(variables, self.wibble_decay)[:, None, :height, :width]
            low = fog.amin(dim=(-2, -1), keepdim=True)
            high = fog.amax(dim=(-2, -1), keepdim=True)
            fog = (fog - low) / (high - low).clamp_min(1e-12)
            return ((images + self.epsilon * fog) / (1.0 + self.epsilon)).clamp(0.0, 1.0)

        return Search(starts, [(-1.0, 1.0)] * levels, render)

    def describe(self) -> str:
        return (
            f"Fog attack ({KAUFMANN}): adversarial diamond-square fog, {self._budget_text()}, "
            f"wibble decay {self.wibble_decay:g}; fractal in torch"
        )


# --------------------------------------------------------------------------------------------- Snow


class SnowAttack(UnforeseenAttack):
    """Adversarial snow (Kaufmann et al.'s Snow): flake intensities on a sparse grid, smeared into streaks.

    One flake site every ``flake_spacing`` pixels (random offset per image); the adversary sets each flake's
    brightness in ``[0, epsilon]``. Flakes are drawn by convolving the sparse intensities with a line kernel
    of ``flake_length`` pixels at a random angle per image (kornia's motion-blur kernel, peak scaled to 1),
    so a flake is a streak of brightness at most ``epsilon``, added to every channel.
    """

    kind: Literal["snow"] = "snow"
    epsilon: float = Field(0.4, ge=0.0, description="largest brightness of one snowflake streak")
    steps: int = Field(20, ge=0)
    step_size: float | None = Field(None, gt=0.0, description="None: 2.5 × epsilon / steps")
    flake_spacing: int = Field(4, ge=1, description="pixels between flake sites along each axis")
    flake_length: int = Field(5, ge=3, description="streak length in pixels (odd)")
    seed: int = Field(0, ge=0)

    threat_class: ClassVar[str] = "snow"

    def _search(self, images: Tensor, generator: torch.Generator) -> Search:
        if self.flake_length % 2 == 0:
            raise ValueError(f"flake_length must be odd, got {self.flake_length}")
        count, _, height, width = images.shape
        mask = site_mask(images, self.flake_spacing, generator)
        angles = uniform((count,), 0.0, 180.0, generator, images)
        kernels = kornia.filters.get_motion_kernel2d(
            self.flake_length, angles, torch.zeros_like(angles), mode="bilinear"
        )
        kernels = kernels / kernels.amax(dim=(-2, -1), keepdim=True)
        start = uniform((count, 1, height, width), 0.0, self.epsilon, generator, images)

        def render(variables: list[Tensor]) -> Tensor:
            snow = kornia.filters.filter2d(variables[0] * mask, kernels, border_type="constant")
            return (images + snow).clamp(0.0, 1.0)

        return Search([start], [(0.0, self.epsilon)], render)

    def describe(self) -> str:
        return (
            f"Snow attack ({KAUFMANN}): adversarial flake intensities, {self._budget_text()}, flakes every "
            f"{self.flake_spacing} px as {self.flake_length}-px streaks; "
            f"kornia {kornia_version()} motion kernels and filter2d"
        )


# -------------------------------------------------------------------------------------------- Gabor


def gabor_kernels(size: int, sigma: float, wavelength: float, angles: Tensor) -> Tensor:
    """``(N, size, size)`` Gabor kernels: a cosine of ``wavelength`` pixels at ``angles`` (radians) under a
    Gaussian envelope of ``sigma`` pixels."""
    half = (size - 1) / 2
    axis = torch.linspace(-half, half, size, device=angles.device, dtype=angles.dtype)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    cos, sin = angles.cos().view(-1, 1, 1), angles.sin().view(-1, 1, 1)
    along = xs * cos + ys * sin
    envelope = torch.exp(-(xs**2 + ys**2) / (2 * sigma**2))
    return envelope * torch.cos(2 * math.pi * along / wavelength)


class GaborAttack(UnforeseenAttack):
    """Adversarial Gabor noise (Kaufmann et al.'s Gabor): sparse coefficients convolved with a Gabor kernel.

    Coefficients in [-1, 1] sit on a sparse grid (one every ``spacing`` pixels, random offset per image);
    convolved with a Gabor kernel of random orientation per image they make an oriented texture, which is
    scaled to L∞ size exactly ``epsilon`` and added to every channel. The budget is an L∞ ball, but only
    this textured direction of it is searched.
    """

    kind: Literal["gabor"] = "gabor"
    epsilon: float = Field(0.25, ge=0.0, description="L∞ size of the Gabor noise in pixels")
    steps: int = Field(20, ge=0)
    step_size: float | None = Field(None, gt=0.0, description="None: 2.5 / steps (parameters in [-1, 1])")
    kernel_size: int = Field(11, ge=3, description="Gabor kernel side in pixels (odd)")
    sigma: float = Field(2.5, gt=0.0, description="Gaussian envelope of the kernel, pixels")
    wavelength: float = Field(5.0, gt=0.0, description="period of the kernel's cosine, pixels")
    spacing: int = Field(3, ge=1, description="pixels between coefficient sites along each axis")
    seed: int = Field(0, ge=0)

    threat_class: ClassVar[str] = "gabor"
    unit_box: ClassVar[bool] = True

    def _search(self, images: Tensor, generator: torch.Generator) -> Search:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        count, _, height, width = images.shape
        mask = site_mask(images, self.spacing, generator)
        angles = uniform((count,), 0.0, math.pi, generator, images)
        kernels = gabor_kernels(self.kernel_size, self.sigma, self.wavelength, angles)
        start = uniform((count, 1, height, width), -1.0, 1.0, generator, images)

        def render(variables: list[Tensor]) -> Tensor:
            noise = kornia.filters.filter2d(variables[0] * mask, kernels, border_type="constant")
            size = noise.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
            return (images + self.epsilon * noise / size).clamp(0.0, 1.0)

        return Search([start], [(-1.0, 1.0)], render)

    def describe(self) -> str:
        return (
            f"Gabor attack ({KAUFMANN}): adversarial sparse Gabor noise, {self._budget_text()}, "
            f"kernel {self.kernel_size} px (sigma {self.sigma:g}, wavelength {self.wavelength:g}), "
            f"kernels in torch, kornia {kornia_version()} filter2d"
        )


# ------------------------------------------------------------------------------------------ Elastic


class ElasticAttack(UnforeseenAttack):
    """Adversarial elastic deformation (Kaufmann et al.'s Elastic): a smooth flow field, L∞-bounded.

    The adversary sets a per-pixel displacement field in [-1, 1]; kornia's ``elastic_transform2d`` smooths it
    with a Gaussian (``sigma`` pixels) and scales it so that no pixel moves more than ``epsilon`` pixels
    along either axis (a Gaussian average of values in [-1, 1] stays in [-1, 1]), then resamples the image
    bilinearly (edge pixels repeat beyond the border).
    """

    kind: Literal["elastic"] = "elastic"
    epsilon: float = Field(0.75, ge=0.0, description="largest displacement in pixels, along each axis")
    steps: int = Field(20, ge=0)
    step_size: float | None = Field(None, gt=0.0, description="None: 2.5 / steps (parameters in [-1, 1])")
    sigma: float = Field(1.5, gt=0.0, description="Gaussian smoothing of the flow field, pixels")
    seed: int = Field(0, ge=0)

    threat_class: ClassVar[str] = "elastic"
    unit_box: ClassVar[bool] = True

    def _search(self, images: Tensor, generator: torch.Generator) -> Search:
        count, _, height, width = images.shape
        kernel = 2 * math.ceil(3 * self.sigma) + 1
        # kornia's displacement is in normalised coordinates ([-1, 1] over the image, align_corners=False)
        alpha = (2.0 * self.epsilon / width, 2.0 * self.epsilon / height)
        start = uniform((count, 2, height, width), -1.0, 1.0, generator, images)

        def render(variables: list[Tensor]) -> Tensor:
            warped = kornia.geometry.transform.elastic_transform2d(
                images, variables[0], (kernel, kernel), (self.sigma, self.sigma), alpha, padding_mode="border"
            )
            return warped.clamp(0.0, 1.0)

        return Search([start], [(-1.0, 1.0)], render)

    def describe(self) -> str:
        return (
            f"Elastic attack ({KAUFMANN}): adversarial Gaussian-smoothed flow (sigma {self.sigma:g} px), "
            f"{self._budget_text()} (pixels); "
            f"kornia {kornia_version()} elastic_transform2d"
        )


# -------------------------------------------------------------------------------------------- StAdv


def flow_smoothness(flow: Tensor) -> Tensor:
    """StAdv's flow loss per image: Σ over pixels and their 4 neighbours of ‖flow(p) − flow(q)‖₂.

    Zero-padded at the border as in Xiao et al.; a small constant inside the root keeps the gradient finite.
    """
    padded = F.pad(flow, (1, 1, 1, 1))
    total = flow.new_zeros(flow.shape[0])
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = padded[..., 1 + dy : padded.shape[-2] - 1 + dy, 1 + dx : padded.shape[-1] - 1 + dx]
        total = total + ((flow - neighbour).pow(2).sum(dim=1) + 1e-8).sqrt().sum(dim=(-2, -1))
    return total


def warp_by_flow(images: Tensor, flow: Tensor) -> Tensor:
    """``images`` sampled bilinearly at each pixel plus ``flow`` (``(N, 2, H, W)``: x then y, in pixels)."""
    height, width = images.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, device=images.device, dtype=images.dtype),
        torch.arange(width, device=images.device, dtype=images.dtype),
        indexing="ij",
    )
    map_x, map_y = xs + flow[:, 0], ys + flow[:, 1]
    return kornia.geometry.transform.remap(
        images, map_x, map_y, mode="bilinear", padding_mode="border", align_corners=True
    )


class StAdvAttack(UnforeseenAttack):
    """StAdv (Xiao et al. 2018): an adversarial per-pixel flow field with a smoothness penalty.

    Each pixel samples the image at its own displaced position (bilinear). The adversary maximises the
    cross-entropy minus ``smoothness`` × the flow loss (total variation of the flow between 4-neighbours,
    which keeps the deformation locally coherent), with every displacement bounded by ``epsilon`` pixels
    along each axis (the budget of later StAdv evaluations; the paper itself used only the penalty).
    """

    kind: Literal["stadv"] = "stadv"
    epsilon: float = Field(0.5, ge=0.0, description="largest displacement of a pixel in pixels, each axis")
    steps: int = Field(20, ge=0)
    step_size: float | None = Field(None, gt=0.0, description="None: 2.5 × epsilon / steps")
    smoothness: float = Field(0.005, ge=0.0, description="weight of the flow loss (Xiao et al.'s tau)")
    seed: int = Field(0, ge=0)

    threat_class: ClassVar[str] = "stadv"

    def _search(self, images: Tensor, generator: torch.Generator) -> Search:
        count, _, height, width = images.shape
        start = uniform((count, 2, height, width), -self.epsilon, self.epsilon, generator, images)

        def render(variables: list[Tensor]) -> Tensor:
            return warp_by_flow(images, variables[0]).clamp(0.0, 1.0)

        def penalty(variables: list[Tensor]) -> Tensor:
            return self.smoothness * flow_smoothness(variables[0])

        return Search([start], [(-self.epsilon, self.epsilon)], render, penalty)

    def describe(self) -> str:
        return (
            f"StAdv attack ({XIAO}): adversarial per-pixel flow, {self._budget_text()} (pixels), "
            f"flow-loss weight {self.smoothness:g}; "
            f"kornia {kornia_version()} remap"
        )


NonLpAttack = JPEGAttack | FogAttack | SnowAttack | GaborAttack | ElasticAttack | StAdvAttack
ATTACKS: dict[str, type[UnforeseenAttack]] = {
    cls.threat_class: cls
    for cls in (JPEGAttack, FogAttack, SnowAttack, GaborAttack, ElasticAttack, StAdvAttack)
}

for _attack in ATTACKS.values():
    IMAGE_ATTACKS.register(_attack.threat_class, _attack)
