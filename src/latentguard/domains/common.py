"""Plumbing every domain shares: seeded RNG streams, seeded loaders and eval mode, written once.

A run's randomness is split into named streams per seed (``salt``), so adding a draw in one place never
shifts another: the base data order, the defense data order, poisoning and test-set triggering each have
their own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

# The salts of the built-in streams (a domain may add its own above 100).
BASE_ORDER, DEFENSE_ORDER, POISON, TEST_TRIGGER, PROMPTS, TARGETS, GENERATION = 1, 2, 11, 13, 12, 13, 17


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
    """Shuffled full batches in an order fixed by ``(seed, salt)``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
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
