"""Non-Lp image attacks (JPEG, Fog, Snow, Gabor, Elastic, StAdv) and common corruptions.

A small CNN trained for a few seconds on real Fashion-MNIST (the Debian package is required, as in
``test_image_domain.py``) is the undefended model: each attack must hurt it far more than random parameters
of the same budget, a zero budget must change nothing, and outputs must stay images.
"""

from __future__ import annotations

import itertools
import math

import kornia
import pytest
import torch
import torch.nn.functional as F
from conftest import small_cnn
from pydantic import ValidationError
from torch import Tensor, nn

from latentguard.domains.image.corruptions import CORRUPTIONS, CorruptionSuite, corrupt
from latentguard.domains.image.data import DEFAULT_DATA_DIR, load_fashion_mnist
from latentguard.domains.image.unforeseen import (
    ATTACKS,
    ElasticAttack,
    FogAttack,
    GaborAttack,
    JPEGAttack,
    SnowAttack,
    StAdvAttack,
    UnforeseenAttack,
    blocks_to_pixels,
    dct_matrix,
    diamond_square,
    flow_smoothness,
    jpeg_table,
    pixels_to_blocks,
)

KINDS = sorted(ATTACKS)
EVAL_IMAGES = 150


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    """A small CNN trained on 3,000 Fashion-MNIST images (~80% accuracy), and 150 other images."""
    test_images, test_labels = load_fashion_mnist(DEFAULT_DATA_DIR, "test")  # one file: the smaller one
    images, labels = test_images[1000:4000], test_labels[1000:4000]  # disjoint from the ones evaluated
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        order = torch.randperm(labels.shape[0])
        for start in range(0, labels.shape[0], 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, test_images[:EVAL_IMAGES], test_labels[:EVAL_IMAGES]


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(dim=-1) == labels).float().mean())


def zero_budget(kind: str) -> UnforeseenAttack:
    cls = ATTACKS[kind]
    return cls.model_validate({cls.budget_name: 0.0, "steps": 3})


# ------------------------------------------------------------------------------------------- attacks


def test_the_trained_model_is_a_fair_target(trained: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, images, labels = trained
    assert accuracy(model, images, labels) >= 0.7


@pytest.mark.parametrize("kind", KINDS)
def test_a_zero_budget_returns_the_images(kind: str, trained: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, images, labels = trained
    out = zero_budget(kind).perturb(model, images[:32], labels[:32])
    torch.testing.assert_close(out, images[:32], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_zero_budget_on_colour_images_returns_them(kind: str) -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = small_cnn(channels=3, side=32).eval()
    out = zero_budget(kind).perturb(model, images, torch.arange(4))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_attack_hurts_far_more_than_random_parameters_of_its_budget(
    kind: str, trained: tuple[nn.Module, Tensor, Tensor]
) -> None:
    model, images, labels = trained
    attack = ATTACKS[kind]()
    clean = accuracy(model, images, labels)
    adversarial = accuracy(model, attack.perturb(model, images, labels), labels)
    random = accuracy(model, attack.model_copy(update={"steps": 0}).perturb(model, images, labels), labels)
    # random parameters cost this model 0-3 points of accuracy; the optimised ones at least 15
    assert adversarial <= random - 0.15, (clean, random, adversarial)
    assert adversarial >= 0.02, f"default {kind} budget leaves nothing: {adversarial}"  # not a total wipe


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_are_detached_images_of_the_same_shape_and_the_rng_is_untouched(kind: str) -> None:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 32, 32, generator=generator)
    model = small_cnn(channels=3, side=32).eval()
    attack = ATTACKS[kind](steps=2)
    state = torch.get_rng_state()
    out = attack.perturb(model, images, torch.tensor([0, 1, 2]))
    assert torch.equal(torch.get_rng_state(), state)
    assert out.shape == images.shape and out.dtype == images.dtype and not out.requires_grad
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, images)
    again = attack.perturb(model, images, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out, again)  # seeded: the same call gives the same images
    other_seed = attack.model_copy(update={"seed": 1}).perturb(model, images, torch.tensor([0, 1, 2]))
    assert not torch.equal(out, other_seed)


@pytest.mark.parametrize("kind", KINDS)
def test_attacks_run_in_double_precision_on_odd_sizes(kind: str) -> None:
    images = torch.rand(2, 1, 19, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(19 * 13, 4)).double().eval()
    out = ATTACKS[kind](steps=1).perturb(model, images, torch.tensor([0, 3]))
    assert out.shape == images.shape and out.dtype == torch.float64


def test_every_attack_describes_its_paper_budget_and_library_and_has_its_own_threat_class() -> None:
    classes = [cls.threat_class for cls in ATTACKS.values()]
    assert sorted(classes) == KINDS == ["elastic", "fog", "gabor", "jpeg", "snow", "stadv"]
    for kind, cls in ATTACKS.items():
        attack = cls()
        assert attack.kind == kind and next(iter(cls.model_fields)) == "kind"
        line = attack.describe()
        assert "\n" not in line and f"{attack.budget_name}={attack.budget:g}" in line
        assert ("Kaufmann" in line or "Xiao" in line) and f"{attack.steps} steps" in line
    assert "kornia" in SnowAttack().describe() and "kornia" in ElasticAttack().describe()


def test_configs_are_checked() -> None:
    with pytest.raises(ValidationError):
        FogAttack(epsilon=-0.1)
    with pytest.raises(ValidationError):
        JPEGAttack(norm="linf")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SnowAttack(kind="fog")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="odd"):
        SnowAttack(flake_length=4).perturb(nn.Flatten(), torch.rand(1, 1, 8, 8), torch.tensor([0]))


