"""One PGD engine for every site: input pixels, token embeddings or any hidden layer.

``pgd`` is the algorithm on plain tensors; ``LatentAttack`` binds it to a model, a ``ModelIO`` and named
sites through forward hooks. The model's weights take no gradient inside the attack and its train/eval
modes are restored afterwards. The inner loop only needs ``run(deltas) -> output``: today that is a full
forward with hooks; a split model can supply the suffix alone without touching ``pgd``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from latentguard.engine.io import ModelIO, require
from latentguard.engine.site import INPUT, Intervention, frozen
from latentguard.engine.split import PrefixCache
from latentguard.engine.threat import (
    Threat,
    ascent_direction,
    mean_unit_size,
    per_site,
    project,
    radius,
    random_in_ball,
    random_on_sphere,
)
from latentguard.errors import NonFiniteError

Deltas = dict[str, Tensor]
Run = Callable[[Any], Any]


class PGDConfig(BaseModel):
    """How the adversary searches its ball."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(8, ge=1, le=10_000)
    step_ratio: float = Field(2.5, gt=0, description="step size = step_ratio × radius / steps")
    random_start: bool = True
    optimizer: Literal["pgd", "adam"] = "pgd"
    model_mode: Literal["eval", "train"] = Field("eval", description="model mode during the attack")
    reuse_prefix: bool = Field(True, description="compute the layers before the site once, not every step")


class Objective(Protocol):
    """What the adversary maximises, given a way to run the (perturbed) model on a batch."""

    def __call__(self, run: Run, io: ModelIO, batch: Any) -> Tensor: ...


def untargeted(run: Run, io: ModelIO, batch: Any) -> Tensor:
    """Raise the task loss on the true labels."""
    return io.loss(run(batch), batch).mean()


untargeted.same_inputs = True  # type: ignore[attr-defined]


def reruns_same_inputs(objective: Objective) -> bool:
    """Whether an objective only runs the model on the attacked batch's inputs (so a prefix cache is valid).

    Objectives that run other inputs (e.g. other completions) must not set ``same_inputs``.
    """
    return bool(getattr(objective, "same_inputs", False))


@dataclass(frozen=True)
class Targeted:
    """Pull the model toward ``target`` labels, optionally pushing it away from the true ones.

    ``target`` is a class index or a function from the batch to target labels. ``io.with_labels`` keeps the
    inputs, so one forward serves both terms.
    """

    target: int | Callable[[Any], Tensor]
    away_weight: float = 0.0
    same_inputs: bool = True

    def __call__(self, run: Run, io: ModelIO, batch: Any) -> Tensor:
        require(io, ("with_labels", *(() if callable(self.target) else ("labels",))), "Targeted")
        output = run(batch)
        true_loss = io.loss(output, batch)
        labels = (
            self.target(batch) if callable(self.target) else torch.full_like(io.labels(batch), self.target)
        )
        toward = io.loss(output, io.with_labels(batch, labels))
        return (-toward + self.away_weight * true_loss).mean()


def unlikelihood(nll: Tensor) -> Tensor:
    """``-log(1 - p)`` for ``p = exp(-nll)``: a bounded loss that falls as the model moves off an output.

    Minimising ``-nll`` would be unbounded; this pushes ``p`` toward 0 and stops mattering once it is small.
    """
    return -torch.log(-torch.expm1(-nll.clamp_min(1e-6)))


@dataclass(frozen=True)
class TowardAway:
    """Targeted LAT's adversary: toward an undesired output of the same inputs, away from the desired one.

    ``undesired(batch)`` returns the batch paired with the undesired output, shaped like ``batch`` so one
    perturbation fits both; each term has its own forward, so the prefix cache is not used.
    """

    undesired: Callable[[Any], Any]
    toward_weight: float = 1.0
    away_weight: float = 1.0
    same_inputs: bool = False

    def __call__(self, run: Run, io: ModelIO, batch: Any) -> Tensor:
        terms = []
        if self.toward_weight:
            other = self.undesired(batch)
            terms.append(-self.toward_weight * io.loss(run(other), other).mean())
        if self.away_weight:
            terms.append(-self.away_weight * unlikelihood(io.loss(run(batch), batch)).mean())
        if not terms:
            raise ValueError("TowardAway needs a positive toward_weight or away_weight")
        return torch.stack(terms).sum()


@dataclass
class AttackResult:
    deltas: Deltas
    radii: dict[str, float]
    losses: list[float] = field(default_factory=list)  # objective at the start of each step
    first_grad_norm: float = 0.0
    fired: dict[str, int] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        return self.losses[-1] - self.losses[0] if len(self.losses) > 1 else 0.0


def phase(name: str) -> AbstractContextManager[Any]:
    """A ``lat/<name>`` range for ``torch.profiler`` while one records, else a no-op (one flag check).

    ``benchmarks/lat_profile.py`` attributes a training step's wall time to these ranges.
    """
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(f"lat/{name}")
    return nullcontext()


