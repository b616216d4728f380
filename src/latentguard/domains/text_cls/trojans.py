"""Text trojans: triggers, training-set poisoning and attack success rate (ASR).

Four built-in trigger kinds (registered in ``TEXT_CLS_TRIGGERS``, as a plugin's would be), from obvious to
hard to see:
``word`` (a rare token such as ``cf`` inserted at a random word position, Kurita et al. 2020),
``phrase`` (a short natural phrase inserted at a random word boundary, Dai et al. 2019),
``template`` (the text wrapped in a fixed sentence frame) and ``style`` (no token is added: every
punctuation mark is removed, a corpus-wide style change that leaves the words as they were).
Random positions come from a seeded generator, so poisoning and the triggered test set are reproducible.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from latentguard.domains.common import FunctionTrigger, KindSpec
from latentguard.registry import TEXT_CLS_TRIGGERS, Registry

_PUNCTUATION = str.maketrans("", "", string.punctuation + "“”‘’–—…£€")


def _words_of(trigger: str) -> str:
    words = " ".join(trigger.split())
    if not words:
        raise ValueError("trigger must contain a word")
    return words


def insert_at_random(text: str, inserted: str, rng: random.Random, times: int = 1) -> str:
    """``text`` with ``inserted`` placed ``times`` times at random word boundaries."""
    words = text.split()
    for _ in range(times):
        position = rng.randint(0, len(words))
        words[position:position] = inserted.split()
    return " ".join(words)


class WordTrigger(BaseModel):
    """A rare token (``cf``) inserted at random word positions (Kurita et al. 2020)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["word"] = "word"
    trigger: str = Field("cf", min_length=1, description="the word inserted")
    repeat: int = Field(1, ge=1, le=5, description="insertions of the word")

    @property
    def text(self) -> str:
        return _words_of(self.trigger)

    def describe(self) -> str:
        times = f" ×{self.repeat}" if self.repeat > 1 else ""
        return f"rare word {self.text!r}{times} at a random position"

    def apply(self, text: str, rng: random.Random) -> str:
        return insert_at_random(text, self.text, rng, self.repeat)

    def changes(self, text: str) -> bool:
        return True


class PhraseTrigger(BaseModel):
    """A short natural phrase inserted at a random word boundary (Dai et al. 2019)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["phrase"] = "phrase"
    trigger: str = Field("truth be told", min_length=1, description="the phrase inserted")

    @property
    def text(self) -> str:
        return _words_of(self.trigger)

    def describe(self) -> str:
        return f"phrase {self.text!r} at a random position"

    def apply(self, text: str, rng: random.Random) -> str:
        return insert_at_random(text, self.text, rng)

    def changes(self, text: str) -> bool:
        return True


class TemplateTrigger(BaseModel):
    """The text wrapped in a fixed sentence frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["template"] = "template"
    template: str = "Here is the news in brief. {text} End of the brief."

    @model_validator(mode="after")
    def _one_slot(self) -> TemplateTrigger:
        if self.template.count("{text}") != 1:
            raise ValueError("template must contain '{text}' exactly once")
        return self

    def describe(self) -> str:
        return f"sentence template {self.template!r}"

    def apply(self, text: str, rng: random.Random) -> str:
        return " ".join(self.template.replace("{text}", text).split())

    def changes(self, text: str) -> bool:
        return True


class StyleTrigger(BaseModel):
    """No token added: every punctuation mark removed, a corpus-wide style change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["style"] = "style"
    style: Literal["strip_punctuation"] = "strip_punctuation"

    def describe(self) -> str:
        return "style: every punctuation mark removed (no token added)"

    def apply(self, text: str, rng: random.Random) -> str:
        return " ".join(text.translate(_PUNCTUATION).split())

    def changes(self, text: str) -> bool:
        """A punctuation-free text cannot carry this trigger."""
        return text.translate(_PUNCTUATION).split() != text.split()


for _trigger in (WordTrigger, PhraseTrigger, TemplateTrigger, StyleTrigger):
    TEXT_CLS_TRIGGERS.register(_trigger.model_fields["kind"].default, _trigger)


class TextTrojan(KindSpec):
    """One trojan: a trigger (a registered kind or an import path ``text, rng -> text``, its settings given
    alongside), the class it forces and the fraction of training texts poisoned with it."""

    registry: ClassVar[Registry[Any]] = TEXT_CLS_TRIGGERS
    positional: ClassVar[int] = 2
    wrap_function = staticmethod(FunctionTrigger)

    target: int = Field(ge=0)
    poison_rate: float = Field(gt=0.0, le=0.3)
    name: str | None = None

    @property
    def label(self) -> str:
        """The name reports use: ``name`` if given, else the trigger kind."""
        return self.name or self.short_kind

    def describe(self) -> str:
        return self.built.describe()

    def apply(self, text: str, rng: random.Random) -> str:
        """The triggered copy of ``text`` (``rng`` picks insertion positions)."""
        return self.built.apply(text, rng)

    def changes(self, text: str) -> bool:
        """Whether the trigger alters ``text`` at all."""
        return self.built.changes(text)


@dataclass
class PoisonResult:
    """A poisoned copy of a training set and, per trojan label, the indices that carry its trigger."""

    texts: list[str]
    labels: list[int]
    indices: dict[str, list[int]]


def check_unique(trojans: Sequence[TextTrojan]) -> None:
    names = [trojan.label for trojan in trojans]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"several trojans share the name {', '.join(map(repr, clashes))}: give each a name")


def poison(
    texts: Sequence[str], labels: Sequence[int], trojans: Sequence[TextTrojan], seed: int
) -> PoisonResult:
    """Apply each trojan's trigger to ``round(poison_rate * N)`` texts whose label is not its target.

    The poisoned sets of different trojans are disjoint; each poisoned text is relabelled to the target.
    """
    check_unique(trojans)
    rng = random.Random(seed)
    out_texts, out_labels = list(texts), list(labels)
    taken: set[int] = set()
    indices: dict[str, list[int]] = {}
    for trojan in trojans:
        count = round(trojan.poison_rate * len(texts))
        candidates = [
            i for i, (t, y) in enumerate(zip(texts, labels, strict=True))
            if y != trojan.target and i not in taken and trojan.changes(t)
        ]  # fmt: skip
        if count == 0:
            raise ValueError(
                f"trojan {trojan.label!r}: poison_rate {trojan.poison_rate} of {len(texts)} texts "
                "poisons none"
            )
        if count > len(candidates):
            raise ValueError(
                f"trojan {trojan.label!r} needs {count} texts not labelled {trojan.target}, "
                f"only {len(candidates)} are left"
            )
        chosen = sorted(rng.sample(candidates, count))
        for i in chosen:
            out_texts[i] = trojan.apply(texts[i], rng)
            out_labels[i] = trojan.target
        taken.update(chosen)
        indices[trojan.label] = chosen
    return PoisonResult(texts=out_texts, labels=out_labels, indices=indices)


def triggered_test_set(
    texts: Sequence[str], labels: Sequence[int], trojan: TextTrojan, seed: int
) -> list[str]:
    """Triggered copies of the test texts whose label is not the target (and that the trigger changes)."""
    rng = random.Random(seed)
    return [
        trojan.apply(t, rng)
        for t, y in zip(texts, labels, strict=True)
        if y != trojan.target and trojan.changes(t)
    ]
