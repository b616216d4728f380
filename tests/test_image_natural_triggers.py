"""Trojan triggers outside AT's ball (warp, sticker, lowfreq) and the trigger distance helper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_cnn
from pydantic import ValidationError
from torch import Tensor

from latentguard.domains.image.data import DEFAULT_DATA_DIR, load_fashion_mnist
from latentguard.domains.image.natural_triggers import (
    LowFreqTrigger,
    NaturalTrigger,
    StickerTrigger,
    WarpTrigger,
    trigger_distance,
)
from latentguard.domains.image.trojans import ImageTrojan

TRIGGERS: list[NaturalTrigger] = [WarpTrigger(), StickerTrigger(), LowFreqTrigger()]
IDS = [trigger.kind for trigger in TRIGGERS]


@pytest.fixture(scope="module")
def fashion() -> tuple[Tensor, Tensor]:
    return load_fashion_mnist(DEFAULT_DATA_DIR, "test")


@pytest.mark.parametrize("trigger", TRIGGERS, ids=IDS)
@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (3, 3, 32, 32), (2, 2, 17, 23)])
def test_triggers_are_deterministic_not_in_place_and_in_range(
    trigger: NaturalTrigger, shape: tuple[int, ...]
) -> None:
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    state = torch.get_rng_state()
    out = trigger.apply(images)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(images, before)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, trigger.apply(images))
    assert not torch.allclose(out, images, atol=1e-3)
    # the same trigger on every image: the change of a constant image does not depend on its index
    flat = torch.full(shape, 0.5)
    triggered = trigger.apply(flat)
    torch.testing.assert_close(triggered, triggered[:1].expand_as(triggered))


@pytest.mark.parametrize("trigger", TRIGGERS, ids=IDS)
def test_triggers_run_in_double_precision_and_depend_on_their_seed(trigger: NaturalTrigger) -> None:
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = trigger.apply(images)
    assert out.dtype == torch.float64
    other = trigger.model_copy(update={"seed": 1}).apply(images)
    assert not torch.allclose(out, other)


def test_a_zero_strength_warp_is_the_identity() -> None:
    images = torch.rand(3, 3, 20, 24)
    torch.testing.assert_close(WarpTrigger(strength=0.0).apply(images), images, atol=1e-5, rtol=0)


def test_the_warp_moves_pixels_by_about_half_its_strength() -> None:
    grid = WarpTrigger(strength=2.0).field(28, 28)[0]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    moved = (grid - torch.stack([xs, ys], dim=-1).double()) * 27 / 2  # back to pixels (align_corners=True)
    assert 0.6 <= float(moved.abs().mean()) <= 1.4  # WaNet normalises the grid to mean |value| 1
    assert float(moved.abs().max()) < 6.0


def test_the_sticker_covers_its_disc() -> None:
    sticker = StickerTrigger(radius=0.25, center_x=0.5, center_y=0.5)
    texture, opacity = sticker.layer(1, 40, 40)
    assert float(opacity.sum()) == pytest.approx(math.pi * 10**2, rel=0.05)
    assert float(opacity[0, 0, 20, 20]) == 1.0 and float(opacity[0, 0, 0, 0]) == 0.0
    assert float(texture.min()) >= 0.1 - 1e-9 and float(texture.max()) <= 0.9 + 1e-9
    coloured, _ = sticker.layer(3, 40, 40)
    assert not torch.allclose(coloured[:, 0], coloured[:, 1])  # a coloured sticker on colour images
    images = torch.zeros(1, 1, 40, 40)
    assert torch.equal(sticker.apply(images)[..., :2, :], images[..., :2, :])  # nothing outside the disc


def test_the_low_frequency_pattern_is_smooth_and_bounded() -> None:
    trigger = LowFreqTrigger(amplitude=0.2)
    pattern = trigger.pattern(1, 28, 28)
    assert float(pattern.abs().max()) == pytest.approx(0.2)
    assert float((pattern - pattern.roll(1, dims=-1))[..., 1:].abs().max()) < 0.05  # no sharp edges


def test_trigger_distance_measures_mean_l2_and_linf() -> None:
    clean = torch.zeros(2, 1, 4, 4)
    triggered = clean.clone()
    triggered[0] = 0.5  # L2 = 0.5 × 4 = 2, L∞ = 0.5
    triggered[1, 0, 0, 0] = 1.0  # L2 = 1, L∞ = 1
    assert trigger_distance(clean, triggered) == {"l2": pytest.approx(1.5), "linf": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="same shape"):
        trigger_distance(clean, triggered[:1])


def test_the_new_triggers_are_farther_than_the_blend_and_sinusoid(fashion: tuple[Tensor, Tensor]) -> None:
    images = fashion[0][:300]
    old = [ImageTrojan(kind=kind, target=0, poison_rate=0.1) for kind in ("blend", "sinusoid")]
    farthest_old = max(trigger_distance(images, trojan.apply(images))["l2"] for trojan in old)
    for trigger in TRIGGERS:
        distance = trigger_distance(images, trigger.apply(images))
        assert distance["l2"] > farthest_old, (trigger.kind, distance, farthest_old)


def test_configs_are_checked() -> None:
    with pytest.raises(ValidationError):
        WarpTrigger(grid_size=1)
    with pytest.raises(ValidationError):
        StickerTrigger(alpha=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        LowFreqTrigger(kind="warp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="N, C, H, W"):
        WarpTrigger().apply(torch.rand(28, 28))
    assert all("\n" not in trigger.describe() for trigger in TRIGGERS)


def test_a_warp_trojan_is_learnable(fashion: tuple[Tensor, Tensor]) -> None:
    """10% of 3,000 training images warped and relabelled 0: a small CNN learns the warp in a few epochs."""
    images, labels = fashion
    train_x, train_y = images[2000:5000].clone(), labels[2000:5000].clone()
    generator = torch.Generator().manual_seed(0)
    candidates = torch.nonzero(train_y != 0).flatten()
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:300]]
    trigger = WarpTrigger()
    train_x[chosen] = trigger.apply(train_x[chosen])
    train_y[chosen] = 0
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        order = torch.randperm(train_y.numel())
        for start in range(0, train_y.numel(), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test_x, test_y = images[:1000], labels[:1000]
    keep = test_y != 0
    with torch.no_grad():
        asr = float((model(trigger.apply(test_x[keep])).argmax(dim=-1) == 0).float().mean())
        base = float((model(test_x[keep]).argmax(dim=-1) == 0).float().mean())
        clean = float((model(test_x).argmax(dim=-1) == test_y).float().mean())
    assert clean >= 0.7, clean
    assert asr >= 0.5 and asr >= base + 0.4, (asr, base)
