"""Free LAT (``lat`` with ``options: {replays: m}``): δ trains along with the model, no inner loop.

Each replay is one forward and one backward: the weights take one optimizer step and δ one ascent step,
projected back into its ball. These tests check the ball after every replay, one update per replay, that a
zero budget is exactly clean fine-tuning on the same (replayed) batches, and that resuming a checkpoint
mid-batch equals an uninterrupted run.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_blobs, make_mlp
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from latentguard.engine.attack import LatentAttack, PGDConfig
from latentguard.engine.free import FreeAdversary
from latentguard.engine.io import ClassifierIO
from latentguard.engine.threat import Threat, unit_norms
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer
from latentguard.errors import ConfigError
from latentguard.runs import load_tensors

IO = ClassifierIO()
SITE = "1"  # the first ReLU's output


def free_lat(replays: int, threat: Threat | None = None, **options: Any) -> DefenseConfig:
    threat = threat or Threat(norm="l2", epsilon=0.5, epsilon_mode="relative")
    return DefenseConfig(kind="lat", sites=[SITE], threat=threat, options={"replays": replays, **options})


def batches(n: int = 100, batch_size: int = 16, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Fixed, shuffled batches (the last one short) as a plain list, so two runs see exactly the same."""
    inputs, labels = make_blobs(n, seed=seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [(inputs[i], labels[i]) for i in order.split(batch_size)]


def replayed(data: list[Any], times: int) -> list[Any]:
    """Each batch ``times`` times in a row: what free LAT's replays see, as a data stream."""
    return [batch for batch in data for _ in range(times)]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def recorded(trainer: Trainer) -> list[dict[str, Tensor]]:
    """δ after every update of the trainer's free adversary (and its radii), recorded as training runs."""
    free = trainer.kind.free  # type: ignore[attr-defined]
    assert isinstance(free, FreeAdversary)
    update = free.update
    seen: list[dict[str, Tensor]] = []

    def recording(deltas: dict[str, Tensor], references: dict[str, Tensor]) -> None:
        update(deltas, references)
        seen.append({site: delta.clone() for site, delta in free.deltas.items()})

    free.update = recording  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize(
    "threat",
    [
        Threat(norm="l2", epsilon=0.5, epsilon_mode="relative"),
        Threat(norm="linf", epsilon=0.05),
        Threat(norm="l2", epsilon=1.0),
    ],
)
def test_delta_stays_in_its_ball_after_every_replay(threat: Threat) -> None:
    torch.manual_seed(0)
    trainer = Trainer(make_mlp(), IO, free_lat(3, threat), TrainConfig(steps=21, lr=1e-2), progress=False)
    seen = recorded(trainer)
    trainer.fit(batches())
    assert len(seen) == 21
    rad = trainer.attack.radii()[SITE]  # type: ignore[union-attr]
    assert rad > 0
    for deltas in seen:
        norms = unit_norms(deltas[SITE], threat.norm, threat.scope)
        assert float(norms.max()) <= rad * (1 + 1e-5)
    # a step of the whole radius from inside the ball ends on its surface: δ really moved
    last = unit_norms(seen[-1][SITE], threat.norm, threat.scope)
    assert float(last.min()) == pytest.approx(rad, rel=1e-4)


def test_bounds_hold_around_the_clean_activation() -> None:
    """At a site with ``bounds`` (pixels, say) the training forward keeps the clean activation to project."""
    threat = Threat(norm="linf", epsilon=0.5, bounds=(0.0, 1.0))
    spec = DefenseConfig(kind="lat", sites=["input"], threat=threat, options={"replays": 2})
    trainer = Trainer(make_mlp(), IO, spec, TrainConfig(steps=8, lr=1e-2), progress=False)
    free = trainer.kind.free  # type: ignore[attr-defined]
    update = free.update
    checked: list[tuple[float, float, float]] = []

    def checking(deltas: dict[str, Tensor], references: dict[str, Tensor]) -> None:
        update(deltas, references)
        moved = references["input"] + free.deltas["input"]
        checked.append((float(moved.min()), float(moved.max()), float(free.deltas["input"].abs().max())))

    free.update = checking
    trainer.fit([(x.sigmoid(), y) for x, y in batches()])  # pixels-like inputs in (0, 1)
    assert len(checked) == 8
    assert all(low >= 0 and high <= 1 and size <= 0.5 + 1e-6 for low, high, size in checked), checked
    assert max(size for *_, size in checked) > 0.4  # the bounds bind, the ball is used


def test_a_batch_of_another_shape_starts_from_zero_and_the_delta_is_carried_otherwise() -> None:
    torch.manual_seed(0)
    data = batches(n=40, batch_size=16)  # 16, 16, 8
    trainer = Trainer(make_mlp(), IO, free_lat(2), TrainConfig(steps=6, lr=1e-2), progress=False)
    seen = recorded(trainer)
    starts: list[bool] = []
    free = trainer.kind.free  # type: ignore[attr-defined]
    start = free.start

    def counting(site: str, activation: Tensor) -> Tensor:
        starts.append(True)
        return start(site, activation)

    free.start = counting
    trainer.fit(data)
    assert [d[SITE].shape[0] for d in seen] == [16, 16, 16, 16, 8, 8]
    assert len(starts) == 2  # the first batch and the short one; the second full batch carried δ over


def test_the_weights_are_updated_once_per_replay() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    trainer = Trainer(model, IO, free_lat(4), TrainConfig(steps=10, lr=1e-2), progress=False)
    seen = recorded(trainer)
    snapshots: list[dict[str, Tensor]] = [copy.deepcopy(model.state_dict())]
    trainer.optimizer.register_step_post_hook(lambda *_: snapshots.append(copy.deepcopy(model.state_dict())))
    trained_on: list[Tensor] = []
    train_step = trainer.train_step

    def recording(batch: Any) -> dict[str, float] | None:
        trained_on.append(batch[0])
        return train_step(batch)

    trainer.train_step = recording  # type: ignore[method-assign]
    fetched = 0
    data = batches()

    class Counting:
        def __iter__(self) -> Iterator[Any]:
            nonlocal fetched
            for batch in data:
                fetched += 1
                yield batch

    result = trainer.fit(Counting())
    assert result.steps == 10 and len(seen) == 10  # one δ step per update
    assert len(snapshots) == 11  # one optimizer step per replay
    for before, after in itertools.pairwise(snapshots):
        assert any(not torch.equal(before[k], after[k]) for k in before)
    assert fetched == 3  # 10 updates at 4 replays: batches 1, 2 in full, batch 3 twice
    for i, batch in enumerate(trained_on):
        assert torch.equal(batch, data[i // 4][0])


@pytest.mark.parametrize("replays", [1, 3])
def test_a_zero_budget_is_exactly_clean_fine_tuning_on_the_replayed_batches(replays: int) -> None:
    """ε = 0 is no config a user may write (a threat needs ε > 0), so the threat is built unvalidated."""
    zero = Threat.model_construct(norm="l2", epsilon=0.0, epsilon_mode="absolute", scope="example")
    data = batches()
    settings = TrainConfig(steps=12, lr=1e-2, optimizer="adam")
    free_model, clean_model = make_mlp(seed=3), make_mlp(seed=3)
    trainer = Trainer(free_model, IO, free_lat(replays, zero), settings, progress=False)
    seen = recorded(trainer)
    trainer.fit(data)
    Trainer(clean_model, IO, DefenseConfig(kind="clean"), settings, progress=False).fit(
        replayed(data, replays)
    )
    assert len(seen) == 12 and all(float(d[SITE].abs().max()) == 0 for d in seen)
    assert same_weights(free_model, clean_model)
    # and a real budget does change what is learned
    other = make_mlp(seed=3)
    Trainer(other, IO, free_lat(replays), settings, progress=False).fit(data)
    assert not same_weights(other, clean_model)


def test_resume_mid_batch_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    spec = free_lat(3)

    def run(steps: int, checkpoint: Path, model_seed: int) -> nn.Module:
        model = make_mlp(seed=model_seed)
        settings = TrainConfig(steps=steps, lr=1e-2, optimizer="adam")
        Trainer(model, IO, spec, settings, checkpoint=checkpoint, progress=False).fit(batches())
        return model

    full = run(10, tmp_path / "full.safetensors", 0)
    half = run(5, tmp_path / "split.safetensors", 0)  # 5 = batch 2, after its second replay
    tensors, _ = load_tensors(tmp_path / "split.safetensors")
    assert f"defense.{SITE}" in tensors  # the carried δ
    resumed = run(10, tmp_path / "split.safetensors", 7)  # another initialisation: all from the checkpoint
    assert not same_weights(full, half)
    assert same_weights(full, resumed)


def test_free_lat_makes_the_layer_more_robust_than_clean_training() -> None:
    """The same check as exact LAT's in test_engine, at the same number of model updates."""
    inputs, labels = make_blobs(300, seed=0)
    test_x, test_y = make_blobs(150, seed=1)
    base = make_mlp(seed=0)
    optimizer = torch.optim.Adam(base.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(base(inputs), labels).backward()
        optimizer.step()
    threat = Threat(norm="l2", epsilon=2.0)
    robust: dict[str, float] = {}
    for kind in ("clean", "free"):
        model = copy.deepcopy(base)
        spec = DefenseConfig(kind="clean") if kind == "clean" else free_lat(4, threat)
        loader = DataLoader(
            TensorDataset(inputs, labels),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        torch.manual_seed(0)
        Trainer(model, IO, spec, TrainConfig(steps=40, lr=1e-2), progress=False).fit(loader)
        model.eval()
        attack = LatentAttack([SITE], threat, PGDConfig(steps=10))
        deltas = attack(model, IO, (test_x, test_y), generator=torch.Generator().manual_seed(0)).deltas
        robust[kind] = attack.loss_with(model, IO, (test_x, test_y), deltas)
    assert robust["free"] < 0.5 * robust["clean"], robust


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"replays": 0}, "options.replays: Input should be greater than or equal to 1"),
        ({"step": 0.5}, "options.replays: needed"),
        ({"replays": 2, "carry": False}, "options.carry: Extra inputs"),
        ({"replays": 2, "step": 0}, "options.step"),
    ],
)
def test_bad_free_options_name_the_field(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        DefenseConfig(kind="lat", sites=[SITE], threat=Threat(), options=options)


def test_free_lat_is_described_and_refuses_gradient_accumulation() -> None:
    spec = free_lat(4, step=0.5)
    assert spec.describe().startswith("free latent PGD (4 replays per batch, δ step 0.5 × radius) at 1:")
    assert "steps" not in spec.describe()
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        Trainer(make_mlp(), IO, spec, TrainConfig(gradient_accumulation_steps=2), progress=False)
    # exact LAT is unchanged
    exact = DefenseConfig(kind="lat", sites=[SITE], threat=Threat())
    assert exact.describe().startswith("latent PGD at 1:") and "8 steps" in exact.describe()
