"""A perturbation that trains along with the model: "Adversarial Training for Free!" (Shafahi et al. 2019)
carried to latent space.

There is no inner loop. Every training forward adds the current δ at each site, and the one backward of the
training loss gives both the weights their gradient and δ its own. After that backward δ takes one ascent
step (normalised gradient for L2, sign for L∞) of ``step × radius`` and is projected back into its ball
(and onto the position mask and the activation ``bounds``). δ starts at zero and is carried to the next
forward: the next replay of the same batch and, as in the paper, the next batch when the activation there
has the same shape; an activation of another shape (a short last batch, another sequence length) starts
from zero again. So a training step costs one forward and one backward, like a plain step, plus the
element-wise update of δ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from latentguard.engine.attack import AttackResult, Deltas, _check_finite, _positions_for
from latentguard.engine.site import Intervention
from latentguard.engine.threat import Threat, ascent_direction, project


class FreeAdversary:
    """δ at named sites that takes one ascent step per training backward (see the module docstring).

    ``threats`` maps each site to its threat; ``step`` is the ascent step as a fraction of the radius (the
    paper steps by the whole radius: 1.0). The carried δ is :attr:`deltas` (``state``/``load_state`` for
    checkpoints).
    """

    def __init__(self, threats: Mapping[str, Threat], step: float = 1.0) -> None:
        self.threats = dict(threats)
        self.step = step
        self.deltas: Deltas = {}
        self.radii: dict[str, float] = {}
        self.positions: Tensor | None = None
        self.updates = 0  # ascent steps taken (one per training backward)

    @property
    def needs_reference(self) -> bool:
        """Whether projecting needs the clean activation (``bounds``): the training forward then keeps it."""
        return any(threat.bounds is not None for threat in self.threats.values())

    def prepare(self, radii: Mapping[str, float], positions: Tensor | None) -> AttackResult:
        """The perturbation for the next training forward: the carried δ, each a fresh leaf that takes a
        gradient. Sites without a fitting δ get zeros from :meth:`start` when the forward reaches them."""
        self.radii = dict(radii)
        self.positions = positions
        deltas = {site: delta.detach().requires_grad_(True) for site, delta in self.deltas.items()}
        return AttackResult(deltas=deltas, radii=dict(self.radii))

    def start(self, site: str, activation: Tensor) -> Tensor:
        """A zero δ shaped like ``activation`` (float32 or wider), taking a gradient."""
        dtype = torch.promote_types(activation.dtype, torch.float32)
        return torch.zeros(activation.shape, dtype=dtype, device=activation.device, requires_grad=True)

    def intervention(self, model: nn.Module, sites: list[str], result: AttackResult) -> Intervention:
        """Hooks that add ``result.deltas`` (creating missing or misfit ones) and, where ``bounds`` need it,
        keep the clean activation."""
        hooks = Intervention(model, sites, capture=self.needs_reference, start=self.start)
        hooks.deltas = result.deltas
        return hooks

    def update(self, deltas: Deltas, references: Mapping[str, Tensor]) -> None:
        """One ascent step from the gradients the training backward left on ``deltas``, then projection."""
        new: Deltas = {}
        with torch.no_grad():
            for site, delta in deltas.items():
                if delta.grad is None:  # the loss did not depend on it (the site did not run)
                    new[site] = delta.detach()
                    continue
                _check_finite(delta.grad, "perturbation gradient", site, self.updates)
                threat, rad = self.threats[site], self.radii[site]
                moved = delta.detach() + self.step * rad * ascent_direction(delta.grad, threat)
                mask = _positions_for(moved, self.positions)
                new[site] = project(moved, threat, rad, references.get(site), mask)
        self.deltas = new
        self.updates += 1

    def state(self) -> dict[str, Tensor]:
        return {site: delta.detach().cpu() for site, delta in self.deltas.items()}

    def load_state(self, tensors: Mapping[str, Any], device: torch.device | str) -> None:
        self.deltas = {site: value.to(device) for site, value in tensors.items()}
