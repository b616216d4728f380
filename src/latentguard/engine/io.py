"""How the engine runs a model on a batch and scores it.

The engine never looks inside a batch: each domain supplies a ``ModelIO`` that knows how to move a batch to a
device, call the model on it, score the output per example and (for sequence models) which positions an
adversary may perturb.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@runtime_checkable
class ModelIO(Protocol):
    """The engine's only view of a domain's batches."""

    def to_device(self, batch: Any, device: torch.device) -> Any: ...

    def forward(self, model: nn.Module, batch: Any) -> Any: ...

    def loss(self, output: Any, batch: Any) -> Tensor:
        """Per-example training loss, shape ``(batch,)``."""
        ...

    def positions(self, batch: Any) -> Tensor | None:
        """``(batch, positions)`` bool mask of perturbable positions; ``None``: every element may move."""
        ...

    def with_labels(self, batch: Any, labels: Tensor) -> Any:
        """The same inputs with other labels: targeted attacks aim the model at them."""
        ...


@runtime_checkable
class PairedIO(ModelIO, Protocol):
    """A ``ModelIO`` whose batches also carry an undesired output: what targeted LAT pulls toward."""

    def undesired(self, batch: Any) -> Any:
        """The same inputs paired with the undesired output, shaped like ``batch`` (one perturbation fits)."""
        ...


@runtime_checkable
class DivergenceIO(ModelIO, Protocol):
    """A ``ModelIO`` that can compare two outputs: for a KL term toward a reference model."""

    def divergence(self, output: Any, reference: Any, batch: Any) -> Tensor:
        """Per-example ``KL(reference || output)`` over the positions the loss scores, shape ``(batch,)``."""
        ...


class ClassifierIO:
    """``(inputs, labels)`` batches scored with cross-entropy: any plain PyTorch classifier."""

    def to_device(self, batch: Any, device: torch.device) -> Any:
        inputs, labels = batch
        return inputs.to(device), labels.to(device)

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        return model(batch[0])

    def loss(self, output: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(output, batch[1], reduction="none")

    def positions(self, batch: Any) -> Tensor | None:
        return None

    def with_labels(self, batch: Any, labels: Tensor) -> Any:
        return batch[0], labels

    def divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        return class_divergence(output, reference)


def class_divergence(output: Tensor, reference: Tensor) -> Tensor:
    """Per-example ``KL(reference || output)`` between the class distributions of two logit tensors."""
    log_p, log_q = F.log_softmax(output.float(), dim=-1), F.log_softmax(reference.float(), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
