"""One process or many, through Hugging Face Accelerate: the engine never talks to torch.distributed itself.

Under ``accelerate launch --num_processes N`` (DDP, FSDP, DeepSpeed) every process runs the same code on its
own share of each batch; alone, the same code runs unchanged. Mixed precision and the CPU/GPU choice are
process-wide in Accelerate, so the first call here fixes them for the process.

FSDP2 (``--use_fsdp --fsdp_version 2``) shards the model in place and keeps its module names, so hooks by
module name still work; each process then holds only its shard of the weights and of the optimizer state,
so saving gathers them (``full_optimizer_state``, ``Accelerator.get_state_dict``) and resuming scatters
them (``load_optimizer_state``). FSDP1 renames modules and is refused (``check_sharding``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    broadcast_object_list,
)
from torch import Tensor, nn

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


def check_sharding(accelerator: Accelerator) -> None:
    """Refuse FSDP1: its wrapper renames modules (``_fsdp_wrapped_module``), so sites would not resolve."""
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "FSDP1 is not supported (it renames modules, so latent sites are lost): launch with "
            "accelerate launch --use_fsdp --fsdp_version 2"
        )


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether ``prepare`` shards the model and optimizer state across processes (FSDP2)."""
    return bool(accelerator.is_fsdp2)


def local_part(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded (DTensor) tensor, the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """This process's part of ``full`` as ``param`` is split (a DTensor under FSDP2; every process must
    call it); ``full`` itself for a plain tensor."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(local_part(param).device), mesh, param.placements).to_local()


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 unit's gathered weights, so the next forward gathers the shards afresh."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order (the order of its state's integer keys)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """``optimizer.state_dict()``, whole: under FSDP2 every process must call this and only the main
    process's result is complete (the shards are gathered to its CPU); keyed by position as torch keys it."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside AcceleratedOptimizer
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_optimizer_state_dict(model, inner, options=options)
    if not full:  # not the main process: it gets nothing
        return {"state": {}, "param_groups": []}
    index = {name: i for i, name in enumerate(_optimizer_names(model, inner))}
    groups = [
        {**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]
    ]
    return {"state": {index[name]: value for name, value in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a whole ``optimizer.state_dict()`` (as ``full_optimizer_state`` returns it) into ``optimizer``;
    under FSDP2 (after ``prepare``, in every process) each process keeps its shard of it."""
    if not is_sharded(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    names = _optimizer_names(model, inner)
    full = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]} for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, inner, full, options=StateDictOptions(full_state_dict=True))
