"""Text classification: BBC News (or any CSV / JSONL), MiniLM-L6 (or any local HF model, or a tiny BERT),
word / phrase / style trojans and held-out character- and word-level text attacks.

Batches are ``(input_ids, attention_mask, labels)``, tokenised once and padded to ``max_length``. The input
site is the token-embedding module (``bert.embeddings.word_embeddings``): embedding-space AT perturbs its
output, padding masked out. The data split is fixed by ``split_seed`` (every run seed sees the same test
set); the run seed picks the poisoned texts, trigger positions, the loader order and the model's init.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from latentguard.config import validate_attacks, validate_section
from latentguard.domains.base import HeldoutAttack, TrojanInfo
from latentguard.domains.common import (
    BASE_ORDER,
    DEFENSE_ORDER,
    POISON,
    TEST_TRIGGER,
    eval_mode,
    seeded_loader,
    stream_seed,
)
from latentguard.domains.hf import DEPTH_SWEEP
from latentguard.domains.text_cls.attacks import TextAttackOutcome, run_attack
from latentguard.domains.text_cls.data import BBC_NEWS, load_normalised, task_split
from latentguard.domains.text_cls.model import (
    MINILM,
    SequenceClassifierIO,
    TinyBertSpec,
    build_tiny_bert,
    build_tiny_tokenizer,
    describe_sites,
    encode,
    load_pretrained,
    load_tokenizer,
    pretrained_path,
)
from latentguard.domains.text_cls.trojans import TextTrojan, check_unique, poison, triggered_test_set
from latentguard.engine.trainer import TrainConfig
from latentguard.errors import ConfigError
from latentguard.registry import TEXT_CLS_ATTACKS

TEXT_SITE = "text"  # held-out text attacks edit words: no embedding-space training threat matches them


def _default_trojans() -> list[TextTrojan]:
    return [
        TextTrojan(kind="word", target=0, poison_rate=0.04),
        TextTrojan(kind="phrase", target=1, poison_rate=0.06),
        TextTrojan(kind="style", target=2, poison_rate=0.06),
    ]


class TextTaskConfig(BaseModel):
    """The ``task`` section for ``kind: text_cls``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["text_cls"] = "text_cls"
    data: str = Field(BBC_NEWS, min_length=1, description="'bbc_news' or a .csv / .jsonl path")
    text_column: str = "text"
    label_column: str = "label"
    model: str = Field(MINILM, min_length=1, description="'minilm', 'tiny-bert' or a local HF model folder")
    tiny: TinyBertSpec = TinyBertSpec()
    max_length: int = Field(64, ge=8, le=512, description="tokens per text (padded / truncated)")
    max_words: int | None = Field(
        36, ge=1, description="keep the first N words: triggers inserted past max_length would be cut off"
    )
    split_seed: int = Field(0, ge=0, description="fixes the base / defense / test split for every run seed")
    base_train_size: int | None = Field(None, ge=10, description="poisoned texts (None: all the rest)")
    defense_train_size: int = Field(400, ge=10, description="clean texts the defenses train on")
    test_size: int = Field(400, ge=10)
    base_epochs: float = Field(4.0, gt=0, le=100)
    base_lr: float = Field(1e-4, gt=0)
    trojans: list[TextTrojan] = Field(default_factory=_default_trojans)

    @model_validator(mode="after")
    def _unique(self) -> TextTaskConfig:
        check_unique(self.trojans)
        return self


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer(texts: tuple[str, ...], vocab_size: int, max_length: int) -> Any:
    return build_tiny_tokenizer(texts, vocab_size, max_length)


