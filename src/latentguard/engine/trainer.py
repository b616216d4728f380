"""One training loop for every defense, so baselines are compared like for like.

A defense is a registered object (``latentguard.defenses``): the loop asks it whether to train at all,
what the adversary maximises, how the batch is perturbed and which extra terms join the loss. The loss is
taken on the perturbed forward plus optional weighted clean (SFT) and KL-to-reference terms.

The loop runs on Hugging Face Accelerate: alone it behaves as a plain PyTorch loop; under
``accelerate launch`` each process trains on its share of every batch (DDP averages the gradients), attacks
its own share with hooks on the unwrapped model, and only the main process logs and writes checkpoints.
Under FSDP2 the model is sharded in place (module names, hence sites, stay); every process then takes part
in gathering the full weights and optimizer state for a checkpoint, which the main process writes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.optimizer import AcceleratedOptimizer
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentguard.defenses.base import DefenseConfig
from latentguard.engine.attack import AttackResult, LatentAttack, phase
from latentguard.engine.distributed import (
    MixedPrecision,
    build_accelerator,
    check_sharding,
    everywhere,
    full_optimizer_state,
    is_sharded,
    load_optimizer_state,
    local_part,
    mean_over_processes,
    process_device,
    reshard,
    shard_like,
)
from latentguard.engine.io import DivergenceIO, ModelIO, require
from latentguard.engine.site import Intervention
from latentguard.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from latentguard.runs import load_tensors, save_tensors


class TrainConfig(BaseModel):
    """Optimisation settings shared by every defense."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = Field(None, gt=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0 = only at the end")
    checkpoint_every: int = Field(0, ge=0, description="0 = never mid-run")
    on_nonfinite: Literal["stop", "skip"] = "stop"
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="batches per optimizer step (a step's batch is batch_size × this)"
    )
    mixed_precision: MixedPrecision | None = Field(
        None, description="no, fp16 or bf16 autocast; unset: as accelerate launch says (default no)"
    )


