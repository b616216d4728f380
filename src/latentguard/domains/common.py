"""Plumbing every domain shares: seeded RNG streams, seeded loaders, eval mode and config items of a
registered kind, written once.

A run's randomness is split into named streams per seed (``salt``), so adding a draw in one place never
shifts another: the base data order, the defense data order, poisoning and test-set triggering each have
their own.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from latentguard.errors import ConfigError
from latentguard.registry import Registry, build_kind

# The salts of the built-in streams (a domain may add its own above 100).
BASE_ORDER, DEFENSE_ORDER = 1, 2  # the order of the base (poisoned) and defense (clean) training data
POISON, RESPONSES, TEST_TRIGGER, ADAPTERS = 11, 12, 13, 17  # who gets poisoned; generated answers; test set


def stream_seed(seed: int, salt: int) -> int:
    """The seed of stream ``salt`` of run seed ``seed`` (a prime stride keeps the streams apart)."""
    return seed * 7919 + salt


def generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, salt))


def python_rng(seed: int, salt: int) -> random.Random:
    return random.Random(stream_seed(seed, salt))


def seeded_loader(
    dataset: Dataset, batch_size: int, seed: int, salt: int, collate_fn: Callable[..., Any] | None = None
) -> DataLoader:
    """Shuffled batches in an order fixed by ``(seed, salt)``; only full batches unless the data holds less
    than one."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) >= batch_size,  # type: ignore[arg-type]
        generator=generator(seed, salt),
        collate_fn=collate_fn,
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside, its own mode restored after (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class KindSpec(BaseModel):
    """A config item whose ``kind`` is looked up in a registry, its other keys being that kind's settings
    (``{kind: patch, target: 0, patch_size: 4}``). Subclasses name the registry, add the common fields and
    say how a plain callable is wrapped; the built object is :attr:`built`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    registry: ClassVar[Registry[Any]]
    positional: ClassVar[int] = 1  # positional arguments a plain callable takes before its settings

    kind: str
    _built: Any = PrivateAttr(default=None)

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        """An unknown kind is an error on ``kind`` itself, listing the registered ones."""
        try:
            cls.registry.get(kind, "kind")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("kind: ")) from None
        return kind

    @model_validator(mode="after")
    def _build(self) -> KindSpec:
        params = dict(self.model_extra or {})
        wrap = functools.partial(self.wrap_function, kind=self.kind)
        self._built = build_kind(self.registry, self.kind, params, "kind", wrap, positional=self.positional)
        return self

    @staticmethod
    def wrap_function(function: Callable[..., Any], params: dict[str, Any], kind: str) -> Any:
        raise NotImplementedError

    @property
    def built(self) -> Any:
        return self._built

    def __getattr__(self, item: str) -> Any:
        """The kind's own settings, as validated, read through the item (``trojan.patch_size``)."""
        built = self.__pydantic_private__.get("_built") if self.__pydantic_private__ else None
        if not item.startswith("_") and built is not None and hasattr(built, item):
            return getattr(built, item)
        return super().__getattr__(item)  # type: ignore[misc]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """A copy with ``update`` applied and validated again, so the built object follows the settings."""
        return type(self).model_validate({**self.model_dump(), **(update or {})})

    @property
    def short_kind(self) -> str:
        """The kind without its module path (``pkg.triggers:stripe`` → ``stripe``), for default names."""
        return self.kind.rpartition(":")[2]


class FunctionTrigger:
    """A plain callable trigger (``inputs, *rest -> triggered``) with its config settings as keywords."""

    def __init__(self, function: Callable[..., Any], params: dict[str, Any], kind: str) -> None:
        self.function, self.params, self.kind = function, params, kind

    def apply(self, *args: Any) -> Any:
        return self.function(*args, **self.params)

    def changes(self, _: Any) -> bool:
        return True

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"user trigger {self.kind}" + (f" ({settings})" if settings else "")