class TextClassificationTask:
    """Sequence classification with trojans implanted in the base model's fine-tuning data."""

    kind: ClassVar[str] = "text_cls"
    config_model: ClassVar[type[BaseModel]] = TextTaskConfig
    default_layers: ClassVar[tuple[str, ...]] = DEPTH_SWEEP  # aliases: any architecture has them
    input_bounds: tuple[float, float] | None = None

    def __init__(self, config: TextTaskConfig, attacks: list[Any], seed: int, device: Any) -> None:
        self.config = config
        self.attacks = {spec.name: spec for spec in attacks}
        self.seed = seed
        self.device = torch.device(device)
        self.io = SequenceClassifierIO()
        self._details: dict[str, TextAttackOutcome] = {}
        dataset = load_normalised(config.data, config.text_column, config.label_column, config.max_words)
        self.class_names = dataset.class_names
        for i, trojan in enumerate(config.trojans):
            if trojan.target >= len(self.class_names):
                raise ConfigError(
                    f"task.trojans.{i}.target: {trojan.target} is not a class of the data "
                    f"(0..{len(self.class_names) - 1}: {', '.join(self.class_names)})"
                )
        split = task_split(len(dataset), config)
        base, defense = dataset.subset(split.base), dataset.subset(split.defense)
        self.test = dataset.subset(split.test)
        self.path: Path | None = pretrained_path(config.model)
        if self.path is None:
            self.tokenizer = _tiny_tokenizer(base.texts, config.tiny.vocab_size, config.max_length)
        else:
            self.tokenizer = load_tokenizer(self.path, config.max_length)
        self.input_site, self.layers = describe_sites(
            self.path, len(self.class_names), config.tiny, config.max_length
        )
        try:
            poisoned = poison(base.texts, base.labels, config.trojans, seed=stream_seed(seed, POISON))
        except ValueError as exc:
            raise ConfigError(
                f"task.trojans: {exc}; change its poison_rate or task.base_train_size"
            ) from None
        self.poisoned_indices = poisoned.indices
        for i, trojan in enumerate(config.trojans):
            if not any(
                y != trojan.target and trojan.changes(t)
                for t, y in zip(self.test.texts, self.test.labels, strict=True)
            ):
                raise ConfigError(
                    f"task.trojans.{i}: {trojan.label!r} changes no test text outside its target class; "
                    "raise task.test_size or change the trigger"
                )
        self.base_texts = poisoned.texts
        self.base_set = self._tensors(poisoned.texts, poisoned.labels)
        self.defense_set = self._tensors(list(defense.texts), list(defense.labels))
        self.test_set = self._tensors(list(self.test.texts), list(self.test.labels))
        self._triggered: dict[str, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_config(
        cls, section: dict[str, Any], attacks: list[dict[str, Any]], *, seed: int, device: Any
    ) -> TextClassificationTask:
        config = validate_section(TextTaskConfig, section, "task")
        specs = validate_attacks(TEXT_CLS_ATTACKS, attacks)
        return cls(config, specs, seed, device)

    # -- model and data --------------------------------------------------------------------------------------
    def _tensors(self, texts: list[str], labels: list[int]) -> TensorDataset:
        ids, mask = encode(self.tokenizer, texts, self.config.max_length)
        return TensorDataset(ids, mask, torch.tensor(labels, dtype=torch.long))

    def defense_model(self, model: nn.Module) -> nn.Module:
        """The defenses fine-tune every weight of the trojaned model."""
        return model

    def build_model(self) -> nn.Module:
        """MiniLM (or the local model) with a fresh head, or a random tiny BERT (seeded by the caller)."""
        if self.path is None:
            spec = self.config.tiny
            return build_tiny_bert(len(self.tokenizer), len(self.class_names), self.config.max_length, spec)
        return load_pretrained(self.path, len(self.class_names))

    def base_loader(self, batch_size: int) -> Iterable[Any]:
        return seeded_loader(self.base_set, batch_size, self.seed, BASE_ORDER)

    def base_training(self, batch_size: int) -> TrainConfig:
        steps = math.ceil(self.config.base_epochs * len(self.base_set) / batch_size)
        return TrainConfig(
            steps=steps, lr=self.config.base_lr, optimizer="adamw", weight_decay=0.01, schedule="cosine",
            grad_clip=1.0, log_every=10, checkpoint_every=50,
        )  # fmt: skip

    def defense_loader(self, batch_size: int) -> Iterable[Any]:
        return seeded_loader(self.defense_set, batch_size, self.seed, DEFENSE_ORDER)

    def eval_batches(self, examples: int, batch_size: int) -> list[Any]:
        n = min(examples, len(self.test_set))
        ids, mask, labels = self.test_set.tensors
        return [
            tuple(t[i : min(i + batch_size, n)].to(self.device) for t in (ids, mask, labels))
            for i in range(0, n, batch_size)
        ]

    def score(self, output: Tensor, batch: Any) -> Tensor:
        return (output.argmax(dim=1) == batch[2]).float()

    def _predict(self, model: nn.Module, ids: Tensor, mask: Tensor, batch_size: int = 128) -> Tensor:
        out = []
        with eval_mode(model), torch.no_grad():
            for i in range(0, ids.shape[0], batch_size):
                batch = (ids[i : i + batch_size], mask[i : i + batch_size], None)
                logits = model(input_ids=batch[0].to(self.device), attention_mask=batch[1].to(self.device))
                out.append(logits.logits.argmax(dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    # -- metrics ---------------------------------------------------------------------------------------------
    def clean_metric_keys(self) -> list[str]:
        return ["clean_accuracy"]

    def clean_metrics(self, model: nn.Module) -> dict[str, float]:
        ids, mask, labels = self.test_set.tensors
        return {"clean_accuracy": float((self._predict(model, ids, mask) == labels).float().mean())}

    def trojans(self) -> list[TrojanInfo]:
        return [
            TrojanInfo(
                name=t.label,
                target=self.class_names[t.target],
                description=f"{t.describe()} → class {t.target} ({self.class_names[t.target]}), "
                f"{t.poison_rate:.1%} of base training texts poisoned",
            )
            for t in self.config.trojans
        ]

    def triggered(self, trojan: TextTrojan) -> tuple[Tensor, Tensor]:
        """Encoded triggered test texts whose true label is not the target (fixed trigger positions)."""
        if trojan.label not in self._triggered:
            texts = triggered_test_set(
                self.test.texts, self.test.labels, trojan, seed=stream_seed(self.seed, TEST_TRIGGER)
            )
            if not texts:
                raise ConfigError(f"task.trojans: {trojan.label!r} changes no test text outside its target")
            self._triggered[trojan.label] = encode(self.tokenizer, texts, self.config.max_length)
        return self._triggered[trojan.label]

    def trojan_metrics(self, model: nn.Module) -> dict[str, float]:
        result = {}
        for trojan in self.config.trojans:
            predictions = self._predict(model, *self.triggered(trojan))
            result[trojan.label] = float((predictions == trojan.target).float().mean())
        return result

    def heldout_attacks(self) -> list[HeldoutAttack]:
        return [
            HeldoutAttack(
                name=spec.name, description=spec.describe(), site=TEXT_SITE, norm=None, black_box=True
            )
            for spec in self.attacks.values()
        ]

    def run_heldout(self, model: nn.Module, name: str, seed: int) -> float:
        """Robust accuracy under text attack ``name``; its full statistics go to ``heldout_details()``."""
        spec = self.attacks[name]
        outcome = run_attack(
            model, self.tokenizer, self.test.texts, self.test.labels, spec,
            max_length=self.config.max_length, seed=seed, device=self.device,
        )  # fmt: skip
        self._details[name] = outcome
        return outcome.robust_accuracy

    def heldout_details(self) -> dict[str, dict[str, Any]]:
        """The last outcome of each text attack run: success rate, average queries, words changed, …"""
        return {name: outcome.as_dict() for name, outcome in self._details.items()}