@dataclass
class TrainResult:
    steps: int
    seconds: float
    unit_sizes: dict[str, float] = field(default_factory=dict)
    radii: dict[str, float] = field(default_factory=dict)
    skipped: int = 0


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether no tensor holds a NaN or an infinity.

    A float32 sum per tensor, read once with one synchronisation: NaN and inf survive a sum, so finite sums
    prove the tensors finite. This reads each gradient once where ``isfinite(g).all()`` also writes and
    reads a mask as large (SmolLM2-135M on one CPU thread: 0.06 s instead of 1.1 s per step). Only a sum
    that is not finite (or a finite sum that overflowed) falls back to the exact element-wise test.
    """
    if not tensors:
        return True
    sums = [t.sum(dtype=torch.float32) for t in tensors]
    device = sums[0].device
    if bool(torch.isfinite(torch.stack([s.to(device) for s in sums])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def cycle(loader: Iterable[Any], skip: int = 0) -> Iterator[Any]:
    """Endless batches, epoch after epoch; ``skip`` fast-forwards so a resumed run sees the same order."""
    seen = 0
    while True:
        empty = True
        for batch in loader:
            empty = False
            if seen < skip:
                seen += 1
                continue
            yield batch
        if empty:
            raise DataError(
                "the training data yielded no batches: is the data set smaller than one batch (batch_size)?"
            )


class Trainer:
    """Fine-tunes ``model`` under one defense; checkpoints atomically and resumes from them."""

    def __init__(
        self,
        model: nn.Module,
        io: ModelIO,
        defense: DefenseConfig,
        config: TrainConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        checkpoint: Path | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        progress: bool = True,
        description: str = "train",
        stamp: dict[str, Any] | None = None,
    ) -> None:
        require(io, ("to_device", "forward", "loss", "positions"), "Trainer")
        self.model = model
        self.io = io
        self.defense = defense
        self.config = config or TrainConfig()
        self.device = process_device(torch.device(device))
        self.accelerator = build_accelerator(
            self.device, self.config.mixed_precision, self.config.gradient_accumulation_steps
        )
        check_sharding(self.accelerator)
        self.wrapped = model  # what the training forward calls: the DDP/FSDP wrapper once fit has begun
        self.checkpoint = checkpoint
        self.log = log
        self.evaluate = evaluate
        self.progress = progress
        self.description = description
        self.kind = defense.defense  # the registered object: what it perturbs and trains on
        self.stamp = stamp or {}  # extra checkpoint metadata (the run's record of the config it came from)
        self.attack: LatentAttack | None = None
        if self.kind.perturbs:
            assert defense.threat is not None
            objective = self.kind.objective(defense, io)
            self.attack = LatentAttack(defense.sites or ["input"], defense.threat, defense.pgd, objective)
        self.kind.begin(defense, self.attack)
        self.replays = self.kind.replays(defense)  # updates per batch, in a row
        if self.replays > 1 and self.config.gradient_accumulation_steps > 1:
            raise ConfigError(
                f"defense {defense.kind!r} replays each batch {self.replays} times (one update each): it "
                "cannot be combined with gradient_accumulation_steps > 1"
            )
        if defense.kl_weight and not isinstance(io, DivergenceIO):
            raise ConfigError(f"kl_weight needs a task whose outputs can be compared ({type(io).__name__})")
        # The KL reference: the trainable weights as training starts (a fresh LoRA adapter is zero, so with
        # LoRA this is exactly the adapter-disabled model). Only trainable tensors are copied. They stay whole
        # (checkpoints hold them); under FSDP2 each process also keeps its shard of them.
        self.reference: dict[str, Tensor] = {}
        self._reference_shards: dict[str, Tensor] = {}
        if defense.kl_weight:
            self.reference = {
                name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
            }
        self.optimizer = build_optimizer(model, self.config)
        self.schedule = build_schedule(self.optimizer, self.config)
        self.step = 0
        self._optimizer_state: dict[str, Any] | None = None  # FSDP2: restored once prepare has sharded

    # -- checkpoints -----------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """Whether ``fit`` has sharded ``model`` in place (FSDP2): it then holds only this process's shard."""
        return isinstance(self.optimizer, AcceleratedOptimizer) and is_sharded(self.accelerator)

    def state_dict(self) -> dict[str, Tensor]:
        """The model's full weights. Every process must call it: under FSDP2 the shards are gathered and
        only the main process's result is complete."""
        if self.sharded:
            return dict(self.accelerator.get_state_dict(self.wrapped))
        return dict(self.model.state_dict())

    def save_model(self, path: Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the full weights to ``path`` from the main process (every process must call it)."""
        state = self.state_dict()
        if self.accelerator.is_main_process:
            save_tensors(path, state, metadata)

    def save_checkpoint(self) -> None:
        """Write model, optimizer, schedule, RNG and step (every process must call it: under FSDP2 the
        shards are gathered first); only the main process writes, and no process goes on before it has."""
        if self.checkpoint is None:
            return
        model_state = self.state_dict()
        optim_state = full_optimizer_state(self.accelerator, self.model, self.optimizer)
        if self.accelerator.is_main_process:
            self._write_checkpoint(model_state, optim_state)
        self.accelerator.wait_for_everyone()  # a trainer resuming next must find the whole file

    def _write_checkpoint(self, model_state: dict[str, Tensor], optim_state: dict[str, Any]) -> None:
        assert self.checkpoint is not None
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in model_state.items()}
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in optim_state["state"].items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{index}.{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        tensors.update({f"reference.{name}": value for name, value in self.reference.items()})
        tensors.update({f"defense.{name}": value for name, value in self.kind.state().items()})
        metadata = {
            "step": self.step,
            "defense": self.defense.model_dump(mode="json"),
            "param_groups": optim_state["param_groups"],
            "optim_scalars": scalars,
            "schedule": self.schedule.state_dict(),
            "unit_sizes": self.attack.unit_sizes if self.attack else {},
            **self.stamp,
        }
        save_tensors(self.checkpoint, tensors, _jsonable(metadata))

    def _same_defense(self, saved: Any) -> bool:
        """Whether a checkpoint's defense is this one; fields added since it was written take defaults."""
        try:
            return DefenseConfig.model_validate(saved) == self.defense
        except ValueError:
            return False

    def load_checkpoint(self) -> bool:
        """Restore model, optimizer, schedule, RNG and step from ``checkpoint`` if it exists."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        tensors, meta = load_tensors(self.checkpoint)
        if not self._same_defense(meta.get("defense")):
            raise CheckpointError(
                f"{self.checkpoint}: written for another defense config; remove it to restart"
            )
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.checkpoint}: does not fit the model ({exc})") from exc
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, extra in meta.get("optim_scalars", {}).items():
            state.setdefault(int(index), {}).update(extra)
        optim_state = {"state": state, "param_groups": meta["param_groups"]}
        if is_sharded(self.accelerator) and not self.sharded:
            self._optimizer_state = optim_state  # prepare swaps in sharded parameters: loaded after it
        else:
            load_optimizer_state(self.accelerator, self.model, self.optimizer, optim_state)
        self.schedule.load_state_dict(meta["schedule"])
        torch.set_rng_state(tensors["rng.torch"])
        for name in self.reference:
            self.reference[name] = tensors[f"reference.{name}"]
        self._reference_shards = {}  # FSDP2: cut again from the restored reference
        if self.attack is not None:
            self.attack.unit_sizes.update(meta.get("unit_sizes", {}))
        prefix = "defense."
        carried = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.kind.load_state(carried, self.device)
        self.step = int(meta["step"])
        return True

    # -- one step ----------------------------------------------------------------------------------------
    @contextmanager
    def _reference_weights(self) -> Iterator[None]:
        """Inside, the trainable weights hold their values from the start of training."""
        params = dict(self.model.named_parameters())
        if self.sharded:
            with self._reference_shards_in(params):
                yield
            return
        current = {name: params[name].data for name in self.reference}
        try:
            for name, value in self.reference.items():
                params[name].data = value.to(current[name].device)
            yield
        finally:
            for name, value in current.items():
                params[name].data = value

    @contextmanager
    def _reference_shards_in(self, params: dict[str, nn.Parameter]) -> Iterator[None]:
        """FSDP2: the forward gathers each unit's shards (and the root keeps its weights gathered), so the
        reference goes into the shards by copy, with every unit resharded before and after."""
        if not self._reference_shards:
            self._reference_shards = {name: shard_like(v, params[name]) for name, v in self.reference.items()}
        with torch.no_grad():
            current = {name: local_part(params[name]).clone() for name in self._reference_shards}
            reshard(self.model)
            for name, value in self._reference_shards.items():
                local_part(params[name]).copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                reshard(self.model)
                for name, value in current.items():
                    local_part(params[name]).copy_(value)

    def _reference_output(self, batch: Any) -> Any:
        """The model's output on ``batch`` with the weights it started training from (no graph)."""
        with torch.no_grad(), self._reference_weights():
            return self.io.forward(self.model, batch)

    def _perturbation(self, batch: Any) -> AttackResult:
        assert self.attack is not None
        return self.kind.perturb(self.attack, self.model, self.io, batch)

    def _attack_everywhere(self, batch: Any) -> AttackResult | None:
        """This process's perturbation of ``batch``; ``None`` (batch skipped) when the attack was non-finite
        in any process, since the processes must skip together."""
        failure: NonFiniteError | None = None
        result: AttackResult | None = None
        try:
            result = self._perturbation(batch)
        except NonFiniteError as exc:
            if self.config.on_nonfinite == "stop":
                raise
            failure = exc
        if not everywhere(self.accelerator, failure is None):
            return self._nonfinite(f"attack ({failure or 'in another process'})")
        return result

    def train_step(self, batch: Any) -> dict[str, float] | None:
        """One batch: forward, backward and, when gradients are due (every ``gradient_accumulation_steps``
        batches, inside ``accelerator.accumulate``), the optimizer step; returns the batch's metrics, or
        ``None`` when a non-finite batch was skipped (in every process: they decide together)."""
        self.model.train()
        terms: dict[str, Tensor] = {}
        weights = {
            "clean": 1.0 if self.kind.clean_loss else self.defense.clean_weight,
            "adversarial": 1.0,
            "kl": self.defense.kl_weight,
        }
        stats: dict[str, float] = {}
        # FSDP2 drops the gradient of a forward whose graph is still pending when another backward (the
        # attack's) runs, and gathers weights only for a unit that is not gathered yet, so there the attack
        # and the KL reference go before the clean forward; elsewhere the order stays (it fixes RNG order).
        first = self.sharded
        attack: AttackResult | None = None
        hooks: Intervention | None = None
        if self.attack is not None and first and (attack := self._attack_everywhere(batch)) is None:
            return None
        kl = self.defense.kl_weight > 0
        reference = self._reference_output(batch) if kl and first else None
        sft = self.kind.clean_loss or self.defense.clean_weight > 0
        if sft or kl:
            with phase("train/clean_forward"):
                clean_output = self.io.forward(self.wrapped, batch)
                if sft:
                    terms["clean"] = self.io.loss(clean_output, batch).mean()
                if kl:
                    assert isinstance(self.io, DivergenceIO)
                    if reference is None:
                        reference = self._reference_output(batch)
                    terms["kl"] = self.io.divergence(clean_output, reference, batch).mean()
        if self.attack is not None:
            if not first and (attack := self._attack_everywhere(batch)) is None:
                return None
            assert attack is not None
            with phase("train/forward"):
                with self.kind.intervention(self.model, self.attack, attack) as hooks:
                    output = self.io.forward(self.wrapped, batch)
                    for name, (weight, term) in self.kind.extra_terms(self, batch).items():
                        weights[name], terms[name] = weight, term
                hooks.check_fired()
                terms["adversarial"] = self.io.loss(output, batch).mean()
            if attack.losses:
                stats["attack_gain"] = attack.gain
        loss = sum(weights[name] * value for name, value in terms.items())
        assert isinstance(loss, Tensor)
        if not everywhere(self.accelerator, bool(torch.isfinite(loss))):
            return self._nonfinite("loss")
        with phase("train/backward"):
            self.accelerator.backward(loss)
        with phase("train/grad_check"):
            grads = [local_part(p.grad) for p in self.model.parameters() if p.grad is not None]
            finite = all_finite(grads)
        if not everywhere(self.accelerator, finite):
            return self._nonfinite("gradient")
        if hooks is not None:
            failure: NonFiniteError | None = None
            try:
                self.kind.after_backward(hooks)  # a perturbation that trains along takes its step
            except NonFiniteError as exc:
                if self.config.on_nonfinite == "stop":
                    raise
                failure = exc
            if not everywhere(self.accelerator, failure is None):
                return self._nonfinite(f"perturbation step ({failure or 'in another process'})")
        if self.config.grad_clip and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.wrapped.parameters(), self.config.grad_clip)
        with phase("train/optimizer"):
            self.optimizer.step()  # prepared by fit: steps (and zeroes) only when the accumulated step is due
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        stats.update({f"loss/{name}": float(value.detach()) for name, value in terms.items()})
        stats["loss"] = float(loss.detach())
        stats["lr"] = float(self.schedule.get_last_lr()[0])
        return stats

    def _nonfinite(self, what: str) -> None:
        where = ", ".join(self.attack.sites) if self.attack else "model"
        message = f"non-finite {what} at step {self.step} (defense {self.defense.kind}, site {where})"
        if self.config.on_nonfinite == "stop":
            raise NonFiniteError(message + "; set training.on_nonfinite=skip to skip such batches")
        self.model.zero_grad(set_to_none=True)  # also drops what this step accumulated so far
        return None

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self, loader: Iterable[Any], *, resume: bool = True) -> TrainResult:
        """Train for ``config.steps`` optimizer steps (continuing a checkpoint when ``resume``).

        A ``DataLoader`` is split across processes (``batch_size`` is the global batch); logged metrics and
        ``evaluate``'s results are averaged over the processes.
        """
        start = time.perf_counter()
        result = TrainResult(steps=0, seconds=0.0)
        self.model.to(self.device)
        if not self.kind.trains:
            return result
        if resume:
            self.load_checkpoint()
        if not isinstance(self.optimizer, AcceleratedOptimizer):  # once per trainer
            self.wrapped, self.optimizer, self.schedule = self.accelerator.prepare(
                self.model, self.optimizer, self.schedule
            )
        if self._optimizer_state is not None:
            load_optimizer_state(self.accelerator, self.model, self.optimizer, self._optimizer_state)
            self._optimizer_state = None
        self.optimizer.zero_grad(set_to_none=True)
        accumulation = self.config.gradient_accumulation_steps
        # with replays each batch trains ``replays`` updates in a row; a resumed run re-enters mid-batch
        batches = cycle(self.accelerator.prepare(loader), skip=self.step // self.replays * accumulation)
        left = 0  # replays still due for the batch in hand
        batch: Any = None
        bar = tqdm(
            total=self.config.steps,
            initial=self.step,
            desc=self.description,
            disable=not (self.progress and self.accelerator.is_main_process),
            leave=False,
            dynamic_ncols=True,
        )
        done: list[dict[str, float]] = []  # metrics of the batches of the current optimizer step
        try:
            while self.step < self.config.steps:
                if left == 0:
                    batch = self.io.to_device(next(batches), self.device)
                    left = self.replays - self.step % self.replays
                left -= 1
                if self.attack is not None and self.step == 0 and not self.attack.unit_sizes:
                    sizes = self.attack.calibrate(self.model, self.io, batch)
                    self.attack.unit_sizes.update(mean_over_processes(self.accelerator, sizes))
                with self.accelerator.accumulate(self.wrapped):
                    stats = self.train_step(batch)
                if stats is None:
                    result.skipped += 1
                else:
                    done.append(stats)
                if not self.accelerator.sync_gradients:
                    continue
                self.step += 1
                bar.update(1)
                if not done:
                    continue
                stats, done = {key: sum(s[key] for s in done) / len(done) for key in done[0]}, []
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    stats = mean_over_processes(self.accelerator, stats)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}")
                    self._emit({"step": self.step, **stats})
                if self.evaluate and self.config.eval_every and self.step % self.config.eval_every == 0:
                    metrics = mean_over_processes(self.accelerator, self.evaluate(self.model))
                    self._emit({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        self.save_checkpoint()
        result.steps = self.step
        result.seconds = time.perf_counter() - start
        if self.attack is not None:
            result.unit_sizes = dict(self.attack.unit_sizes)
            result.radii = self.attack.radii()
        return result

    def _emit(self, record: dict[str, Any]) -> None:
        if self.log is not None and self.accelerator.is_main_process:
            self.log(record)


def _jsonable(value: Any) -> Any:
    """JSON-safe copy of optimizer metadata (tensors become numbers or lists)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    json.dumps(value)
    return value
