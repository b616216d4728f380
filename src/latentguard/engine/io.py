"""How the engine runs a model on a batch and scores it.

The engine never looks inside a batch: each domain supplies a ``ModelIO`` that knows how to move a batch to a
device, call the model on it, take its loss and its score per example, read and replace its labels and (for
sequence models) which positions an adversary may perturb. Batches may be tuples, dicts or anything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentguard.errors import UserError


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

    def labels(self, batch: Any) -> Tensor:
        """The batch's labels (what ``with_labels`` replaces): a class per example, or token labels."""
        ...

    def score(self, output: Any, batch: Any) -> Tensor:
        """Per-example success, shape ``(batch,)`` (1.0 = correct): what accuracy and robustness average."""
        ...


MODEL_IO_METHODS = ("to_device", "forward", "loss", "positions", "with_labels", "labels", "score")


def require(io: Any, methods: Iterable[str], purpose: str) -> None:
    """A one-line ``UserError`` naming the methods ``io`` lacks for ``purpose`` (instead of an AttributeError
    deep inside the loop)."""
    missing = [name for name in methods if not callable(getattr(io, name, None))]
    if missing:
        raise UserError(
            f"io: {type(io).__name__} lacks {', '.join(f'{m}()' for m in missing)}, which {purpose} needs; "
            f"a ModelIO has {', '.join(MODEL_IO_METHODS)} (see README, 'Python API')"
        )


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

    def labels(self, batch: Any) -> Tensor:
        return batch[1]

    def score(self, output: Tensor, batch: Any) -> Tensor:
        return (output.argmax(dim=1) == batch[1]).float()

    def divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        return class_divergence(output, reference)


def class_divergence(output: Tensor, reference: Tensor) -> Tensor:
    """Per-example ``KL(reference || output)`` between the class distributions of two logit tensors."""
    log_p, log_q = F.log_softmax(output.float(), dim=-1), F.log_softmax(reference.float(), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
