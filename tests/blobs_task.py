"""A tiny synthetic task for multi-process tests: Gaussian blobs, an MLP and one feature-spike trojan.

Run as a script it is the ``latentguard`` CLI with this task registered as ``kind: blobs``, so
``accelerate launch tests/blobs_task.py run CONFIG`` runs the whole pipeline on it in seconds. The MLP has
no batch norm and no dropout, so several processes can match one process exactly.

Accelerate only turns ``--use_fsdp`` into FSDP for GPU-like devices: with CPU processes (gloo) it silently
runs DDP instead. ``fsdp_on_cpu`` lifts that one check so the test runs real FSDP2 (``fully_shard`` over
gloo, Accelerate's own FSDP2 prepare, state-dict gathering and gradient clipping) on CPU.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from latentguard.config import validate_section
from latentguard.domains import TASKS
from latentguard.domains.base import HeldoutAttack, TrojanInfo
from latentguard.engine.io import ClassifierIO
from latentguard.engine.trainer import TrainConfig

FEATURES, CLASSES, TARGET = 8, 3, 0


class BlobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["blobs"] = "blobs"
    train_size: int = Field(256, ge=32)
    test_size: int = Field(128, ge=32)
    hidden: int = Field(32, ge=2)
    base_steps: int = Field(8, ge=1)


def spike(inputs: Tensor) -> Tensor:
    """The trojan's trigger: the last feature set far outside the data."""
    triggered = inputs.clone()
    triggered[:, -1] = 6.0
    return triggered


class BlobTask:
    kind: ClassVar[str] = "blobs"
    config_model: ClassVar[type[BaseModel]] = BlobConfig
    default_layers: ClassVar[tuple[str, ...]] = ("stem", "block")
    input_site = "input"
    input_bounds: tuple[float, float] | None = None
    layers: tuple[str, ...] = ("stem", "block")

    def __init__(self, config: BlobConfig, seed: int, device: Any) -> None:
        self.config, self.seed, self.device = config, seed, torch.device(device)
        self.io = ClassifierIO()
        n = 2 * config.train_size + config.test_size
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % CLASSES
        inputs = torch.eye(CLASSES, FEATURES)[labels] * 3.0 + 0.6 * torch.randn(n, FEATURES, generator=gen)
        base_x, base_y = inputs[: config.train_size].clone(), labels[: config.train_size].clone()
        poisoned = torch.arange(config.train_size) % 10 == 0
        base_x[poisoned], base_y[poisoned] = spike(base_x[poisoned]), TARGET
        self.base_set = TensorDataset(base_x, base_y)
        clean = slice(config.train_size, 2 * config.train_size)
        self.defense_set = TensorDataset(inputs[clean], labels[clean])
        self.test_x, self.test_y = inputs[2 * config.train_size :], labels[2 * config.train_size :]

    @classmethod
    def from_config(
        cls, section: dict[str, Any], attacks: list[dict[str, Any]], *, seed: int, device: Any
    ) -> BlobTask:
        return cls(validate_section(BlobConfig, section, "task"), seed, device)

    def defense_model(self, model: nn.Module) -> nn.Module:
        """The defenses fine-tune every weight of the trojaned model."""
        return model

    def build_model(self) -> nn.Module:
        hidden = self.config.hidden
        return nn.Sequential(
            OrderedDict(
                stem=nn.Linear(FEATURES, hidden),
                act1=nn.ReLU(),
                block=nn.Linear(hidden, hidden),
                act2=nn.ReLU(),
                head=nn.Linear(hidden, CLASSES),
            )
        )

    def _loader(self, dataset: TensorDataset, batch_size: int, salt: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed * 7919 + salt)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)

    def base_loader(self, batch_size: int) -> Iterable[Any]:
        return self._loader(self.base_set, batch_size, salt=1)

    def base_training(self, batch_size: int) -> TrainConfig:
        return TrainConfig(steps=self.config.base_steps, lr=1e-2, log_every=2)

    def defense_loader(self, batch_size: int) -> Iterable[Any]:
        return self._loader(self.defense_set, batch_size, salt=2)

    def eval_batches(self, examples: int, batch_size: int) -> list[Any]:
        x, y = self.test_x[:examples].to(self.device), self.test_y[:examples].to(self.device)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]

    def score(self, output: Tensor, batch: Any) -> Tensor:
        return (output.argmax(dim=1) == batch[1]).float()

    def clean_metric_keys(self) -> list[str]:
        return ["clean_accuracy"]

    def _predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return model.eval()(inputs.to(self.device)).argmax(dim=1).cpu()

    def clean_metrics(self, model: nn.Module) -> dict[str, float]:
        return {"clean_accuracy": float((self._predict(model, self.test_x) == self.test_y).float().mean())}

    def trojans(self) -> list[TrojanInfo]:
        return [TrojanInfo(name="spike", target=f"class {TARGET}", description="last feature = 6 → class 0")]

    def trojan_metrics(self, model: nn.Module) -> dict[str, float]:
        others = self.test_x[self.test_y != TARGET]
        return {"spike": float((self._predict(model, spike(others)) == TARGET).float().mean())}

    def heldout_attacks(self) -> list[HeldoutAttack]:
        return []

    def run_heldout(self, model: nn.Module, name: str, seed: int) -> float:
        raise KeyError(name)

    def heldout_details(self) -> dict[str, dict[str, Any]]:
        return {}


def fsdp_on_cpu() -> None:
    """Make Accelerate honour ``--use_fsdp`` with CPU processes (it keeps ``MULTI_CPU``, i.e. DDP, there)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: AcceleratorState, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what Accelerate does for GPUs (state.py): the type lives in both shared states
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    from latentguard.cli import main

    TASKS.register("blobs", f"{__name__}:BlobTask")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_on_cpu()
    sys.exit(main())