def test_the_default_step_is_scaled_to_the_box() -> None:
    assert JPEGAttack(epsilon=0.4, steps=10).step == pytest.approx(0.1)
    assert FogAttack(epsilon=0.4, steps=10).step == pytest.approx(0.25)  # its parameters live in [-1, 1]
    assert StAdvAttack(step_size=0.01).step == 0.01


def test_the_block_dct_is_orthonormal_and_inverts() -> None:
    d = dct_matrix(torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(d @ d.T, torch.eye(8, dtype=torch.float64))
    images = torch.rand(2, 3, 19, 26, dtype=torch.float64)
    torch.testing.assert_close(blocks_to_pixels(pixels_to_blocks(images), 19, 26), images)
    flat = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    coefficients = pixels_to_blocks(flat)
    assert float(coefficients[..., 0, 0]) == pytest.approx(4.0)  # DC = 8 × mean for the orthonormal DCT
    ac = coefficients.abs().sum() - coefficients[..., 0, 0].abs().sum()
    assert float(ac) == pytest.approx(0.0, abs=1e-9)  # a flat block has no AC energy


def test_jpeg_tables_follow_the_standard_scaling() -> None:
    like = torch.zeros(1)
    assert jpeg_table(50, chroma=False, like=like)[0, 0] == 16 and jpeg_table(50, True, like)[7, 7] == 99
    assert torch.all(jpeg_table(100, chroma=False, like=like) == 1)
    assert jpeg_table(25, chroma=False, like=like)[0, 0] == 32  # quality 25 doubles the quality-50 table


def test_jpeg_moves_each_quantised_coefficient_by_at_most_epsilon(
    trained: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, _, labels = trained
    images = 0.5 + 0.05 * torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    attack = JPEGAttack(epsilon=0.1, steps=5)
    out = attack.perturb(model, images, labels[:16])
    assert float(out.min()) > 0.0 and float(out.max()) < 1.0  # nothing clipped: the change is pure DCT
    moved = pixels_to_blocks((out - images).double() * 255.0) / jpeg_table(50, False, torch.zeros(1)).double()
    moved = moved[:, :, :3, :3]  # the 3×3 whole blocks of 28×28 (the edge blocks were padded, then cropped)
    assert float(moved.abs().max()) <= 0.1 + 1e-3
    assert float(moved.abs().max()) >= 0.05  # and the attack uses its budget


def test_colour_jpeg_moves_each_ycbcr_coefficient_by_at_most_epsilon() -> None:
    images = 0.45 + 0.1 * torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    model = small_cnn(channels=3, side=32).eval()
    out = JPEGAttack(epsilon=0.1, steps=3).perturb(model, images, torch.arange(4))
    assert float(out.min()) > 0.0 and float(out.max()) < 1.0
    change = kornia.color.rgb_to_ycbcr(out) - kornia.color.rgb_to_ycbcr(images)
    like = torch.zeros(1, dtype=torch.float64)
    table = torch.stack([jpeg_table(50, False, like), jpeg_table(50, True, like), jpeg_table(50, True, like)])
    moved = pixels_to_blocks(change.double() * 255.0) / table[None, :, None, None]
    assert float(moved.abs().max()) <= 0.1 + 1e-3 and float(moved.abs().max()) >= 0.05


def test_gabor_noise_stays_in_its_linf_ball_and_snow_only_brightens(
    trained: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, images, labels = trained
    gabor = GaborAttack(epsilon=0.1, steps=3).perturb(model, images[:32], labels[:32])
    assert float((gabor - images[:32]).abs().max()) <= 0.1 + 1e-6
    snow = SnowAttack(epsilon=0.2, steps=3).perturb(model, images[:32], labels[:32])
    assert float((snow - images[:32]).min()) >= -1e-6
    fog = FogAttack(epsilon=0.25, steps=3).perturb(model, images[:32], labels[:32])
    # fog mixes toward a map in [0, 1]: a pixel moves at most eps / (1 + eps)
    assert float((fog - images[:32]).abs().max()) <= 0.25 / 1.25 + 1e-6


def test_diamond_square_makes_a_differentiable_map_that_is_smoother_with_more_decay() -> None:
    generator = torch.Generator().manual_seed(5)
    noise = [(2 * torch.rand(2, 3, 2**k, 2**k, generator=generator) - 1).requires_grad_() for k in range(5)]
    rough, smooth = diamond_square(noise, decay=1.2), diamond_square(noise, decay=4.0)
    assert rough.shape == (2, 32, 32)
    rough.sum().backward()
    assert all(v.grad is not None and float(v.grad.abs().sum()) > 0 for v in noise)

    def roughness(grid: Tensor) -> float:
        grid = (grid - grid.mean()) / grid.std()
        return float((grid - grid.roll(1, dims=-1)).abs().mean())

    assert roughness(smooth.detach()) < roughness(rough.detach())


def test_the_flow_loss_prefers_smooth_flows() -> None:
    generator = torch.Generator().manual_seed(6)
    rough = torch.rand(1, 2, 16, 16, generator=generator) - 0.5
    smooth = torch.full((1, 2, 16, 16), 0.3)
    assert float(flow_smoothness(torch.zeros(1, 2, 16, 16))) == pytest.approx(4 * 256 * 1e-4, rel=1e-3)
    assert float(flow_smoothness(smooth)) < float(flow_smoothness(rough))


def test_elastic_and_stadv_move_pixels_by_at_most_their_budget() -> None:
    """A one-pixel vertical line: a flow of at most 0.5 px keeps its mass within half a pixel of it."""
    images = torch.zeros(4, 1, 16, 16)
    images[..., 8] = 1.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 3)).eval()
    for attack in (ElasticAttack(epsilon=0.5, steps=3), StAdvAttack(epsilon=0.5, steps=3)):
        out = attack.perturb(model, images, torch.tensor([0, 1, 2, 0]))
        assert float(out[..., :7].abs().max()) == 0.0 and float(out[..., 10:].abs().max()) == 0.0
        assert float(out[..., 7].max()) <= 0.5 + 1e-5 and float(out[..., 9].max()) <= 0.5 + 1e-5


# --------------------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_seeded_images_that_grow_with_severity(name: str) -> None:
    images, _ = load_fashion_mnist(DEFAULT_DATA_DIR, "test")
    images = images[:64]
    before = images.clone()
    damage = []
    for severity in range(1, 6):
        out = corrupt(images, name, severity, torch.Generator().manual_seed(0))
        again = corrupt(images, name, severity, torch.Generator().manual_seed(0))
        assert torch.equal(out, again) and out.shape == images.shape
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        damage.append(float((out - images).abs().mean()))
    assert torch.equal(images, before)  # never in place
    assert damage[0] > 0.0
    assert damage[-1] > damage[0] * 1.1, damage
    if name != "pixelate":  # resizing 28 px to 26, 25, 23, 21, 18 px aliases differently at each size
        assert all(later >= earlier * 0.95 for earlier, later in itertools.pairwise(damage)), damage


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_work_on_colour_images(name: str) -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    out = corrupt(images, name, 3, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, images)


def test_the_suite_reports_mean_and_per_corruption_accuracy_deterministically(
    trained: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, images, labels = trained
    images, labels = images[:100], labels[:100]  # the evaluation hands the suite its fixed subset
    suite = CorruptionSuite()
    mean, per_corruption = suite.evaluate(model, images, labels)
    assert list(per_corruption) == list(CORRUPTIONS)
    assert mean == pytest.approx(sum(per_corruption.values()) / len(CORRUPTIONS))
    assert mean < accuracy(model, images, labels) - 0.05  # corruptions hurt on average
    table = suite.accuracy_table(model, images, labels)  # a second run gives the same numbers
    assert {name: sum(row.values()) / 5 for name, row in table.items()} == per_corruption
    for name, row in table.items():
        assert row[5] <= row[1] + 0.05, (name, row)  # the worst severity is not easier than the mildest
    # a sub-suite draws the same random corruptions: its numbers are the full suite's
    sub = CorruptionSuite(corruptions=["gaussian_noise"], severities=[4], batch_size=7)
    assert sub.accuracy_table(model, images, labels) == {"gaussian_noise": {4: table["gaussian_noise"][4]}}
    line = suite.describe()
    assert "Hendrycks" in line and "kornia" in line and "Pillow" in line


def test_the_suite_config_is_checked() -> None:
    assert CorruptionSuite().severities == [1, 2, 3, 4, 5] and CorruptionSuite().kind == "corruption"
    with pytest.raises(ValidationError):
        CorruptionSuite(severities=[0, 1])
    with pytest.raises(ValidationError):
        CorruptionSuite(severities=[2, 2])
    with pytest.raises(ValidationError):
        CorruptionSuite(corruptions=["frost"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="severity"):
        corrupt(torch.rand(1, 1, 8, 8), "contrast", 6, torch.Generator())


def test_constants_have_five_severities() -> None:
    from latentguard.domains.image import corruptions as module

    for table in (module.NOISE_STD, module.BLUR_SIGMA, module.DEFOCUS, module.CONTRAST, module.BRIGHTNESS):
        assert len(table) == 5
    for table in (module.PIXELATE, module.JPEG_QUALITY, module.ELASTIC_DISPLACEMENT):
        assert len(table) == 5
    assert math.isclose(module.CONTRAST[0], 0.4)
