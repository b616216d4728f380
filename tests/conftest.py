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


def small_cnn(channels: int = 1, side: int = 28) -> nn.Sequential:
    """Two conv layers and a linear head for N×C×side×side images (10 classes): trains in seconds."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (side // 4) ** 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


# A Fashion-MNIST --quick run shrunk to seconds, for tests that run, kill and resume the whole pipeline.
TINY_RUN = [
    "--quick",
    "--no-progress",
    "--set", "task.base_train_size=1500",
    "--set", "task.defense_train_size=300",
    "--set", "task.test_size=200",
    "--set", "training.steps=8",
    "--set", "training.checkpoint_every=2",
    "--set", "evaluation.attacks=[{name: pgd, kind: pgd, norm: linf, epsilon: 0.05, steps: 5, examples: 40}]",
    "--set", "evaluation.latent_layers=[block1]",
    "--set", "evaluation.latent_examples=40",
    "--set", "evaluation.sanity_examples=16",
]  # fmt: skip
