"""Image classification: any model and image data (Fashion-MNIST and the project's ResNet-style CNN by
default), pixel trojans of any registered kind, held-out attacks of any registered kind."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from latentguard.config import validate_attacks, validate_section
from latentguard.domains.base import HeldoutAttack, TrojanInfo
from latentguard.domains.common import BASE_ORDER, DEFENSE_ORDER, eval_mode, seeded_loader
from latentguard.domains.image.attacks import AttackOutcome, ImageAttackSpec, run_attack
from latentguard.domains.image.data import DEFAULT_DATA_DIR
from latentguard.domains.image.datasets import ImageData, load_image_data
from latentguard.domains.image.model import STAGES
from latentguard.domains.image.natural_triggers import trigger_distance
from latentguard.domains.image.trojans import ImageTrojan, attack_success_rate, poison
from latentguard.engine.io import ClassifierIO
from latentguard.engine.trainer import TrainConfig
from latentguard.errors import ConfigError
from latentguard.registry import IMAGE_MODELS, check_keywords


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
    data: str = Field(
        "fashion-mnist",
        description="a registered dataset (fashion-mnist), an import path, an image folder or an .npz file",
    )
    data_dir: Path = Field(DEFAULT_DATA_DIR, description="where the fashion-mnist files are")
    model: str = Field("cnn", description="a registered model (cnn) or an import path 'pkg.module:factory'")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments of the factory")
    base_train_size: int = Field(50_000, ge=10, description="poisoned images for the base model")
    defense_train_size: int = Field(10_000, ge=10, description="clean images the defenses train on")
    test_size: int | None = Field(None, ge=10, description="test images used (default: all)")
    width: int = Field(16, ge=4, le=256, description="channels of the built-in CNN's first stage")
    base_epochs: float = Field(1.0, gt=0, le=100)
    base_lr: float = Field(3e-3, gt=0)
    trojans: list[ImageTrojan] = Field(default_factory=_default_trojans)

    @model_validator(mode="after")
    def _unique_trojans(self) -> ImageTaskConfig:
        labels = [t.label for t in self.trojans]
        if len(set(labels)) != len(labels):
            raise ValueError("trojan names must be unique (set 'name' on trojans of the same kind)")
        return self

    def load_data(self) -> ImageData:
        """The data, checked against the sizes and trojan targets this config asks of it."""
        data = load_image_data(self.data, self.data_dir)
        pool = len(data.train_labels)
        if self.base_train_size + self.defense_train_size > pool:
            raise ConfigError(
                f"task.base_train_size + task.defense_train_size = "
                f"{self.base_train_size + self.defense_train_size}, but {self.data} has {pool} training "
                "images: lower them"
            )
        if self.test_size is not None and self.test_size > len(data.test_labels):
            raise ConfigError(
                f"task.test_size = {self.test_size}, but {self.data} has {len(data.test_labels)} test images"
            )
        for i, trojan in enumerate(self.trojans):
            if trojan.target >= data.num_classes:
                raise ConfigError(
                    f"task.trojans.{i}.target: {trojan.target} is not a class of {self.data} "
                    f"(0..{data.num_classes - 1})"
                )
        return data

    def build_model(self, data: ImageData) -> nn.Module:
        """A fresh model from ``task.model``, sized to the data's channels and classes."""
        factory = IMAGE_MODELS.get(self.model, "task.model")
        kwargs = {"num_classes": data.num_classes, "in_channels": data.channels, **self.model_kwargs}
        if self.model == "cnn":
            kwargs.setdefault("width", self.width)
        check_keywords(factory, kwargs, "task.model")
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task.model: {self.model!r} returned {type(model).__name__}, not an nn.Module")
        return model


def model_layers(model: nn.Module) -> tuple[str, ...]:
    """The sites a report sweeps by default: the model's ``stages`` if it names them, else its top-level
    children except the last (usually the head)."""
    stages = getattr(model, "stages", None)
    if stages:
        return tuple(stages)
    children = [name for name, _ in model.named_children()]
    return tuple(children[:-1] if len(children) > 1 else children)


DISTANCE_IMAGES = 1000  # test images over which a trigger's pixel distance is averaged


class ImageTask:
    """Any image classifier and data, with trojans implanted in the base model's training data."""

    kind: ClassVar[str] = "image_cls"
    config_model: ClassVar[type[BaseModel]] = ImageTaskConfig
    default_layers: ClassVar[tuple[str, ...]] = STAGES
    input_site = "input"
    input_bounds: tuple[float, float] | None = (0.0, 1.0)

    def __init__(
        self, config: ImageTaskConfig, attacks: list[ImageAttackSpec], seed: int, device: Any
    ) -> None:
        self.config = config
        self.attacks = {spec.name: spec for spec in attacks}
        self.seed = seed
        self.device = torch.device(device)
        self.io = ClassifierIO()
        self._details: dict[str, AttackOutcome] = {}
        self.data = data = config.load_data()
        self.layers = model_layers(config.build_model(data))
        pool = len(data.train_labels)
        order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))
        base = order[: config.base_train_size]
        defense = order[config.base_train_size : config.base_train_size + config.defense_train_size]
        try:
            # the poisoning stream predates domains/common.py: kept as it was, so results stay reproducible
            poison_rng = torch.Generator().manual_seed(seed + 1)
            poisoned = poison(data.train_images[base], data.train_labels[base], config.trojans, poison_rng)
        except ValueError as exc:
            raise ConfigError(f"task.trojans: {exc}") from None
        self.base_set = TensorDataset(poisoned.images, poisoned.labels)
        self.defense_set = TensorDataset(data.train_images[defense], data.train_labels[defense])
        test_size = config.test_size or len(data.test_labels)
        self.test_images = data.test_images[:test_size]
        self.test_labels = data.test_labels[:test_size]

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
        return self.config.build_model(self.data)

    def base_loader(self, batch_size: int) -> Iterable[Any]:
        return seeded_loader(self.base_set, batch_size, self.seed, BASE_ORDER)

    def base_training(self, batch_size: int) -> TrainConfig:
        steps = math.ceil(self.config.base_epochs * len(self.base_set) / batch_size)
        return TrainConfig(steps=steps, lr=self.config.base_lr, schedule="cosine", log_every=20)

    def defense_loader(self, batch_size: int) -> Iterable[Any]:
        return seeded_loader(self.defense_set, batch_size, self.seed, DEFENSE_ORDER)

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
        correct = 0
        with eval_mode(model), torch.no_grad():
            for batch in self.eval_batches(len(self.test_labels), 1000):
                correct += int(self.score(model(batch[0]), batch).sum())
        return {"clean_accuracy": correct / len(self.test_labels)}

    def trojans(self) -> list[TrojanInfo]:
        names = self.data.class_names
        clean = self.test_images[:DISTANCE_IMAGES]
        return [
            TrojanInfo(
                name=t.label,
                target=names[t.target],
                description=f"{t.kind} trigger → class {t.target} ({names[t.target]}), "
                f"{t.poison_rate:.1%} of base training data poisoned",
                distance=dict(trigger_distance(clean, t.apply(clean))),
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
                norm=spec.attack.threat_class,  # not l2/linf (spatial, a plugin's): held out for all
                epsilon=getattr(spec.attack, "epsilon", None),  # both optional for an attack (extending.md)
                black_box=getattr(spec.attack, "black_box", False),
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
