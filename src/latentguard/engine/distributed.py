"""One process or many, through Hugging Face Accelerate: the engine never talks to torch.distributed itself.

Under ``accelerate launch --num_processes N`` (DDP, FSDP, DeepSpeed) every process runs the same code on its
own share of each batch; alone, the same code runs unchanged. Mixed precision and the CPU/GPU choice are
process-wide in Accelerate, so the first call here fixes them for the process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, broadcast_object_list

from latentguard.errors import ConfigError

MixedPrecision = Literal["no", "fp16", "bf16"]
T = TypeVar("T")


def process_device(requested: torch.device) -> torch.device:
    """Where this process computes: the requested device alone, the launcher's (a GPU per rank) when many."""
    state = PartialState(cpu=requested.type == "cpu")
    return requested if state.num_processes == 1 else state.device


def num_processes() -> int:
    return PartialState().num_processes


def is_main_process() -> bool:
    return PartialState().is_main_process


def wait_for_everyone() -> None:
    """A barrier; returns at once when there is one process."""
    PartialState().wait_for_everyone()


def from_main(value: T) -> T:
    """The main process's ``value`` in every process (e.g. a run folder named after the main's clock)."""
    if num_processes() == 1:
        return value
    return broadcast_object_list([value])[0]


def build_accelerator(
    device: torch.device, mixed_precision: MixedPrecision | None, accumulation: int
) -> Accelerator:
    """The trainer's accelerator (``mixed_precision=None``: what ``accelerate launch`` set, else no).

    Batches are split across processes (``split_batches``: ``batch_size`` is the global batch, so N processes
    take the same optimizer steps as one), epochs never force an early optimizer step during gradient
    accumulation, and batches are moved by the task's ``ModelIO``, not by Accelerate.
    """
    try:
        return Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=mixed_precision,
            device_placement=False,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=accumulation, sync_with_dataloader=False
            ),
        )
    except ValueError as exc:  # Accelerate fixes mixed precision and the device once per process
        raise ConfigError(f"training.mixed_precision: {exc}") from None


def mean_over_processes(accelerator: Accelerator, values: Mapping[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (every process must call this with the same keys)."""
    if accelerator.num_processes == 1:
        return dict(values)
    keys = sorted(values)
    local = torch.tensor([values[key] for key in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(local, reduction="mean").tolist(), strict=True))


def everywhere(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds in every process: decisions that change the collective calls must agree."""
    if accelerator.num_processes == 1:
        return flag
    local = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(local, reduction="sum").item() == accelerator.num_processes)
