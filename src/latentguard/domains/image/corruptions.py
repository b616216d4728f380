"""Common corruptions (Hendrycks & Dietterich 2019): natural, non-adversarial shifts at five severities.

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019) measures
accuracy under noise, blur, weather and digital corruptions, each at severities 1-5, and reports the mean over
corruptions and severities. Here are the ones that make sense for small greyscale or colour images: Gaussian
noise, Gaussian and defocus blur, contrast, brightness, pixelate, JPEG compression and an elastic transform.
Severity parameters that do not depend on image size (noise, contrast, brightness, JPEG quality) are
ImageNet-C's; those measured in pixels or relative to the size (blurs, pixelate) are the ones the authors used
for 32×32 CIFAR-10-C, since ImageNet-C's (for 224×224) would erase a 28×28 image. The elastic transform is a
simpler smooth random warp of a pixel or two. Blurs, colour conversion and the warp are kornia's, JPEG is a
real Pillow JPEG round trip. Every corruption is seeded: the same suite on the same images gives the same
numbers.
"""

from __future__ import annotations

import io
import math
from typing import Annotated, Any, ClassVar, Literal, get_args

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from latentguard.domains.image.unforeseen import check_images, kornia_version, uniform
from latentguard.registry import IMAGE_ATTACKS

CorruptionName = Literal[
    "gaussian_noise",
    "gaussian_blur",
    "defocus_blur",
    "contrast",
    "brightness",
    "pixelate",
    "jpeg_compression",
    "elastic_transform",
]
CORRUPTIONS: tuple[CorruptionName, ...] = get_args(CorruptionName)

# Severity 1..5 parameters. Those that do not depend on image size (noise, contrast, brightness, JPEG quality)
# are ImageNet-C's; those in pixels or relative to the size (blurs, pixelate) are CIFAR-10-C's (32×32).
NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # Gaussian noise standard deviation (ImageNet-C)
BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)  # Gaussian blur sigma in pixels (CIFAR-10-C)
DEFOCUS = (
    (0.3, 0.4),
    (0.4, 0.5),
    (0.5, 0.6),
    (1.0, 0.2),
    (1.5, 0.1),
)  # disk radius, alias sigma (CIFAR-10-C)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor on the deviation from the per-channel mean (ImageNet-C)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value, to the intensity if grey (ImageNet-C)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # downsampling factor before upsampling back (CIFAR-10-C)
JPEG_QUALITY = (25, 18, 15, 10, 7)  # (ImageNet-C)
# Elastic: largest displacement (pixels) of a random field smoothed by a Gaussian of ELASTIC_SIGMA pixels.
# The papers compose a random affine map with a rough elastic field; one smooth field of growing size keeps
# the severities ordered and the garment recognisable at 28×28.
ELASTIC_DISPLACEMENT = (0.5, 0.8, 1.1, 1.4, 1.8)
ELASTIC_SIGMA = 2.0


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    size = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(images, (size, size), (sigma, sigma), border_type="reflect")


def _defocus_blur(images: Tensor, radius: float, alias_sigma: float) -> Tensor:
    """Convolution with a disk of ``radius`` pixels, the disk itself softened by a small Gaussian."""
    reach = math.ceil(radius) + 1
    axis = torch.arange(-reach, reach + 1, device=images.device, dtype=images.dtype)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    disk = (xs**2 + ys**2 <= radius**2).to(images.dtype)
    disk = _gaussian_blur(disk[None, None] / disk.sum(), alias_sigma)[0]
    return kornia.filters.filter2d(images, disk / disk.sum(), border_type="reflect")


def _brightness(images: Tensor, amount: float) -> Tensor:
    if images.shape[1] != 3:
        return (images + amount).clamp(0.0, 1.0)
    hsv = kornia.color.rgb_to_hsv(images)
    value = (hsv[:, 2:] + amount).clamp(0.0, 1.0)
    return kornia.color.hsv_to_rgb(torch.cat([hsv[:, :2], value], dim=1))


def _pixelate(images: Tensor, factor: float) -> Tensor:
    height, width = images.shape[-2:]
    small = F.interpolate(images, size=(int(height * factor), int(width * factor)), mode="area")
    return F.interpolate(small, size=(height, width), mode="nearest")


def _jpeg(images: Tensor, quality: int) -> Tensor:
    """A real JPEG encode/decode (Pillow) of each image, colour as RGB and any other channel as greyscale."""
    pixels = (images.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    out = np.empty_like(pixels)
    for index, image in enumerate(pixels):
        planes = [image.transpose(1, 2, 0)] if image.shape[0] == 3 else list(image)
        decoded = []
        for plane in planes:
            buffer = io.BytesIO()
            Image.fromarray(plane).save(buffer, format="JPEG", quality=quality)
            decoded.append(np.asarray(Image.open(buffer)))
        out[index] = decoded[0].transpose(2, 0, 1) if image.shape[0] == 3 else np.stack(decoded)
    return torch.from_numpy(out).to(device=images.device, dtype=images.dtype) / 255.0


def _elastic(images: Tensor, displacement: float, generator: torch.Generator) -> Tensor:
    count, _, height, width = images.shape
    noise = uniform((count, 2, height, width), -1.0, 1.0, generator, images)
    size = 2 * math.ceil(3 * ELASTIC_SIGMA) + 1
    smooth = kornia.filters.gaussian_blur2d(noise, (size, size), (ELASTIC_SIGMA, ELASTIC_SIGMA))
    field = smooth / smooth.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)  # max 1 per axis
    alpha = (2.0 * displacement / width, 2.0 * displacement / height)  # pixels -> normalised coordinates
    # the field is already smooth: kornia's own smoothing is reduced to the identity (a 1×1 kernel)
    return kornia.geometry.transform.elastic_transform2d(
        images, field, (1, 1), (1.0, 1.0), alpha, padding_mode="border"
    )


