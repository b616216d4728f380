"""Engine tests: sites and hooks, threat geometry, PGD, and the training loop (tiny seeded models only)."""

from __future__ import annotations

import copy
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, FEATURES, make_blobs, make_mlp
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from latentguard.engine.attack import LatentAttack, PGDConfig, Targeted
from latentguard.engine.io import ClassifierIO
from latentguard.engine.site import Intervention, frozen, resolve_module
from latentguard.engine.threat import (
    Threat,
    mean_unit_size,
    project,
    radius,
    random_in_ball,
    random_on_sphere,
    unit_norms,
)
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer, all_finite
from latentguard.errors import CheckpointError, NonFiniteError, SiteError
from latentguard.runs import load_tensors, save_tensors

IO = ClassifierIO()
HIDDEN = 32
TOL = 1e-5


# -- tiny models ---------------------------------------------------------------------------------------------
Pair = namedtuple("Pair", ["hidden", "extra"])


class TupleBlock(nn.Module):
    """Mimics a Hugging Face block: returns ``(hidden, extra)`` (or a namedtuple of the two)."""

    def __init__(self, dim: int, named: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.named = named

    def forward(self, hidden: Tensor) -> Any:
        out = hidden + torch.tanh(self.lin(hidden))
        extra = {"note": "kept as is"}
        return Pair(out, extra) if self.named else (out, extra)


class MeanPool(nn.Module):
    def forward(self, hidden: Tensor) -> Tensor:
        return hidden.mean(dim=1)


class TinySeq(nn.Module):
    """Token ids ``(batch, positions)`` → embeddings → two tuple-returning blocks → mean pool → logits."""

    def __init__(self, vocab: int = 13, dim: int = 6, classes: int = 3, named: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([TupleBlock(dim, named), TupleBlock(dim, named), TupleBlock(dim, named)])
        self.pool = MeanPool()
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        hidden = self.embed(ids)
        for layer in self.layers:
            hidden = layer(hidden)[0]
        return self.head(self.pool(hidden))


class SeqIO:
    """Batches ``(ids, labels, mask)``: the mask says which positions an adversary may perturb."""

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return batch

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        return model(batch[0])

    def loss(self, output: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(output, batch[1], reduction="none")

    def positions(self, batch: Any) -> Tensor | None:
        return batch[2]

    def with_labels(self, batch: Any, labels: Tensor) -> Any:
        return batch[0], labels, batch[2]


def seq_batch(batch: int = 4, length: int = 5, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (batch, length), generator=gen)
    labels = torch.arange(batch) % 3
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, -2:] = False  # padding: never perturbed
    return ids, labels, mask


class Unused(nn.Module):
    """An MLP with a submodule that is never called in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_mlp()
        self.unused = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Returns(nn.Module):
    """A layer that returns a fixed non-tensor object."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Any:
        return self.value


class Boom(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom")


class TimesNaN(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * float("nan")


class ModeProbe(nn.Module):
    """Identity that records whether it ran in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(self.training)
        return x


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_pre_hooks_with_kwargs
        for m in model.modules()
    )


def state(model: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    return modes, grads


def mixed_state(model: nn.Module) -> None:
    """Train mode with one submodule in eval and one parameter frozen: restoration must be per module."""
    model.train()
    model[1].eval()
    model[0].bias.requires_grad_(False)


@pytest.fixture(scope="module")
def trained() -> nn.Sequential:
    """An MLP that classifies the blobs almost perfectly (plain training loop, 120 Adam steps)."""
    model = make_mlp(seed=1)
    inputs, labels = make_blobs(240, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    model.eval()
    return model


def blob_batch(n: int = 90, seed: int = 5) -> tuple[Tensor, Tensor]:
    return make_blobs(n, seed=seed)


# == Site / Intervention =====================================================================================
def test_hook_adds_delta_exactly_at_named_layer(mlp: nn.Sequential) -> None:
    x, _ = blob_batch(6)
    delta = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = mlp[3:](mlp[:3](x) + delta)
        clean = mlp(x)
        with Intervention(mlp, ["2"], capture=True) as hooks:
            hooks.deltas = {"2": delta}
            out = mlp(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(out, clean, atol=1e-3)
    assert hooks.fired == {"2": 1}
    torch.testing.assert_close(hooks.activations["2"], mlp[:3](x).detach(), rtol=0, atol=0)
    assert no_hooks(mlp)
    with torch.no_grad():  # hooks gone: the model is clean again
        torch.testing.assert_close(mlp(x), clean, rtol=0, atol=0)


def test_delta_of_wrong_shape_is_a_site_error(mlp: nn.Sequential) -> None:
    x, _ = blob_batch(4)
    with pytest.raises(SiteError, match="shape"), Intervention(mlp, ["2"]) as hooks:
        hooks.deltas = {"2": torch.zeros(4, HIDDEN + 1)}
        mlp(x)
    assert no_hooks(mlp)


@pytest.mark.parametrize("named", [False, True], ids=["tuple", "namedtuple"])
def test_tuple_output_perturbs_first_element_and_keeps_the_rest(named: bool) -> None:
    torch.manual_seed(0)
    model = TinySeq(named=named)
    ids, _, _ = seq_batch()
    block = model.layers[1]
    with torch.no_grad():
        hidden = model.layers[0](model.embed(ids))[0]
        clean = block(hidden)
        delta = torch.randn_like(clean[0])
        with Intervention(model, ["layers.1"]) as hooks:
            hooks.deltas = {"layers.1": delta}
            out = block(hidden)
            logits = model(ids)
        expected_logits = model.head(model.pool(model.layers[2](clean[0] + delta)[0]))
    assert type(out) is type(clean)
    assert len(out) == 2
    torch.testing.assert_close(out[0], clean[0] + delta, rtol=0, atol=0)
    assert out[1] == {"note": "kept as is"}
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
    assert hooks.fired["layers.1"] == 2


@pytest.mark.parametrize("value", [{"text": "no tensor here"}, None, "a string"], ids=["dict", "none", "str"])
def test_layer_returning_no_tensor_is_a_site_error(value: Any) -> None:
    model = nn.Sequential(nn.Linear(FEATURES, 4), Returns(value))
    with pytest.raises(SiteError, match="'1'"), Intervention(model, ["1"]):
        model(torch.zeros(2, FEATURES))
    assert no_hooks(model)


def test_hooks_removed_after_exception_in_forward(mlp: nn.Sequential) -> None:
    model = nn.Sequential(*mlp, Boom())
    with pytest.raises(RuntimeError, match="boom"), Intervention(model, ["input", "1", "3"]) as hooks:
        hooks.deltas = {"1": torch.zeros(3, HIDDEN)}
        model(torch.zeros(3, FEATURES))
    assert hooks.fired == {"input": 1, "1": 1, "3": 1}
    assert no_hooks(model)


def test_check_fired_raises_for_layer_off_the_forward_path() -> None:
    model = Unused()
    x, y = blob_batch(4)
    with Intervention(model, ["body.2", "unused"]) as hooks:
        model(x)
    with pytest.raises(SiteError, match="unused"):
        hooks.check_fired()
    assert hooks.fired == {"body.2": 1, "unused": 0}
    with pytest.raises(SiteError, match="never ran"):
        LatentAttack(["unused"], Threat(epsilon=0.5), PGDConfig(steps=1))(model, IO, (x, y))


def test_wrong_layer_name_lists_close_valid_names() -> None:
    model = TinySeq()
    with pytest.raises(SiteError) as info:
        resolve_module(model, "layer2")
    message = str(info.value)
    assert "'layer2'" in message
    assert "layers.2" in message
    assert "\n" not in message
    with pytest.raises(SiteError, match="layers"):
        Intervention(model, ["layers.7"])
    with pytest.raises(SiteError, match=r"closest valid names: 0"):
        resolve_module(make_mlp(), "linear1")
    assert resolve_module(model, "layers.2") is model.layers[2]


def test_input_site_perturbs_the_input(mlp: nn.Sequential) -> None:
    x, _ = blob_batch(5)
    delta = torch.full_like(x, 0.3)
    with torch.no_grad(), Intervention(mlp, ["input"]) as hooks:
        hooks.deltas = {"input": delta}
        out = mlp(x)
    torch.testing.assert_close(out, mlp(x + delta).detach(), rtol=0, atol=0)
    assert no_hooks(mlp)


def test_input_site_rejects_token_ids() -> None:
    model = TinySeq()
    ids, labels, mask = seq_batch()
    with pytest.raises(SiteError, match="embeddings"), Intervention(model, ["input"]):
        model(ids)
    with pytest.raises(SiteError):
        LatentAttack(["input"], Threat(epsilon=0.5), PGDConfig(steps=1))(model, SeqIO(), (ids, labels, mask))
    assert no_hooks(model)


def test_no_site_is_an_error(mlp: nn.Sequential) -> None:
    with pytest.raises(SiteError):
        Intervention(mlp, [])


@pytest.mark.parametrize("train", [False, True])
def test_frozen_restores_modes_and_flags_even_when_the_body_raises(mlp: nn.Sequential, train: bool) -> None:
    mixed_state(mlp)
    before = state(mlp)
    with pytest.raises(RuntimeError, match="inside"), frozen(mlp, train=train):
        assert all(m.training is train for m in mlp.modules())
        assert not any(p.requires_grad for p in mlp.parameters())
        raise RuntimeError("inside")
    assert state(mlp) == before
    assert (
        mlp.training and not mlp[1].training and not mlp[0].bias.requires_grad and mlp[0].weight.requires_grad
    )


# == Threat ==================================================================================================
def big(shape: tuple[int, ...], seed: int = 0, scale: float = 5.0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


SHAPES = {"example": (6, 4, 5), "token": (3, 4, 5)}


@pytest.mark.parametrize("scope", ["example", "token"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_project_lands_inside_the_ball(norm: str, scope: str) -> None:
    threat = Threat(norm=norm, epsilon=0.7, scope=scope)
    delta = big(SHAPES[scope])
    projected = project(delta, threat, 0.7)
    norms = unit_norms(projected, norm, scope)
    assert norms.numel() == (6 if scope == "example" else 12)
    assert (norms <= 0.7 + TOL).all()
    torch.testing.assert_close(norms, torch.full_like(norms, 0.7))  # all were outside: now on the boundary
    if norm == "l2":  # the nearest point keeps the direction
        cos = F.cosine_similarity(projected.reshape(-1, 5), delta.reshape(-1, 5), dim=1)
        assert (cos > 0.999).all()
    small = delta / 1000
    torch.testing.assert_close(project(small, threat, 0.7), small, rtol=0, atol=0)  # inside: unchanged


@pytest.mark.parametrize("scope", ["example", "token"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_project_zeroes_masked_positions(norm: str, scope: str) -> None:
    threat = Threat(norm=norm, epsilon=0.5, scope=scope)
    delta = big((3, 4, 5))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    projected = project(delta, threat, 0.5, positions=mask)
    assert (projected[~mask] == 0).all()
    assert (projected[mask].abs().sum(dim=-1) > 0).all()
    assert (unit_norms(projected, norm, scope) <= 0.5 + TOL).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_project_respects_bounds(norm: str) -> None:
    threat = Threat(norm=norm, epsilon=2.0, bounds=(0.0, 1.0))
    reference = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    projected = project(big((4, 1, 6, 6)), threat, 2.0, reference=reference)
    assert ((reference + projected) >= 0).all() and ((reference + projected) <= 1).all()
    assert (unit_norms(projected, norm, "example") <= 2.0 + TOL).all()
    assert projected.abs().max() > 0.1


@pytest.mark.parametrize("scope", ["example", "token"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_in_ball_lies_inside(norm: str, scope: str) -> None:
    threat = Threat(norm=norm, epsilon=0.3, scope=scope)
    like = torch.zeros(50, 3, 4)
    sample = random_in_ball(like, threat, 0.3, torch.Generator().manual_seed(0))
    assert sample.shape == like.shape
    norms = unit_norms(sample, norm, scope)
    assert (norms <= 0.3 + TOL).all()
    assert norms.min() < 0.3 * 0.999  # strictly inside for some units, not only on the sphere
    assert norms.mean() > 0.1  # but not collapsed to the centre


@pytest.mark.parametrize("scope", ["example", "token"])
def test_random_on_sphere_has_the_full_radius(scope: str) -> None:
    like = torch.zeros(10, 3, 4)
    gen = torch.Generator().manual_seed(0)
    l2 = random_on_sphere(like, Threat(norm="l2", epsilon=0.4, scope=scope), 0.4, gen)
    torch.testing.assert_close(
        unit_norms(l2, "l2", scope), torch.full((10 if scope == "example" else 30,), 0.4)
    )
    linf = random_on_sphere(like, Threat(norm="linf", epsilon=0.4, scope=scope), 0.4, gen)
    torch.testing.assert_close(linf.abs(), torch.full_like(linf, 0.4))  # every element at ±radius
    assert (linf > 0).any() and (linf < 0).any()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_on_sphere_respects_the_mask(norm: str) -> None:
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    noise = random_on_sphere(torch.zeros(2, 3, 4), Threat(norm=norm, scope="token"), 1.0, positions=mask)
    assert (noise[~mask] == 0).all()
    torch.testing.assert_close(unit_norms(noise[mask][None], norm, "token"), torch.ones(3))


@pytest.mark.parametrize("scope", ["example", "token"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_relative_epsilon_scales_linearly_with_activation_size(norm: str, scope: str) -> None:
    threat = Threat(norm=norm, epsilon=0.25, epsilon_mode="relative", scope=scope)
    act = big((8, 3, 5), scale=1.0)
    size = mean_unit_size(act, threat)
    assert size > 0
    assert mean_unit_size(act * 10, threat) == pytest.approx(10 * size, rel=1e-5)
    assert radius(threat, mean_unit_size(act * 10, threat)) == pytest.approx(
        10 * radius(threat, size), rel=1e-5
    )
    assert radius(threat, size) == pytest.approx(0.25 * size)
    with pytest.raises(SiteError):
        radius(threat, None)


def test_relative_epsilon_calibrates_on_the_site(mlp: nn.Sequential) -> None:
    x, y = blob_batch(20)
    threat = Threat(norm="l2", epsilon=0.5, epsilon_mode="relative")
    small = LatentAttack(["input"], threat)
    large = LatentAttack(["input"], threat)
    small.calibrate(mlp, IO, (x, y))
    large.calibrate(mlp, IO, (x * 10, y))
    assert small.radii()["input"] == pytest.approx(0.5 * float(x.norm(dim=1).mean()), rel=1e-5)
    assert large.radii()["input"] == pytest.approx(10 * small.radii()["input"], rel=1e-5)


def test_token_scope_on_a_2d_activation_is_a_site_error() -> None:
    threat = Threat(norm="l2", scope="token")
    flat = torch.randn(4, 6)
    for call in (
        lambda: project(flat, threat, 1.0),
        lambda: random_on_sphere(flat, threat, 1.0),
        lambda: unit_norms(flat, "l2", "token"),
        lambda: mean_unit_size(flat, threat),
    ):
        with pytest.raises(SiteError, match="token"):
            call()


@pytest.mark.parametrize(
    "kwargs",
    [{"epsilon": 0}, {"epsilon": -1.0}, {"bounds": (1.0, 0.0)}, {"bounds": (0.5, 0.5)}, {"norm": "l1"}],
)
def test_threat_rejects_impossible_budgets(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Threat(**kwargs)


# == PGD / LatentAttack ======================================================================================
@pytest.mark.parametrize("optimizer", ["pgd", "adam"])
@pytest.mark.parametrize(("norm", "epsilon"), [("l2", 2.0), ("linf", 0.4)])
def test_untargeted_pgd_beats_noise_of_the_same_size(
    trained: nn.Sequential, norm: str, epsilon: float, optimizer: str
) -> None:
    x, y = blob_batch()
    attack = LatentAttack(["1"], Threat(norm=norm, epsilon=epsilon), PGDConfig(steps=10, optimizer=optimizer))
    gen = torch.Generator().manual_seed(0)
    result = attack(trained, IO, (x, y), generator=gen)
    noise = attack.noise(trained, IO, (x, y), generator=gen)
    clean = attack.loss_with(trained, IO, (x, y), {"1": torch.zeros(len(x), HIDDEN)})
    attacked = attack.loss_with(trained, IO, (x, y), result.deltas)
    noisy = attack.loss_with(trained, IO, (x, y), noise.deltas)
    assert attacked > 2 * noisy
    assert attacked > clean + 0.1
    assert result.losses[-1] > result.losses[0]
    assert result.first_grad_norm > 0
    assert result.fired["1"] == 10
    assert (unit_norms(result.deltas["1"], norm, "example") <= epsilon + TOL).all()
    torch.testing.assert_close(  # noise has exactly the budget
        unit_norms(noise.deltas["1"], norm, "example").max(), torch.tensor(epsilon), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_targeted_pgd_pulls_toward_the_target(trained: nn.Sequential, norm: str) -> None:
    x, y = blob_batch()
    keep = y != 0
    x, y = x[keep], y[keep]
    target = torch.zeros_like(y)
    epsilon = 3.0 if norm == "l2" else 0.6
    attack = LatentAttack(
        ["1"], Threat(norm=norm, epsilon=epsilon), PGDConfig(steps=10), objective=Targeted(0)
    )
    gen = torch.Generator().manual_seed(0)
    result = attack(trained, IO, (x, y), generator=gen)
    noise = attack.noise(trained, IO, (x, y), generator=gen)

    def target_loss(deltas: dict[str, Tensor]) -> float:
        with torch.no_grad(), Intervention(trained, ["1"]) as hooks:
            hooks.deltas = deltas
            return float(F.cross_entropy(trained(x), target))

    start = target_loss({"1": torch.zeros(len(x), HIDDEN)})
    attacked = target_loss(result.deltas)
    assert attacked < 0.5 * start
    assert attacked < target_loss(noise.deltas)
    assert attack.loss_with(trained, IO, (x, y), result.deltas) == pytest.approx(-attacked, rel=1e-4)
    assert (unit_norms(result.deltas["1"], norm, "example") <= epsilon + TOL).all()


@pytest.mark.parametrize("model_mode", ["eval", "train"])
def test_attack_leaves_weights_without_grad_and_restores_the_model(model_mode: str) -> None:
    torch.manual_seed(0)
    probe = ModeProbe()
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.ReLU(), probe, nn.Dropout(0.1), nn.Linear(HIDDEN, CLASSES)
    )
    mixed_state(model)
    before = state(model)
    weights = copy.deepcopy(model.state_dict())
    x, y = blob_batch(12)
    attack = LatentAttack(["1"], Threat(epsilon=1.0), PGDConfig(steps=3, model_mode=model_mode))
    result = attack(model, IO, (x, y), generator=torch.Generator().manual_seed(0))
    assert result.deltas["1"].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert state(model) == before
    assert no_hooks(model)
    assert probe.seen and all(seen is (model_mode == "train") for seen in probe.seen)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key])


def test_nan_model_raises_nonfinite_and_cleans_up() -> None:
    model = nn.Sequential(*make_mlp(), TimesNaN())
    mixed_state(model)
    before = state(model)
    x, y = blob_batch(8)
    with pytest.raises(NonFiniteError, match="non-finite"):
        LatentAttack(["1"], Threat(epsilon=0.5), PGDConfig(steps=3))(model, IO, (x, y))
    assert state(model) == before
    assert no_hooks(model)


def test_nan_activation_with_relative_epsilon_raises_nonfinite() -> None:
    """A model that is NaN already at the site: relative calibration must report it as non-finite."""
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), TimesNaN(), nn.Linear(HIDDEN, CLASSES))
    x, y = blob_batch(8)
    attack = LatentAttack(["1"], Threat(epsilon=0.5, epsilon_mode="relative"), PGDConfig(steps=3))
    with pytest.raises(NonFiniteError):
        attack(model, IO, (x, y))


def test_same_seed_gives_the_same_delta(trained: nn.Sequential) -> None:
    x, y = blob_batch(20)
    attack = LatentAttack(["1"], Threat(epsilon=1.0), PGDConfig(steps=4))

    def delta(seed: int) -> Tensor:
        return attack(trained, IO, (x, y), generator=torch.Generator().manual_seed(seed)).deltas["1"]

    assert torch.equal(delta(3), delta(3))
    assert not torch.equal(delta(3), delta(4))
    torch.manual_seed(9)
    first = attack(trained, IO, (x, y)).deltas["1"]
    torch.manual_seed(9)
    assert torch.equal(first, attack(trained, IO, (x, y)).deltas["1"])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_token_scope_attack_respects_mask_and_per_token_radius(norm: str) -> None:
    torch.manual_seed(0)
    model = TinySeq()
    batch = seq_batch()
    attack = LatentAttack(["layers.0"], Threat(norm=norm, epsilon=0.5, scope="token"), PGDConfig(steps=5))
    result = attack(model, SeqIO(), batch, generator=torch.Generator().manual_seed(0))
    delta = result.deltas["layers.0"]
    mask = batch[2]
    assert delta.shape == (4, 5, 6)
    assert (delta[~mask] == 0).all()
    norms = unit_norms(delta, norm, "token").reshape(4, 5)
    assert (norms <= 0.5 + TOL).all()
    assert (norms[mask] > 0.1).all()
    assert result.losses[-1] > result.losses[0]


def test_multi_site_attack_with_mask_handles_each_site_layout() -> None:
    """Sites of different layouts (a (batch, positions, dim) block and a pooled (batch, dim) layer)."""
    torch.manual_seed(0)
    model = TinySeq()
    batch = seq_batch()
    attack = LatentAttack(["layers.0", "pool"], Threat(epsilon=0.5), PGDConfig(steps=3))
    noise = attack.noise(model, SeqIO(), batch, generator=torch.Generator().manual_seed(0))
    assert (noise.deltas["layers.0"][~batch[2]] == 0).all()  # noise() already handles it per site
    result = attack(model, SeqIO(), batch, generator=torch.Generator().manual_seed(0))
    assert result.deltas["pool"].shape == (4, 6)
    assert (result.deltas["layers.0"][~batch[2]] == 0).all()
    assert (unit_norms(result.deltas["pool"], "l2", "example") <= 0.5 + TOL).all()


# == Trainer =================================================================================================
def blob_loader(seed: int = 0, n: int = 96, batch_size: int = 16) -> DataLoader:
    inputs, labels = make_blobs(n, seed=0)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=True, generator=gen)


def defense(kind: str, **extra: Any) -> DefenseConfig:
    if kind in ("none", "clean"):
        return DefenseConfig(kind=kind, **extra)
    sites = ["input"] if kind == "at" else ["1"]
    extra.setdefault("threat", Threat(norm="l2", epsilon=0.5, epsilon_mode="relative"))
    extra.setdefault("pgd", PGDConfig(steps=2))
    return DefenseConfig(kind=kind, sites=sites, **extra)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["none", "clean", "at", "lat", "rlat"])
def test_each_defense_trains(kind: str) -> None:
    model = make_mlp()
    before = copy.deepcopy(model)
    records: list[dict[str, Any]] = []
    trainer = Trainer(
        model,
        IO,
        defense(kind),
        TrainConfig(steps=4, lr=1e-2, log_every=1),
        log=records.append,
        progress=False,
    )
    torch.manual_seed(0)
    result = trainer.fit(blob_loader())
    if kind == "none":
        assert same_weights(model, before)
        assert result.steps == 0 and not records
        return
    assert not same_weights(model, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.steps == 4 and result.skipped == 0
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    if kind in ("at", "lat", "rlat"):
        site = "input" if kind == "at" else "1"
        assert result.unit_sizes[site] > 0
        assert result.radii[site] == pytest.approx(0.5 * result.unit_sizes[site])
    if kind in ("at", "lat"):
        assert "attack_gain" in records[0]


def test_lat_makes_the_layer_more_robust_than_clean_training() -> None:
    inputs, labels = make_blobs(300, seed=0)
    test_x, test_y = make_blobs(150, seed=1)
    base = make_mlp(seed=0)
    optimizer = torch.optim.Adam(base.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(base(inputs), labels).backward()
        optimizer.step()
    threat = Threat(norm="l2", epsilon=2.0)
    settings = TrainConfig(steps=30, lr=1e-2)
    robust: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    for kind in ("clean", "lat"):
        model = copy.deepcopy(base)
        spec = (
            DefenseConfig(kind="clean")
            if kind == "clean"
            else DefenseConfig(kind="lat", sites=["1"], threat=threat, pgd=PGDConfig(steps=5))
        )
        loader = DataLoader(
            TensorDataset(inputs, labels),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        torch.manual_seed(0)
        Trainer(model, IO, spec, settings, progress=False).fit(loader)
        model.eval()
        attack = LatentAttack(["1"], threat, PGDConfig(steps=10))
        deltas = attack(model, IO, (test_x, test_y), generator=torch.Generator().manual_seed(0)).deltas
        robust[kind] = attack.loss_with(model, IO, (test_x, test_y), deltas)
        with torch.no_grad():
            accuracy[kind] = float((model(test_x).argmax(dim=1) == test_y).float().mean())
    assert robust["lat"] < 0.5 * robust["clean"], robust
    assert accuracy["lat"] > 0.9 and accuracy["clean"] > 0.9, accuracy


@pytest.mark.parametrize(
    ("kind", "optimizer"), [("lat", "adam"), ("rlat", "sgd"), ("at", "adamw"), ("clean", "adam")]
)
def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path, kind: str, optimizer: str) -> None:
    spec = defense(kind)

    def run(steps: int, checkpoint: Path, model_seed: int, rng_seed: int) -> nn.Module:
        model = make_mlp(seed=model_seed)
        torch.manual_seed(rng_seed)
        settings = TrainConfig(steps=steps, lr=1e-2, optimizer=optimizer)
        Trainer(model, IO, spec, settings, checkpoint=checkpoint, progress=False).fit(blob_loader(seed=7))
        return model

    full = run(10, tmp_path / "full.safetensors", 0, 1)
    half = run(5, tmp_path / "split.safetensors", 0, 1)
    assert not same_weights(full, half)
    # Another initialisation and global RNG state: everything must come from the checkpoint.
    resumed = run(10, tmp_path / "split.safetensors", 5, 99)
    assert same_weights(full, resumed)


def test_checkpoint_for_another_defense_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt.safetensors"
    Trainer(make_mlp(), IO, defense("lat"), TrainConfig(steps=2), checkpoint=checkpoint, progress=False).fit(
        blob_loader()
    )
    assert checkpoint.is_file()
    other = defense("lat", threat=Threat(norm="l2", epsilon=0.9, epsilon_mode="relative"))
    trainer = Trainer(make_mlp(), IO, other, TrainConfig(steps=4), checkpoint=checkpoint, progress=False)
    with pytest.raises(CheckpointError, match="another defense"):
        trainer.fit(blob_loader())


def test_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path: Path) -> None:
    """A checkpoint written before a defense field existed resumes when the field keeps its default."""
    checkpoint = tmp_path / "ckpt.safetensors"
    Trainer(make_mlp(), IO, defense("lat"), TrainConfig(steps=2), checkpoint=checkpoint, progress=False).fit(
        blob_loader()
    )
    tensors, meta = load_tensors(checkpoint)
    del meta["defense"]["kl_weight"]  # as an older latentguard wrote it
    save_tensors(checkpoint, tensors, meta)
    trainer = Trainer(
        make_mlp(), IO, defense("lat"), TrainConfig(steps=4), checkpoint=checkpoint, progress=False
    )
    assert trainer.load_checkpoint() and trainer.step == 2
    meta["defense"]["kl_weight"] = 0.5  # a field that differs is still another defense
    save_tensors(checkpoint, tensors, meta)
    with pytest.raises(CheckpointError, match="another defense"):
        Trainer(make_mlp(), IO, defense("lat"), TrainConfig(steps=4), checkpoint=checkpoint).load_checkpoint()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupted_checkpoint_is_refused(tmp_path: Path, damage: str) -> None:
    checkpoint = tmp_path / "ckpt.safetensors"
    Trainer(
        make_mlp(), IO, defense("clean"), TrainConfig(steps=2), checkpoint=checkpoint, progress=False
    ).fit(blob_loader())
    data = checkpoint.read_bytes()
    broken = {"garbage": b"\x00not a safetensors file" * 4, "truncated": data[: len(data) // 2], "empty": b""}
    checkpoint.write_bytes(broken[damage])
    trainer = Trainer(
        make_mlp(), IO, defense("clean"), TrainConfig(steps=4), checkpoint=checkpoint, progress=False
    )
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors"):
        trainer.fit(blob_loader())


def nan_loader() -> list[tuple[Tensor, Tensor]]:
    inputs, labels = make_blobs(32, seed=0)
    poisoned = inputs.clone()
    poisoned[0, 0] = float("nan")
    return [(inputs[:16], labels[:16]), (poisoned[:16], labels[:16])]


@pytest.mark.parametrize("kind", ["clean", "at", "lat", "rlat"])
def test_nonfinite_loss_stops_by_default(kind: str) -> None:
    trainer = Trainer(
        make_mlp(),
        IO,
        defense(kind, threat=Threat(epsilon=0.5)) if kind != "clean" else defense(kind),
        TrainConfig(steps=3),
        progress=False,
    )
    with pytest.raises(NonFiniteError, match="non-finite"):
        trainer.fit(nan_loader())


@pytest.mark.parametrize("kind", ["clean", "at", "lat", "rlat"])
def test_nonfinite_loss_is_skipped_when_asked(kind: str) -> None:
    """on_nonfinite='skip' must skip a NaN batch for every defense, the attacked ones included."""
    spec = defense(kind, threat=Threat(epsilon=0.5)) if kind != "clean" else defense(kind)
    model = make_mlp()
    trainer = Trainer(model, IO, spec, TrainConfig(steps=4, on_nonfinite="skip"), progress=False)
    result = trainer.fit(nan_loader())
    assert result.skipped == 2
    assert result.steps == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_gradient_check_finds_nan_and_inf_and_survives_a_sum_that_overflows() -> None:
    ones, huge = torch.ones(10), torch.full((4,), 3e38)  # finite, but their float32 sum is inf
    nan, inf = torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), float("-inf")])
    assert all_finite([]) and all_finite([ones, huge]) and all_finite([ones.half(), ones.bfloat16()])
    assert not all_finite([ones, nan]) and not all_finite([inf]) and not all_finite([huge, inf[:1]])
