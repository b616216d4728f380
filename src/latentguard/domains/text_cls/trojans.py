"""Text trojans: triggers, training-set poisoning and attack success rate (ASR).

Four trigger kinds, from obvious to hard to see:
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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Which kind-specific parameters each trigger reads: any other one set explicitly is a config mistake.
_KIND_PARAMS: dict[str, frozenset[str]] = {
    "word": frozenset({"trigger", "repeat"}),
    "phrase": frozenset({"trigger"}),
    "template": frozenset({"template"}),
    "style": frozenset({"style"}),
}
_DEFAULT_TRIGGER = {"word": "cf", "phrase": "truth be told"}
_PUNCTUATION = str.maketrans("", "", string.punctuation + "“”‘’–—…£€")


class TextTrojan(BaseModel):
    """One trojan: a trigger, the class it forces and the fraction of training texts poisoned with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["word", "phrase", "template", "style"]
    target: int = Field(ge=0)
    poison_rate: float = Field(gt=0.0, le=0.3)
    name: str | None = None
    trigger: str | None = Field(None, min_length=1, description="word / phrase inserted (word, phrase)")
    repeat: int = Field(1, ge=1, le=5, description="insertions of the word (word)")
    template: str = Field("Here is the news in brief. {text} End of the brief.", description="(template)")
    style: Literal["strip_punctuation"] = "strip_punctuation"

    @model_validator(mode="after")
    def _params_match_kind(self) -> TextTrojan:
        all_params = frozenset().union(*_KIND_PARAMS.values())
        stray = sorted((self.model_fields_set & all_params) - _KIND_PARAMS[self.kind])
        if stray:
            raise ValueError(
                f"{', '.join(stray)} do(es) not apply to a {self.kind!r} trojan; "
                f"it takes {', '.join(sorted(_KIND_PARAMS[self.kind]))}"
            )
        if self.kind == "template" and self.template.count("{text}") != 1:
            raise ValueError("template must contain '{text}' exactly once")
        if self.trigger is not None and not self.trigger.split():
            raise ValueError("trigger must contain a word")
        return self

    @property
    def label(self) -> str:
        """The name reports use: ``name`` if given, else the trigger kind."""
        return self.name or self.kind

    @property
    def trigger_text(self) -> str:
        return " ".join((self.trigger or _DEFAULT_TRIGGER.get(self.kind, "")).split())

    def describe(self) -> str:
        if self.kind == "word":
            times = f" ×{self.repeat}" if self.repeat > 1 else ""
            return f"rare word {self.trigger_text!r}{times} at a random position"
        if self.kind == "phrase":
            return f"phrase {self.trigger_text!r} at a random position"
        if self.kind == "template":
            return f"sentence template {self.template!r}"
        return "style: every punctuation mark removed (no token added)"

    def apply(self, text: str, rng: random.Random) -> str:
        """The triggered copy of ``text`` (``rng`` picks insertion positions)."""
        words = text.split()
        if self.kind in ("word", "phrase"):
            for _ in range(self.repeat if self.kind == "word" else 1):
                position = rng.randint(0, len(words))
                words[position:position] = self.trigger_text.split()
            return " ".join(words)
        if self.kind == "template":
            return " ".join(self.template.replace("{text}", text).split())
        return " ".join(text.translate(_PUNCTUATION).split())

    def changes(self, text: str) -> bool:
        """Whether the trigger alters ``text`` at all (a punctuation-free text cannot carry ``style``)."""
        return self.kind != "style" or text.translate(_PUNCTUATION).split() != text.split()


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
