"""A defense is one registered object: what it perturbs, what its adversary maximises, what the model trains
on. The trainer runs one loop for all of them and asks the defense at each of those three points.

``DefenseConfig`` is the typed config section; its ``kind`` names a :class:`Defense` in
``latentguard.registry.DEFENSES``. A user adds a defense by registering a subclass (one file, no edits)::

    @DEFENSES.register("my_defense")
    class MyDefense(Defense):
        perturbs = True
        what = "my latent adversary"
        def objective(self, config, io): ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import Tensor, nn

from latentguard.engine.attack import AttackResult, LatentAttack, Objective, PGDConfig, untargeted
from latentguard.engine.io import ModelIO
from latentguard.engine.site import Intervention
from latentguard.engine.threat import Threat, ThreatSpec, per_site, threat_at
from latentguard.errors import ConfigError
from latentguard.registry import DEFENSES

if TYPE_CHECKING:
    from latentguard.engine.trainer import Trainer

# Config fields that only some defenses read: setting one for another defense is a mistake, not a no-op.
OPTION_FIELDS = ("toward_weight", "away_weight", "undesired_weight")


class Defense:
    """Base class of every defense kind; the class attributes describe it to the trainer and the report."""

    trains: ClassVar[bool] = True  # False: the model is evaluated as it is (no defense phase)
    perturbs: ClassVar[bool] = False  # trains on a perturbed forward: needs a threat (and sites)
    needs_sites: ClassVar[bool] = False  # True: sites must be given; False: defaults to the input site
    learns_threat: ClassVar[bool] = False  # its threat counts as seen by the held-out evaluation (a †)
    by_layer: ClassVar[bool] = False  # the report plots its points against the layer it perturbs
    clean_loss: ClassVar[bool] = False  # always trains on the clean forward (weight 1)
    options: ClassVar[frozenset[str]] = frozenset()  # which of OPTION_FIELDS it reads
    what: ClassVar[str] = "defense"  # how the report names what it trains against
    uses_steps: ClassVar[bool] = True  # describe() shows the PGD step count

    def check(self, config: DefenseConfig) -> None:
        """Raise ``ValueError`` for a config this defense cannot run (the message names the field)."""

    def objective(self, config: DefenseConfig, io: ModelIO) -> Objective:
        """What the adversary maximises."""
        return untargeted

    def perturb(self, attack: LatentAttack, model: nn.Module, io: ModelIO, batch: Any) -> AttackResult:
        """The perturbation the model trains under for this batch."""
        return attack(model, io, batch)

    def begin(self, config: DefenseConfig, attack: LatentAttack | None) -> None:
        """Called once by each trainer before it trains: a defense that keeps state between steps (e.g. a
        carried perturbation) sets it up here. The trainer holds its own instance of the defense."""

    def replays(self, config: DefenseConfig) -> int:
        """How many training steps (model updates) each batch gets in a row; ``training.steps`` counts
        updates, so a run sees ``steps / replays`` distinct batches."""
        return 1

    def intervention(self, model: nn.Module, attack: LatentAttack, result: AttackResult) -> Intervention:
        """The hooks that place ``result``'s perturbation in the training forward."""
        hooks = Intervention(model, attack.sites)
        hooks.deltas = result.deltas
        return hooks

    def after_backward(self, hooks: Intervention) -> None:
        """Called after the training loss's backward, before the optimizer step, with the hooks of the
        training forward (their ``deltas`` hold gradients where they take one): a perturbation that trains
        along with the model takes its step here."""

    def state(self) -> dict[str, Tensor]:
        """Tensors a checkpoint keeps for this defense (its carried state); restored by :meth:`load_state`."""
        return {}

    def load_state(self, tensors: dict[str, Tensor], device: Any) -> None:
        """Restore what :meth:`state` returned."""

    def inner_steps(self, config: DefenseConfig) -> int | None:
        """The adversary's step count the report shows (``None``: none to show)."""
        return config.pgd.steps if self.uses_steps else None

    def extra_terms(self, trainer: Trainer, batch: Any) -> dict[str, tuple[float, Tensor]]:
        """Further weighted loss terms computed under the perturbation (name → (weight, loss))."""
        return {}

    def label(self, config: DefenseConfig) -> str:
        """What it trains against, in words (the start of :meth:`describe`)."""
        return self.what

    def notes(self, config: DefenseConfig) -> list[str]:
        """Settings of its own that the report lists after the threat (e.g. tlat's unlearning weight)."""
        return []

    def describe(self, config: DefenseConfig, radii: dict[str, float]) -> str:
        """One line for the report's training-threat table (``radii``: the absolute radius per site)."""
        if not self.perturbs:
            return self.label(config)
        assert config.threat is not None
        count = self.inner_steps(config)
        steps = f", {count} steps" if count is not None else ""
        notes = [f"clean weight {config.clean_weight:g}"] if config.clean_weight else []
        notes += self.notes(config)
        notes += [f"KL weight {config.kl_weight:g}"] if config.kl_weight else []
        extra = "".join(f", {note}" for note in notes)
        if isinstance(config.threat, Threat):
            where = ", ".join(config.sites)
            radius = next(iter(radii.values()), None)
            return f"{self.label(config)} at {where}: {config.threat.describe(radius)}{steps}{extra}"
        each = "; ".join(f"{site}: {t.describe(radii.get(site))}" for site, t in config.threat.items())
        return f"{self.label(config)} at {each}{steps}{extra}"