def corrupt(images: Tensor, name: CorruptionName, severity: int, generator: torch.Generator) -> Tensor:
    """``images`` (N, C, H, W) in [0, 1] under one corruption at ``severity`` 1-5; new tensor, in [0, 1].

    Only ``gaussian_noise`` and ``elastic_transform`` are random; they draw from ``generator``.
    """
    check_images(images)
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    level = severity - 1
    if name == "gaussian_noise":
        noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
        out = images + NOISE_STD[level] * noise
    elif name == "gaussian_blur":
        out = _gaussian_blur(images, BLUR_SIGMA[level])
    elif name == "defocus_blur":
        out = _defocus_blur(images, *DEFOCUS[level])
    elif name == "contrast":
        means = images.mean(dim=(-2, -1), keepdim=True)
        out = (images - means) * CONTRAST[level] + means
    elif name == "brightness":
        out = _brightness(images, BRIGHTNESS[level])
    elif name == "pixelate":
        out = _pixelate(images, PIXELATE[level])
    elif name == "jpeg_compression":
        out = _jpeg(images, JPEG_QUALITY[level])
    elif name == "elastic_transform":
        out = _elastic(images, ELASTIC_DISPLACEMENT[level], generator)
    else:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    return out.clamp(0.0, 1.0)


Severity = Annotated[int, Field(ge=1, le=5)]


class CorruptionSuite(BaseModel):
    """Accuracy under common corruptions: every chosen corruption at every chosen severity, on a fixed subset.

    The headline number is the mean corruption accuracy over corruptions × severities, as in Hendrycks &
    Dietterich (their mCE further normalises by AlexNet's errors, which have no analogue here).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["corruption"] = "corruption"
    corruptions: list[CorruptionName] = Field(default_factory=lambda: list(CORRUPTIONS), min_length=1)
    severities: list[Severity] = Field(default_factory=lambda: [1, 2, 3, 4, 5], min_length=1)
    seed: int = Field(0, ge=0, description="seeds the random corruptions (noise, elastic)")
    batch_size: int = Field(250, gt=0)

    threat_class: ClassVar[str] = "corruption"

    @field_validator("corruptions", "severities")
    @classmethod
    def _each_once(cls, values: list[Any]) -> list[Any]:
        """A corruption or severity listed twice would count twice in the mean."""
        if len(set(values)) != len(values):
            raise ValueError(f"each value at most once, got {values}")
        return values

    def generator(self, name: CorruptionName, severity: int) -> torch.Generator:
        """A generator per corruption and severity: a subset of the suite gives the same numbers."""
        return torch.Generator().manual_seed(self.seed * 1_000 + 10 * CORRUPTIONS.index(name) + severity)

    def accuracy_table(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, dict[int, float]]:
        """Accuracy on ``images`` (the evaluation's fixed subset) per corruption and severity."""
        check_images(images)
        count = labels.shape[0]
        if count == 0:
            raise ValueError("no test images to corrupt")
        images, labels = images[:count], labels[:count]
        was_training = model.training
        model.eval()
        table: dict[str, dict[int, float]] = {}
        try:
            with torch.no_grad():
                for name in self.corruptions:
                    table[name] = {}
                    for severity in self.severities:
                        # the whole subset at once: the random draws do not depend on batch_size
                        corrupted = corrupt(images, name, severity, self.generator(name, severity))
                        correct = 0
                        for start in range(0, count, self.batch_size):
                            predictions = model(corrupted[start : start + self.batch_size]).argmax(dim=-1)
                            correct += int((predictions == labels[start : start + self.batch_size]).sum())
                        table[name][severity] = correct / count
        finally:
            model.train(was_training)
        return table

    def evaluate(self, model: nn.Module, images: Tensor, labels: Tensor) -> tuple[float, dict[str, float]]:
        """(mean accuracy over corruptions × severities, accuracy per corruption averaged over severities)."""
        table = self.accuracy_table(model, images, labels)
        per_corruption = {name: sum(row.values()) / len(row) for name, row in table.items()}
        return sum(per_corruption.values()) / len(per_corruption), per_corruption

    def describe(self) -> str:
        return (
            f"common corruptions (Hendrycks & Dietterich 2019; ImageNet-C / CIFAR-10-C severities): "
            f"{', '.join(self.corruptions)} at severities {','.join(map(str, self.severities))}; "
            f"blur, colour and warp from kornia {kornia_version()}, "
            f"JPEG from Pillow {Image.__version__}"
        )


IMAGE_ATTACKS.register("corruption", CorruptionSuite)
