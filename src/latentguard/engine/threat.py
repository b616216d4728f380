"""Threat models: the ball an adversary's perturbation must stay in, and the geometry of moving inside it.

A *unit* is what one ball covers: a whole example (scope ``example``) or one position of a
``(batch, positions, features)`` activation (scope ``token``). Relative epsilons are fractions of the mean
activation size at the site, measured once on a calibration batch, because layers differ in scale by
orders of magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from torch import Tensor

from latentguard.errors import SiteError

Norm = Literal["l2", "linf"]


class Threat(BaseModel):
    """An adversary's budget at one site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    norm: Norm = "l2"
    epsilon: float = Field(1.0, gt=0, description="radius, absolute or a fraction of the mean unit size")
    epsilon_mode: Literal["absolute", "relative"] = "absolute"
    scope: Literal["example", "token"] = "example"
    bounds: tuple[float, float] | None = Field(
        None, description="valid range of activation + delta, e.g. pixels"
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> Threat:
        if self.bounds is not None and self.bounds[0] >= self.bounds[1]:
            raise ValueError("bounds must be (low, high) with low < high")
        return self

    def describe(self, radius: float | None = None) -> str:
        size = f"{self.epsilon:g}" if self.epsilon_mode == "absolute" else f"{self.epsilon:g} × mean norm"
        if radius is not None and self.epsilon_mode == "relative":
            size += f" (= {radius:.4g})"
        return f"{self.norm} ε={size}, one ball per {self.scope}"


# A defense takes one threat for all its sites, or a mapping ``site -> threat``. The two shapes are told apart
# by their values (a threat's fields are numbers and words; a site's entry is a mapping); the union's tags are
# dropped from error paths, so errors read ``threat.epsilon`` or ``threat.block:4.epsilon``.
ONE_THREAT, PER_SITE = "(one threat)", "(per site)"
UNION_TAGS = frozenset({ONE_THREAT, PER_SITE})


def _threat_shape(value: Any) -> str:
    if isinstance(value, Mapping) and value and all(isinstance(v, (Mapping, Threat)) for v in value.values()):
        return PER_SITE
    return ONE_THREAT


ThreatSpec = Annotated[
    Annotated[Threat, Tag(ONE_THREAT)] | Annotated[dict[str, Threat], Tag(PER_SITE)],
    Discriminator(_threat_shape),
]


def threat_at(threat: Threat | Mapping[str, Threat], site: str) -> Threat:
    """The threat at ``site``: the one threat, or that site's entry of a per-site mapping."""
    if isinstance(threat, Threat):
        return threat
    if site not in threat:
        raise SiteError(f"no threat for site {site!r}; the per-site threats name {', '.join(threat)}")
    return threat[site]


def per_site(threat: Threat | Mapping[str, Threat], sites: Sequence[str]) -> dict[str, Threat]:
    """``{site: threat}`` for every site (a single threat is shared by all of them)."""
    return {site: threat_at(threat, site) for site in sites}


def _units(x: Tensor, scope: str) -> Tensor:
    """``x`` as ``(units, features)``."""
    if scope == "example":
        return x.reshape(x.shape[0], -1)
    if x.dim() < 3:
        raise SiteError(
            f"scope 'token' needs a (batch, positions, features) activation, got shape {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0] * x.shape[1], -1)


def _mask_like(x: Tensor, positions: Tensor | None) -> Tensor | None:
    """Broadcast a ``(batch, positions)`` mask over the remaining dimensions of ``x``."""
    if positions is None:
        return None
    if x.dim() < 2 or tuple(positions.shape) != tuple(x.shape[:2]):
        raise SiteError(
            f"position mask of shape {tuple(positions.shape)} does not fit activation {tuple(x.shape)}"
        )
    return positions.reshape(*positions.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def unit_norms(x: Tensor, norm: Norm, scope: str) -> Tensor:
    units = _units(x, scope)
    return units.norm(dim=1) if norm == "l2" else units.abs().amax(dim=1)


def mean_unit_size(activation: Tensor, threat: Threat, positions: Tensor | None = None) -> float:
    """The scale relative epsilons multiply: mean L2 norm of a unit (l2), or mean RMS element size (linf)."""
    mask = _mask_like(activation, positions)
    x = activation if mask is None else activation * mask
    units = _units(x.float(), threat.scope)
    sizes = units.norm(dim=1) if threat.norm == "l2" else units.pow(2).mean(dim=1).sqrt()
    if mask is not None and threat.scope == "token":
        keep = positions.reshape(-1).bool()
        sizes = sizes[keep]
    return float(sizes.mean()) if sizes.numel() else 0.0


def radius(threat: Threat, unit_size: float | None) -> float:
    """The absolute radius of the ball."""
    if threat.epsilon_mode == "absolute":
        return threat.epsilon
    if unit_size is None or not math.isfinite(unit_size) or unit_size <= 0:
        raise SiteError("relative epsilon needs a calibration with a positive, finite activation size")
    return threat.epsilon * unit_size


def project(
    delta: Tensor,
    threat: Threat,
    rad: float,
    reference: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """The nearest point of the ball (and of ``bounds`` around ``reference``); masked positions zeroed."""
    mask = _mask_like(delta, positions)
    if mask is not None:
        delta = delta * mask
    if threat.norm == "l2":
        units = _units(delta, threat.scope)
        scale = (rad / units.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        delta = (units * scale[:, None]).reshape(delta.shape)
    else:
        delta = delta.clamp(-rad, rad)
    if threat.bounds is not None and reference is not None:
        low, high = threat.bounds
        delta = (reference + delta).clamp(low, high) - reference
    return delta


def random_in_ball(
    like: Tensor, threat: Threat, rad: float, generator: torch.Generator | None = None
) -> Tensor:
    """A uniform sample from the ball (before bounds/mask projection)."""
    if threat.norm == "linf":
        noise = torch.rand(like.shape, generator=generator, device="cpu", dtype=torch.float32)
        return ((noise * 2 - 1) * rad).to(device=like.device, dtype=like.dtype)
    direction = _units(random_on_sphere(like, threat, 1.0, generator), threat.scope)
    dims = direction.shape[1]
    scale = torch.rand(direction.shape[0], generator=generator, device="cpu").pow(1.0 / dims) * rad
    return (direction * scale.to(direction)[:, None]).reshape(like.shape)


def random_on_sphere(
    like: Tensor,
    threat: Threat,
    rad: float,
    generator: torch.Generator | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Random noise exactly as large as the budget allows: the baseline a real attack must beat."""
    noise = torch.randn(like.shape, generator=generator, device="cpu", dtype=torch.float32)
    noise = noise.to(device=like.device, dtype=like.dtype)
    mask = _mask_like(noise, positions)
    if mask is not None:
        noise = noise * mask
    if threat.norm == "linf":
        return noise.sign() * rad
    units = _units(noise, threat.scope)
    return (units / units.norm(dim=1, keepdim=True).clamp_min(1e-12) * rad).reshape(like.shape)


def ascent_direction(grad: Tensor, threat: Threat) -> Tensor:
    """Steepest ascent for the norm: sign for linf, unit-normalised gradient for l2."""
    if threat.norm == "linf":
        return grad.sign()
    units = _units(grad, threat.scope)
    return (units / units.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(grad.shape)
