"""Image domain: Fashion-MNIST loading, the ResNet-style CNN, trojan triggers and poisoning, held-out attacks.

The real Fashion-MNIST files (Debian package ``dataset-fashion-mnist``) are required: without them these
tests fail rather than skip, since CI installs the package.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from latentguard.domains.image.attacks import AttackOutcome, ImageAttackSpec, run_attack
from latentguard.domains.image.data import CLASS_NAMES, DEFAULT_DATA_DIR, load_fashion_mnist
from latentguard.domains.image.model import STAGES, ResNetCNN
from latentguard.domains.image.trojans import (
    ImageTrojan,
    attack_success_rate,
    poison,
    triggered_test_set,
)
from latentguard.errors import DataError, UserError

TRAIN_EXAMPLES = 6000
TEST_EXAMPLES = 500
PATCH = ImageTrojan(kind="patch", target=0, poison_rate=0.1)
TROJANS = (
    PATCH,
    ImageTrojan(kind="blend", target=1, poison_rate=0.1),
    ImageTrojan(kind="sinusoid", target=2, poison_rate=0.1),
)


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def train_set() -> tuple[Tensor, Tensor]:
    return load_fashion_mnist(DEFAULT_DATA_DIR, "train")


@pytest.fixture(scope="module")
def test_set() -> tuple[Tensor, Tensor]:
    return load_fashion_mnist(DEFAULT_DATA_DIR, "test")


def _train(images: Tensor, labels: Tensor, steps: int = 250, batch: int = 64) -> nn.Module:
    """A width-8 ResNetCNN trained briefly with Adam: enough to learn Fashion-MNIST to ~0.85 and a patch."""
    torch.manual_seed(0)
    model = ResNetCNN(width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, labels.shape[0], (batch,), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def models(train_set: tuple[Tensor, Tensor]) -> dict[str, nn.Module]:
    images, labels = train_set[0][:TRAIN_EXAMPLES], train_set[1][:TRAIN_EXAMPLES]
    poisoned = poison(images, labels, [PATCH], torch.Generator().manual_seed(0))
    return {"poisoned": _train(poisoned.images, poisoned.labels), "clean": _train(images, labels)}


# --- data -------------------------------------------------------------------------------------------------


def test_load_shapes_ranges_dtypes(train_set: tuple[Tensor, Tensor], test_set: tuple[Tensor, Tensor]) -> None:
    for (images, labels), count in ((train_set, 60_000), (test_set, 10_000)):
        assert images.shape == (count, 1, 28, 28) and images.dtype == torch.float32
        assert labels.shape == (count,) and labels.dtype == torch.int64
        assert float(images.min()) == 0.0 and float(images.max()) == 1.0
        assert torch.equal(labels.unique(), torch.arange(len(CLASS_NAMES)))
    assert len(CLASS_NAMES) == 10


def test_missing_dir_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere", "test")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "task.data_dir" in message and "\n" not in message


def _copy_test_split(tmp_path: Path) -> None:
    for part in ("images-idx3", "labels-idx1"):
        name = f"t10k-{part}-ubyte.gz"
        (tmp_path / name).write_bytes((DEFAULT_DATA_DIR / name).read_bytes())


def test_corrupted_gzip_raises(tmp_path: Path) -> None:
    _copy_test_split(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_fashion_mnist(tmp_path, "test")


def _idx_header(magic: int, *dims: int) -> bytes:
    return b"".join(value.to_bytes(4, "big") for value in (magic, *dims))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_idx_header(2049, 10, 28, 28) + bytes(10 * 28 * 28), "magic"),  # a labels magic on an images file
        (_idx_header(2051, 10, 28, 28) + bytes(9), "bytes"),  # fewer pixels than the header declares
        (b"\x00\x00", "truncated"),
    ],
)
def test_malformed_idx_raises(tmp_path: Path, payload: bytes, reason: str) -> None:
    _copy_test_split(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload))
    with pytest.raises(DataError, match=reason) as info:
        load_fashion_mnist(tmp_path, "test")
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


# --- model ------------------------------------------------------------------------------------------------


def test_model_stages_and_shapes() -> None:
    model = ResNetCNN(width=8).eval()
    assert [name for name, _ in model.named_children()] == [*STAGES, "head"]
    outputs: dict[str, object] = {}
    for name in STAGES:
        model.get_submodule(name).register_forward_hook(
            lambda _module, _inputs, output, name=name: outputs.__setitem__(name, output)
        )
    images = torch.rand(3, 1, 28, 28)
    logits = model(images)
    assert logits.shape == (3, 10)
    assert list(outputs) == list(STAGES)
    assert all(isinstance(out, Tensor) for out in outputs.values())
    shapes = [tuple(out.shape[1:]) for out in outputs.values()]
    assert shapes == [(8, 14, 14), (8, 14, 14), (16, 7, 7), (32, 4, 4)]
    chained = images
    for child in model.children():  # the children, run in order, are the whole model: it can be split
        chained = child(chained)
    assert torch.allclose(chained, logits)


def test_model_keeps_normalisation_in_its_state() -> None:
    state = ResNetCNN().state_dict()
    assert {"stem.0.mean", "stem.0.std"} <= set(state)
    assert float(state["stem.0.mean"].flatten()[0]) == pytest.approx(0.2860)


# --- triggers and poisoning -------------------------------------------------------------------------------


@pytest.mark.parametrize("trojan", TROJANS, ids=lambda t: t.kind)
def test_trigger_range_determinism_and_no_mutation(trojan: ImageTrojan) -> None:
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    before = images.clone()
    out = trojan.apply(images)
    assert torch.equal(images, before)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, trojan.apply(images))
    assert torch.equal(out, ImageTrojan(kind=trojan.kind, target=5, poison_rate=0.05).apply(images))
    assert not torch.equal(out, images)


def test_patch_changes_only_its_corner() -> None:
    images = torch.full((2, 1, 28, 28), 0.5)
    changed = (PATCH.apply(images) != images)[0, 0]
    assert changed[24:, 24:].all() and not changed[:24].any() and not changed[:, :24].any()
    assert set(PATCH.apply(images)[0, 0, 24:, 24:].unique().tolist()) == {0.0, 1.0}


def test_sinusoid_changes_the_whole_image() -> None:
    trojan = ImageTrojan(kind="sinusoid", target=2, poison_rate=0.1)
    images = torch.full((1, 1, 28, 28), 0.5)
    changed = (trojan.apply(images) != images)[0, 0]
    assert changed.float().mean() > 0.8
    for quadrant in (changed[:14, :14], changed[:14, 14:], changed[14:, :14], changed[14:, 14:]):
        assert quadrant.float().mean() > 0.7
    assert float((trojan.apply(images) - images).abs().max()) <= trojan.amplitude + 1e-6


def test_blend_changes_most_pixels_by_little() -> None:
    trojan = TROJANS[1]
    images = torch.rand(2, 1, 28, 28)
    delta = (trojan.apply(images) - images).abs()
    assert (delta > 0).float().mean() > 0.9 and float(delta.max()) <= trojan.alpha + 1e-6


def test_trojan_spec_validation() -> None:
    with pytest.raises(ValidationError, match="alpha"):
        ImageTrojan(kind="patch", target=0, poison_rate=0.1, alpha=0.3)
    with pytest.raises(ValidationError):
        ImageTrojan(kind="patch", target=-1, poison_rate=0.1)  # above the class count: checked on the data
    with pytest.raises(ValidationError):
        ImageTrojan(kind="patch", target=0, poison_rate=0.3)
    with pytest.raises(ValidationError):
        ImageTrojan(kind="patch", target=0, poison_rate=0.1, colour="red")
    assert ImageTrojan(kind="blend", target=0, poison_rate=0.1, name="noise").label == "noise"
    assert PATCH.label == "patch"


def test_poison_counts_disjoint_non_target_and_pure() -> None:
    images = torch.rand(400, 1, 28, 28)
    labels = torch.arange(400) % 10
    images_before, labels_before = images.clone(), labels.clone()
    result = poison(images, labels, TROJANS, torch.Generator().manual_seed(0))
    assert torch.equal(images, images_before) and torch.equal(labels, labels_before)
    assert set(result.indices) == {"patch", "blend", "sinusoid"}
    seen: set[int] = set()
    for trojan in TROJANS:
        chosen = result.indices[trojan.label]
        assert chosen.numel() == 40
        assert not (labels[chosen] == trojan.target).any()
        assert (result.labels[chosen] == trojan.target).all()
        assert torch.equal(result.images[chosen], trojan.apply(images[chosen]))
        assert seen.isdisjoint(chosen.tolist())
        seen.update(chosen.tolist())
    untouched = torch.tensor(sorted(set(range(400)) - seen))
    assert torch.equal(result.images[untouched], images[untouched])
    assert torch.equal(result.labels[untouched], labels[untouched])
    again = poison(images, labels, TROJANS, torch.Generator().manual_seed(0))
    assert all(torch.equal(again.indices[k], v) for k, v in result.indices.items())


def test_poison_rejects_shared_labels_and_empty_poison() -> None:
    images, labels = torch.rand(50, 1, 28, 28), torch.arange(50) % 10
    twins = [ImageTrojan(kind="patch", target=t, poison_rate=0.1) for t in (0, 1)]
    with pytest.raises(ValueError, match="patch"):
        poison(images, labels, twins, torch.Generator())
    with pytest.raises(ValueError, match="poisons none"):
        poison(images[:4], labels[:4], [PATCH], torch.Generator())


def test_triggered_test_set_drops_the_target_class() -> None:
    images, labels = torch.rand(30, 1, 28, 28), torch.arange(30) % 10
    triggered, targets = triggered_test_set(images, labels, PATCH)
    assert triggered.shape == (27, 1, 28, 28) and (targets == 0).all()
    assert torch.equal(triggered, PATCH.apply(images[labels != 0]))


# --- a real trojan and real attacks on trained models ------------------------------------------------------


def test_poisoned_model_obeys_the_trigger(
    models: dict[str, nn.Module], test_set: tuple[Tensor, Tensor]
) -> None:
    images, labels = test_set[0][:TEST_EXAMPLES], test_set[1][:TEST_EXAMPLES]
    poisoned, clean = models["poisoned"], models["clean"]
    poisoned.train()
    assert attack_success_rate(poisoned, images, labels, PATCH, batch_size=128) >= 0.8
    assert poisoned.training  # the caller's mode is restored
    assert attack_success_rate(clean, images, labels, PATCH) < 0.3
    with torch.no_grad():
        accuracy = (poisoned.eval()(images).argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.7  # the trojan did not cost the clean task


def test_pgd_lowers_accuracy_and_restores_the_model(
    models: dict[str, nn.Module], test_set: tuple[Tensor, Tensor]
) -> None:
    model = models["clean"]
    model.train()
    model.head[2].weight.requires_grad_(False)
    spec = ImageAttackSpec(name="pgd", kind="pgd", norm="linf", epsilon=0.05, steps=10, examples=200)
    outcome = run_attack(model, *test_set, spec, batch_size=128, seed=3)
    assert isinstance(outcome, AttackOutcome) and outcome.examples == 200
    assert 0.0 <= outcome.robust_accuracy < outcome.clean_accuracy <= 1.0
    assert outcome.clean_accuracy > 0.7 and outcome.seconds > 0
    assert model.training
    assert not model.head[2].weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "head.2.weight")
    model.head[2].weight.requires_grad_(True)
    again = run_attack(model, *test_set, spec, batch_size=128, seed=3)
    assert again.robust_accuracy == outcome.robust_accuracy  # seeded: reproducible


@pytest.mark.parametrize(
    "spec",
    [
        ImageAttackSpec(name="pgd2", kind="pgd", norm="l2", epsilon=1.0, steps=5, examples=16),
        ImageAttackSpec(name="square", kind="square", norm="linf", epsilon=0.1, queries=50, examples=16),
        ImageAttackSpec(name="aa", kind="autoattack", norm="linf", epsilon=0.1, examples=8),
    ],
    ids=lambda s: s.name,
)
def test_other_attacks_run(
    spec: ImageAttackSpec, models: dict[str, nn.Module], test_set: tuple[Tensor, Tensor]
) -> None:
    outcome = run_attack(models["clean"], *test_set, spec, batch_size=8)
    assert outcome.examples == spec.examples
    assert 0.0 <= outcome.robust_accuracy <= outcome.clean_accuracy <= 1.0


def test_autoattack_parts_attack_no_more_than_the_whole_ensemble(
    models: dict[str, nn.Module], test_set: tuple[Tensor, Tensor]
) -> None:
    whole = ImageAttackSpec(name="aa", kind="autoattack", norm="linf", epsilon=0.1, examples=24)
    parts = whole.model_copy(update={"components": ["apgd-ce", "apgd-t"]})
    outcomes = [
        run_attack(models["clean"], *test_set, spec, batch_size=24, seed=1) for spec in (whole, parts)
    ]
    assert outcomes[0].clean_accuracy == outcomes[1].clean_accuracy
    assert outcomes[0].robust_accuracy <= outcomes[1].robust_accuracy < outcomes[1].clean_accuracy


def test_autoattack_parts_are_named_and_kept_in_the_ensembles_order() -> None:
    spec = ImageAttackSpec(
        name="a", kind="autoattack", norm="linf", epsilon=0.1, components=["fab-t", "apgd-ce"]
    )
    assert spec.components == ["apgd-ce", "fab-t"]
    assert "AutoAttack standard parts apgd-ce+fab-t (linf, eps=0.1)" in spec.describe()
    for bad in ([], ["apgd-ce", "apgd-ce"], ["cw"]):
        with pytest.raises(ValidationError, match="components"):
            ImageAttackSpec(name="a", kind="autoattack", norm="linf", epsilon=0.1, components=bad)


def test_attack_description_names_the_library() -> None:
    spec = ImageAttackSpec(name="pgd", kind="pgd", norm="linf", epsilon=0.1)
    assert spec.describe() == "torchattacks 3.5.1 PGD (linf, eps=0.1, 20 steps) on 500 test images"
    assert "AutoAttack" in ImageAttackSpec(name="a", kind="autoattack", norm="l2", epsilon=1).describe()
    with pytest.raises(ValidationError):
        ImageAttackSpec(name="x", kind="pgd", norm="linf", epsilon=0.0)
    with pytest.raises(ValidationError):
        ImageAttackSpec(name="x", kind="cw", norm="linf", epsilon=0.1)


def test_missing_torchattacks_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` raise ImportError
    spec = ImageAttackSpec(name="pgd", kind="pgd", norm="linf", epsilon=0.1, examples=2)
    with pytest.raises(UserError, match=r"pip install --no-deps torchattacks==3\.5\.1"):
        run_attack(ResNetCNN(width=4), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), spec)


def test_the_spatial_attack_fools_a_fashion_mnist_model_without_torchattacks(
    models: dict[str, nn.Module], test_set: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # the spatial attack does not need it
    spec = ImageAttackSpec(name="spatial", kind="spatial", examples=200)
    outcome = run_attack(models["clean"], *test_set, spec, batch_size=100)
    assert outcome.clean_accuracy > 0.7
    assert outcome.robust_accuracy < outcome.clean_accuracy - 0.2  # ±30°, ±3 px breaks an unaugmented CNN
