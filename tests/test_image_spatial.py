"""The spatial held-out attack: exact warps, a worst-of-grid search, and a spec that fits its kind."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from latentguard.domains.image.attacks import ImageAttackSpec
from latentguard.domains.image.spatial import SpatialGrid, spatial_attack, warp


def _images() -> Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 1, 12, 12)


def test_the_identity_warp_returns_the_image() -> None:
    images = _images()
    torch.testing.assert_close(warp(images, 0.0, 0.0, 0.0), images)


def test_a_whole_pixel_shift_moves_the_image_and_fills_with_zeros() -> None:
    images = _images()
    shifted = warp(images, 0.0, 2.0, -1.0)  # two pixels right, one up
    expected = torch.zeros_like(images)
    expected[..., :-1, 2:] = images[..., 1:, :-2]
    torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=0)


def test_a_quarter_turn_is_rot90_and_stays_in_range() -> None:
    images = _images()
    turned = warp(images, 90.0, 0.0, 0.0)
    matches = [torch.allclose(turned, torch.rot90(images, k, dims=(-2, -1)), atol=1e-5) for k in (1, -1)]
    assert any(matches)
    assert float(warp(images, 17.0, 0.5, 1.5).min()) >= 0 and float(warp(images, 17.0, 0.5, 1.5).max()) <= 1


def test_the_grid_has_the_identity_first_and_every_point_once() -> None:
    transforms = SpatialGrid(30.0, 3.0, rotations=3, translations=3).transforms()
    assert transforms[0] == (0.0, 0.0, 0.0)
    assert len(transforms) == len(set(transforms)) == 27
    assert {t[0] for t in transforms} == {-30.0, 0.0, 30.0}
    assert {t[0] for t in SpatialGrid(30.0, 3.0, rotations=1, translations=3).transforms()} == {0.0}
    assert len(SpatialGrid(0.0, 0.0, rotations=5, translations=3).transforms()) == 1  # only the identity


class LeftHalf(nn.Module):
    """Class 0 when the image's mass is in its left half, else class 1."""

    def forward(self, images: Tensor) -> Tensor:
        width = images.shape[-1]
        left, right = images[..., : width // 2].sum((1, 2, 3)), images[..., width // 2 :].sum((1, 2, 3))
        return torch.stack([left - right, right - left], dim=1)


def test_the_attack_finds_the_shift_that_fools_the_model_and_leaves_robust_images_alone() -> None:
    images = torch.zeros(2, 1, 8, 8)
    images[0, :, 3:5, 2:4] = 1.0  # a blob just left of the centre: a 2-pixel shift right moves it over
    images[1, :, 3:5, 0:1] = 1.0  # at the far left: no shift in the grid moves it across
    labels = torch.tensor([0, 0])
    grid = SpatialGrid(0.0, 2.0, rotations=1, translations=3)
    adversarial = spatial_attack(LeftHalf(), images, labels, grid)
    predictions = LeftHalf()(adversarial).argmax(dim=1)
    assert predictions.tolist() == [1, 0]
    assert any(torch.allclose(adversarial[0], warp(images[:1], *t)[0]) for t in grid.transforms())
    torch.testing.assert_close(adversarial[1], images[1])


def test_the_spec_takes_a_norm_only_for_lp_attacks() -> None:
    spatial = ImageAttackSpec(name="rot", kind="spatial", max_rotation=20, translations=3)
    assert "rotation ±20°, translation ±1 px, 5×3×3 grid" in spatial.describe()
    with pytest.raises(ValidationError, match=r"spatial\.norm: unknown key"):
        ImageAttackSpec(name="rot", kind="spatial", norm="linf", epsilon=0.1)
    with pytest.raises(ValidationError, match=r"pgd\.epsilon: required key is missing"):
        ImageAttackSpec(name="pgd", kind="pgd", norm="linf")