def _check_finite(value: Tensor, what: str, site: str, step: int) -> None:
    """Fail on NaN or inf anywhere in ``value``: one reduction, as it runs on every gradient of every step."""
    if not torch.isfinite(value.sum(dtype=torch.float32)):
        raise NonFiniteError(f"non-finite {what} at site {site!r}, attack step {step}")


def pgd(
    objective: Callable[[Deltas], Tensor],
    references: Deltas,
    radii: dict[str, float],
    threats: dict[str, Threat],
    config: PGDConfig,
    positions: dict[str, Tensor | None] | None = None,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Projected gradient ascent on ``objective`` over one perturbation per site.

    ``positions`` maps a site to its ``(batch, positions)`` mask of perturbable positions (absent: all).
    """
    masks = positions or {}
    deltas: Deltas = {}
    with phase("attack/start"):
        for site, ref in references.items():
            threat, rad = threats[site], radii[site]
            zero = not config.random_start
            start = torch.zeros_like(ref) if zero else random_in_ball(ref, threat, rad, generator)
            deltas[site] = project(start, threat, rad, ref, masks.get(site)).detach()
    adam = None
    if config.optimizer == "adam":
        for delta in deltas.values():
            delta.requires_grad_(True)
        lr = config.step_ratio * min(radii.values()) / config.steps
        adam = torch.optim.Adam(list(deltas.values()), lr=lr)
    result = AttackResult(deltas=deltas, radii=dict(radii))
    for step in range(config.steps):
        for delta in deltas.values():
            delta.requires_grad_(True)
        with phase("attack/forward"):
            loss = objective(deltas)
            _check_finite(loss.detach(), "attack loss", ",".join(deltas), step)
        with phase("attack/backward"):
            grads = torch.autograd.grad(loss, list(deltas.values()))
        with phase("attack/step"):
            result.losses.append(float(loss.detach()))
            if step == 0:
                result.first_grad_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            with torch.no_grad():
                for (site, delta), grad in zip(list(deltas.items()), grads, strict=True):
                    _check_finite(grad, "perturbation gradient", site, step)
                    threat, rad = threats[site], radii[site]
                    if adam is not None:
                        delta.grad = -grad  # Adam minimises
                    else:
                        size = config.step_ratio * rad / config.steps
                        delta = delta + size * ascent_direction(grad, threat)
                    deltas[site] = delta
            if adam is not None:
                adam.step()
                adam.zero_grad(set_to_none=True)
            with torch.no_grad():
                for site in deltas:
                    threat, rad = threats[site], radii[site]
                    projected = project(deltas[site].detach(), threat, rad, references[site], masks.get(site))
                    if adam is not None:
                        deltas[site].copy_(projected)
                    else:
                        deltas[site] = projected
    result.deltas = {site: delta.detach() for site, delta in deltas.items()}
    return result


class LatentAttack:
    """PGD at named sites of an unmodified model (``"input"`` for input-space AT).

    ``threat`` is one threat for every site or a mapping ``site -> threat``. ``unit_sizes`` holds each
    site's calibration (mean unit size) once measured; relative epsilons are resolved against it, so the
    budget stays fixed for a whole run.
    """

    def __init__(
        self,
        sites: list[str],
        threat: Threat | Mapping[str, Threat],
        config: PGDConfig | None = None,
        objective: Objective = untargeted,
    ) -> None:
        self.sites = list(sites)
        self.threat = threat
        self._threats = per_site(threat, self.sites)
        self.config = config or PGDConfig()
        self.objective = objective
        self.unit_sizes: dict[str, float] = {}

    def threats(self) -> dict[str, Threat]:
        return dict(self._threats)

    def radii(self) -> dict[str, float]:
        return {site: radius(self._threats[site], self.unit_sizes.get(site)) for site in self.sites}

    def capture(
        self,
        model: nn.Module,
        io: ModelIO,
        batch: Any,
        cache: PrefixCache | None = None,
        *,
        whole: bool = False,
    ) -> Deltas:
        """The clean activations at every site (weights frozen, no graph kept); fills ``cache`` if given.

        The clean pass stops as soon as every site has run (the layers after them are not computed), unless
        ``whole``: then it runs to the end and warns about a site whose module ran more than once. A model
        sharded by FSDP2 always runs to the end (its units gather and free weights in hooks around every
        forward, which a stopped pass would leave half done).
        """
        stop = not whole and not _sharded(model)
        with frozen(model, train=self.config.model_mode == "train"), torch.no_grad():
            with Intervention(model, self.sites, capture=True) as hooks:

                def clean_pass() -> None:
                    with stop_after_sites(hooks) if stop else nullcontext():
                        io.forward(model, batch)

                if cache is None:
                    clean_pass()
                else:
                    cache.record(clean_pass)
            hooks.check_fired()
        if whole:
            _warn_repeated(hooks.fired, runs=1, stacklevel=4)
        return hooks.activations

    def prefix_cache(self, model: nn.Module) -> PrefixCache | None:
        """A prefix cache when it is valid and wanted, else ``None`` (full forward every step)."""
        if not self.config.reuse_prefix or not reruns_same_inputs(self.objective):
            return None
        return PrefixCache(model, self.sites)

    def calibrate(self, model: nn.Module, io: ModelIO, batch: Any) -> dict[str, float]:
        """Measure the mean unit size at each site on ``batch`` (once per run)."""
        activations = self.capture(model, io, batch)
        positions = io.positions(batch)
        for site, act in activations.items():
            size = mean_unit_size(act, self._threats[site], _positions_for(act, positions))
            if not math.isfinite(size):
                raise NonFiniteError(f"non-finite activations at site {site!r} while calibrating epsilon")
            self.unit_sizes[site] = size
        return dict(self.unit_sizes)

    def _ensure_calibrated(self, model: nn.Module, io: ModelIO, batch: Any) -> None:
        relative = [s for s in self.sites if self._threats[s].epsilon_mode == "relative"]
        if any(s not in self.unit_sizes for s in relative):
            self.calibrate(model, io, batch)

    def __call__(
        self, model: nn.Module, io: ModelIO, batch: Any, generator: torch.Generator | None = None
    ) -> AttackResult:
        require(io, ("forward", "loss", "positions"), "LatentAttack")
        self._ensure_calibrated(model, io, batch)
        cache = self.prefix_cache(model)
        with phase("attack/capture"):
            references = self.capture(model, io, batch, cache)
        positions = io.positions(batch)
        radii = self.radii()
        with (
            frozen(model, train=self.config.model_mode == "train"),
            Intervention(model, self.sites) as hooks,
            cache.active() if cache is not None else nullcontext(),
        ):
            runs = 0  # forward passes, to tell a site that runs more than once per pass

            def run(inputs: Any) -> Any:
                nonlocal runs
                runs += 1
                return io.forward(model, inputs)

            def run_with(deltas: Deltas) -> Tensor:
                hooks.deltas = deltas
                return self.objective(run, io, batch)

            masks = {site: _positions_for(ref, positions) for site, ref in references.items()}
            result = pgd(run_with, references, radii, self.threats(), self.config, masks, generator)
        result.fired = dict(hooks.fired)
        _warn_repeated(hooks.fired, runs)
        return result

    def noise(
        self, model: nn.Module, io: ModelIO, batch: Any, generator: torch.Generator | None = None
    ) -> AttackResult:
        """Random perturbations on the sphere of the same radius: the RLAT baseline and a sanity check."""
        self._ensure_calibrated(model, io, batch)
        references = self.capture(model, io, batch, whole=True)  # no PGD pass follows to spot a reused site
        positions = io.positions(batch)
        radii = self.radii()
        deltas = {}
        for site, ref in references.items():
            site_positions = _positions_for(ref, positions)
            threat = self._threats[site]
            noise = random_on_sphere(ref, threat, radii[site], generator, site_positions)
            deltas[site] = project(noise, threat, radii[site], ref, site_positions)
        return AttackResult(deltas=deltas, radii=radii)

    def loss_with(self, model: nn.Module, io: ModelIO, batch: Any, deltas: Deltas) -> float:
        """The objective under given perturbations (no gradients): to compare attacks with noise."""
        with (
            frozen(model, train=self.config.model_mode == "train"),
            torch.no_grad(),
            Intervention(model, self.sites) as hooks,
        ):
            hooks.deltas = deltas
            return float(self.objective(lambda b: io.forward(model, b), io, batch))


def _warn_repeated(fired: Mapping[str, int], runs: int, stacklevel: int = 3) -> None:
    """Warn about each site whose module ran more than once per forward pass (``runs`` passes)."""
    for site, count in fired.items():
        if runs and count > runs:
            warnings.warn(
                f"site {site!r} ran {count // runs} times in one forward (a reused module): each call gets "
                "the same perturbation; pick a module that runs once",
                stacklevel=stacklevel,
            )


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) shards any module of ``model`` in place."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


class _Captured(BaseException):
    """Ends a capture pass once every site has run (a ``BaseException``: model code that catches
    ``Exception`` lets it through)."""


@contextmanager
def stop_after_sites(hooks: Intervention) -> Iterator[None]:
    """Inside, a forward pass ends quietly right after the last of ``hooks``' sites has run.

    The stop is a hook registered after every hook already on the site modules (``hooks``' own and a prefix
    cache's recording), so those still see the site's output; nothing after the sites is computed.
    """

    def stop(*_: Any) -> None:
        if all(hooks.fired.values()):
            raise _Captured

    handles = [
        module.register_forward_pre_hook(stop) if site == INPUT else module.register_forward_hook(stop)
        for site, module in hooks.modules.items()
    ]
    try:
        yield
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _positions_for(activation: Tensor, positions: Tensor | None) -> Tensor | None:
    """A position mask applies only to activations laid out as (batch, positions, ...)."""
    if positions is None or activation.dim() < 3 or tuple(activation.shape[:2]) != tuple(positions.shape):
        return None
    return positions