def defense_for(kind: str, where: str = "kind") -> Defense:
    """The registered defense object for ``kind`` (a class is instantiated)."""
    entry = DEFENSES.get(kind, where)
    defense = entry() if isinstance(entry, type) else entry
    if not isinstance(defense, Defense):
        raise ConfigError(f"{where}: {kind!r} is not a latentguard Defense (subclass latentguard.Defense)")
    return defense


class DefenseConfig(BaseModel):
    """Which defense to train and against what threat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="a registered defense: none, clean, at, lat, rlat, tlat or a plugin's")
    sites: list[str] = Field(default_factory=list, description="layers to perturb; 'input' for AT")
    threat: ThreatSpec | None = Field(None, description="one threat for every site, or {site: threat}")
    pgd: PGDConfig = PGDConfig()
    clean_weight: float = Field(0.0, ge=0, description="weight of the extra loss on the clean forward")
    kl_weight: float = Field(
        0.0, ge=0, description="KL to the model as training started (LoRA: the adapter-disabled model)"
    )
    toward_weight: float = Field(1.0, ge=0, description="tlat adversary: pull toward the undesired output")
    away_weight: float = Field(1.0, ge=0, description="tlat adversary: push away from the desired output")
    undesired_weight: float = Field(
        1.0, ge=0, description="tlat defense: push away from the undesired output under the attack"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="settings of a plugin's defense")

    @field_validator("threat")
    @classmethod
    def _one_threat_per_site(cls, threat: Any, info: ValidationInfo) -> Any:
        if isinstance(threat, dict):
            sites = info.data.get("sites") or []
            missing = [site for site in sites if site not in threat]
            extra = [site for site in threat if site not in sites]
            if missing or extra:
                raise ValueError(
                    f"per-site threats need one entry for each of sites {sites}; "
                    f"missing: {missing or 'none'}, not a site: {extra or 'none'}"
                )
        return threat

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        try:
            defense_for(kind)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("kind: ")) from None
        return kind

    @model_validator(mode="after")
    def _fits_kind(self) -> DefenseConfig:
        defense = self.defense
        if defense.perturbs and self.threat is None:
            raise ValueError(f"defense kind {self.kind!r} needs a threat")
        if defense.needs_sites and not self.sites:
            raise ValueError(f"defense kind {self.kind!r} needs at least one site (a layer name)")
        fields = type(self).model_fields
        stray = [
            n for n in OPTION_FIELDS if getattr(self, n) != fields[n].default and n not in defense.options
        ]
        if stray:
            users = [name for name in DEFENSES.names() if set(stray) <= defense_for(name).options]
            kinds = " or ".join(repr(name) for name in users) or "(none registered)"
            raise ValueError(f"{', '.join(stray)} only apply to defense kind {kinds}")
        defense.check(self)
        return self

    @property
    def defense(self) -> Defense:
        return defense_for(self.kind)

    def describe(self, radii: dict[str, float] | None = None) -> str:
        return self.defense.describe(self, radii or {})

    def threat_at(self, site: str) -> Threat:
        """The threat at ``site``: the one threat, or that site's entry of the per-site threats."""
        assert self.threat is not None, f"defense kind {self.kind!r} has no threat"
        return threat_at(self.threat, site)

    def threats(self, sites: list[str]) -> dict[str, Threat]:
        """``{site: threat}`` for ``sites``."""
        assert self.threat is not None, f"defense kind {self.kind!r} has no threat"
        return per_site(self.threat, sites)
