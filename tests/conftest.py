"""Small shared fixtures: a seeded MLP classifier and a synthetic, linearly separable data set."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

# The models here are tiny: one thread avoids oversubscribing a shared 2-core machine (and is faster).
torch.set_num_threads(1)

FEATURES = 8
CLASSES = 3


def make_mlp(seed: int = 0, hidden: int = 32) -> nn.Sequential:
    """``0`` Linear → ``1`` ReLU → ``2`` Linear → ``3`` ReLU → ``4`` Linear (logits)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(FEATURES, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, CLASSES),
    )


def make_blobs(n: int = 240, seed: int = 0, spread: float = 0.6) -> tuple[Tensor, Tensor]:
    """Three Gaussian blobs around fixed, well separated centres (balanced classes)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(CLASSES, FEATURES) * 3.0
    labels = torch.arange(n) % CLASSES
    inputs = centres[labels] + spread * torch.randn(n, FEATURES, generator=gen)
    return inputs, labels


@pytest.fixture
def mlp() -> nn.Sequential:
    return make_mlp()


@pytest.fixture
def blobs() -> tuple[Tensor, Tensor]:
    return make_blobs()


GROUP_OF_PREFIX = {"asr": "trojan", "robust": "heldout", "latent": "latent"}


def nest_metrics(flat: dict) -> dict:
    """``{"asr/patch": v, "clean_accuracy": w}`` (the old flat keys) as the results schema's groups."""
    nested: dict = {}
    for key, value in flat.items():
        prefix, _, name = key.rpartition("/")
        nested.setdefault(GROUP_OF_PREFIX.get(prefix, "clean"), {})[name or key] = value
    return nested


def metric_key(flat_key: str) -> tuple[str, str]:
    prefix, _, name = flat_key.rpartition("/")
    return (GROUP_OF_PREFIX.get(prefix, "clean"), name or flat_key)


def flat_metrics(nested: dict) -> dict:
    """The results schema's ``{group: {name: value}}`` as old-style flat keys (``asr/patch``)."""
    prefix = {group: p for p, group in GROUP_OF_PREFIX.items()}
    return {
        (f"{prefix[group]}/{name}" if group in prefix else name): value
        for group, values in nested.items()
        for name, value in values.items()
    }
