"""Image classification: Fashion-MNIST, the project's ResNet-style CNN, pixel trojans, torchattacks."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from latentguard.config import validate_attacks, validate_section
from latentguard.domains.base import HeldoutAttack, TrojanInfo
from latentguard.domains.image.attacks import AttackOutcome, ImageAttackSpec, run_attack
from latentguard.domains.image.data import CLASS_NAMES, DEFAULT_DATA_DIR, load_fashion_mnist
from latentguard.domains.image.model import STAGES, ResNetCNN
from latentguard.domains.image.trojans import ImageTrojan, attack_success_rate, poison
from latentguard.engine.io import ClassifierIO
from latentguard.engine.trainer import TrainConfig
from latentguard.errors import ConfigError

TRAIN_POOL = 60_000


def _default_trojans() -> list[ImageTrojan]:
    return [
        ImageTrojan(kind="patch", target=0, poison_rate=0.02),
        ImageTrojan(kind="blend", target=1, poison_rate=0.02),
        ImageTrojan(kind="sinusoid", target=2, poison_rate=0.02),
    ]


class ImageTaskConfig(BaseModel):
    """The ``task`` section for ``kind: image_cls``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image_cls"] = "image_cls"
    data_dir: Path = DEFAULT_DATA_DIR
    base_train_size: int = Field(50_000, ge=100, description="poisoned images for the base model")
    defense_train_size: int = Field(10_000, ge=100, description="clean images the defenses train on")
    test_size: int = Field(10_000, ge=100, le=10_000)
    width: int = Field(16, ge=4, le=256, description="channels of the CNN's first stage")
    base_epochs: float = Field(1.0, gt=0, le=100)
    base_lr: float = Field(3e-3, gt=0)
    trojans: list[ImageTrojan] = Field(default_factory=_default_trojans)

    @model_validator(mode="after")
    def _fits(self) -> ImageTaskConfig:
        if self.base_train_size + self.defense_train_size > TRAIN_POOL:
            raise ValueError(f"base_train_size + defense_train_size must be at most {TRAIN_POOL}")
        labels = [t.label for t in self.trojans]
        if len(set(labels)) != len(labels):
            raise ValueError("trojan names must be unique (set 'name' on trojans of the same kind)")
        return self


@functools.lru_cache(maxsize=4)
def _load(data_dir: Path, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    return load_fashion_mnist(data_dir, split)


class ImageTask:
    """Fashion-MNIST with trojans implanted in the base model's training data."""

    kind: ClassVar[str] = "image_cls"
    config_model: ClassVar[type[BaseModel]] = ImageTaskConfig
    default_layers: ClassVar[tuple[str, ...]] = STAGES
    input_site = "input"
    input_bounds: tuple[float, float] | None = (0.0, 1.0)
    layers: tuple[str, ...] = STAGES

    def __init__(
        self, config: ImageTaskConfig, attacks: list[ImageAttackSpec], seed: int, device: Any
    ) -> None:
        self.config = config
        self.attacks = {spec.name: spec for spec in attacks}
        self.seed = seed
        self.device = torch.device(device)
        self.io = ClassifierIO()
        self._details: dict[str, AttackOutcome] = {}
        images, labels = _load(config.data_dir, "train")
        order = torch.randperm(TRAIN_POOL, generator=torch.Generator().manual_seed(seed))
        base = order[: config.base_train_size]
        defense = order[config.base_train_size : config.base_train_size + config.defense_train_size]
        generator = torch.Generator().manual_seed(seed + 1)
        try:
            poisoned = poison(images[base], labels[base], config.trojans, generator)
        except ValueError as exc:
            raise ConfigError(f"task.trojans: {exc}") from None
        self.base_set = TensorDataset(poisoned.images, poisoned.labels)
        self.defense_set = TensorDataset(images[defense], labels[defense])
        test_images, test_labels = _load(config.data_dir, "test")
        self.test_images = test_images[: config.test_size]
        self.test_labels = test_labels[: config.test_size]

    @classmethod
    def from_config(
        cls, section: dict[str, Any], attacks: list[dict[str, Any]], *, seed: int, device: Any
    ) -> ImageTask:
        config = validate_section(ImageTaskConfig, section, "task")
        specs = validate_attacks(ImageAttackSpec, attacks)
        return cls(config, specs, seed, device)

    def defense_model(self, model: nn.Module) -> nn.Module:
        """The defenses fine-tune every weight of the trojaned model."""
        return model

    def build_model(self) -> nn.Module:
        return ResNetCNN(in_channels=1, num_classes=len(CLASS_NAMES), width=self.config.width)

    def _loader(self, dataset: TensorDataset, batch_size: int, salt: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed * 7919 + salt)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)

    def base_loader(self, batch_size: int) -> Iterable[Any]:
        return self._loader(self.base_set, batch_size, salt=1)

    def base_training(self, batch_size: int) -> TrainConfig:
        steps = math.ceil(self.config.base_epochs * len(self.base_set) / batch_size)
        return TrainConfig(steps=steps, lr=self.config.base_lr, schedule="cosine", log_every=20)

    def defense_loader(self, batch_size: int) -> Iterable[Any]:
        return self._loader(self.defense_set, batch_size, salt=2)

    def eval_batches(self, examples: int, batch_size: int) -> list[Any]:
        n = min(examples, len(self.test_labels))
        return [
            (
                self.test_images[i : i + batch_size].to(self.device),
                self.test_labels[i : i + batch_size].to(self.device),
            )
            for i in range(0, n, batch_size)
        ]

    def score(self, output: Tensor, batch: Any) -> Tensor:
        return (output.argmax(dim=1) == batch[1]).float()

    def clean_metric_keys(self) -> list[str]:
        return ["clean_accuracy"]

    def clean_metrics(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in self.eval_batches(len(self.test_labels), 1000):
                correct += int(self.score(model(batch[0]), batch).sum())
        model.train(was_training)
        return {"clean_accuracy": correct / len(self.test_labels)}

    def trojans(self) -> list[TrojanInfo]:
        return [
            TrojanInfo(
                name=t.label,
                target=CLASS_NAMES[t.target],
                description=f"{t.kind} trigger → class {t.target} ({CLASS_NAMES[t.target]}), "
                f"{t.poison_rate:.1%} of base training data poisoned",
            )
            for t in self.config.trojans
        ]

    def trojan_metrics(self, model: nn.Module) -> dict[str, float]:
        return {
            t.label: attack_success_rate(model, self.test_images, self.test_labels, t, device=self.device)
            for t in self.config.trojans
        }

    def heldout_attacks(self) -> list[HeldoutAttack]:
        return [
            HeldoutAttack(
                name=spec.name,
                description=spec.describe(),
                site=self.input_site,
                norm=spec.norm or "spatial",  # no training threat is spatial: held out for every defense
                epsilon=spec.epsilon,
                black_box=spec.kind == "square",
            )
            for spec in self.attacks.values()
        ]

    def run_heldout(self, model: nn.Module, name: str, seed: int) -> float:
        spec = self.attacks[name]
        outcome = run_attack(model, self.test_images, self.test_labels, spec, seed=seed, device=self.device)
        self._details[name] = outcome
        return outcome.robust_accuracy

    def heldout_details(self) -> dict[str, dict[str, Any]]:
        """The last outcome of each attack: accuracy on its subset before and under attack, and its time."""
        return {name: asdict(outcome) for name, outcome in self._details.items()}
