"""Held-out input-space attacks on image classifiers: Lp attacks through torchattacks, and a spatial one.

These attacks judge a defense, so the Lp attacks come from an independent library rather than latentguard's
own PGD engine: a bug shared by the training adversary and the evaluator could not then hide a weakness.
The spatial attack (rotations and shifts, ``spatial.py``) is a grid search with nothing in common with the
training adversary, and a threat class no Lp budget covers. torchattacks is imported only when an Lp attack
runs, so the rest of the image domain works without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from torch import Tensor, nn

from latentguard.domains.common import KindSpec
from latentguard.domains.image.spatial import SpatialGrid, spatial_attack
from latentguard.engine.site import frozen
from latentguard.errors import UserError
from latentguard.registry import IMAGE_ATTACKS, Registry

_LIBRARY = "torchattacks"
_INSTALL_HINT = "pip install --no-deps torchattacks==3.5.1"
_NORM_NAMES = {"linf": "Linf", "l2": "L2"}
AutoAttackPart = Literal["apgd-ce", "apgd-t", "fab-t", "square"]
AUTOATTACK_STANDARD: tuple[AutoAttackPart, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")


class LpAttack(BaseModel):
    """Base of the Lp attacks from torchattacks: a norm and a pixel budget; a subclass names the attack and
    builds its torchattacks object."""

    model_config = ConfigDict(extra="forbid")

    norm: Literal["linf", "l2"]
    epsilon: float = Field(gt=0.0)
    seed: int = Field(0, description="set to the evaluation seed by the evaluator")
    black_box: ClassVar[bool] = False
    _built: Any = PrivateAttr(default=None)

    @property
    def threat_class(self) -> str:
        return self.norm

    @property
    def budget(self) -> str:
        return f"{self.norm}, eps={self.epsilon:g}"

    def name(self) -> str:
        raise NotImplementedError

    def build(self, torchattacks: Any, model: nn.Module, num_classes: int) -> Any:
        """The torchattacks object ``(images, labels) -> adversarial images``."""
        raise NotImplementedError

    def describe(self) -> str:
        """The library, its version, the attack and its budget."""
        try:
            library = f"{_LIBRARY} {metadata.version(_LIBRARY)}"
        except metadata.PackageNotFoundError:
            library = f"{_LIBRARY} (not installed)"
        return f"{library} {self.name()}"

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Built once per evaluation (the first batch tells the class count), as torchattacks expects."""
        if self._built is None:
            with torch.no_grad():
                num_classes = model(images[:1]).shape[-1]
            self._built = self.build(_import_torchattacks(), model, num_classes)
        return self._built(images, labels)


@IMAGE_ATTACKS.register("pgd")
class PGDAttack(LpAttack):
    """PGD with a random start (L∞ or L2)."""

    kind: Literal["pgd"] = "pgd"
    steps: int = Field(default=20, ge=1, description="PGD iterations")
    step_ratio: float = Field(default=2.5, gt=0.0, description="step size = step_ratio * epsilon / steps")

    def name(self) -> str:
        return f"PGD ({self.budget}, {self.steps} steps)"

    def build(self, torchattacks: Any, model: nn.Module, num_classes: int) -> Any:
        alpha = self.step_ratio * self.epsilon / self.steps
        cls = torchattacks.PGD if self.norm == "linf" else torchattacks.PGDL2
        return cls(model, eps=self.epsilon, alpha=alpha, steps=self.steps, random_start=True)


@IMAGE_ATTACKS.register("square")
class SquareAttack(LpAttack):
    """Square (black box): a check that gradient masking does not fake robustness."""

    kind: Literal["square"] = "square"
    queries: int = Field(default=1000, ge=1, description="model queries per example")
    black_box: ClassVar[bool] = True

    def name(self) -> str:
        return f"Square ({self.budget}, {self.queries} queries)"

    def build(self, torchattacks: Any, model: nn.Module, num_classes: int) -> Any:
        norm = _NORM_NAMES[self.norm]
        return torchattacks.Square(model, norm=norm, eps=self.epsilon, n_queries=self.queries, seed=self.seed)


@IMAGE_ATTACKS.register("autoattack")
class AutoAttackEnsemble(LpAttack):
    """AutoAttack's standard ensemble (Croce & Hein, 2020), or chosen parts of it with the same settings."""

    kind: Literal["autoattack"] = "autoattack"
    components: list[AutoAttackPart] = Field(
        default_factory=lambda: list(AUTOATTACK_STANDARD),
        min_length=1,
        description="which parts of the standard ensemble run, in its order "
        "(Square's 5,000 queries cost ~1 s per robust image on a CPU)",
    )

    @model_validator(mode="after")
    def _components_in_order(self) -> AutoAttackEnsemble:
        if len(set(self.components)) != len(self.components):
            raise ValueError(f"components: each part at most once, got {self.components}")
        self.components = [part for part in AUTOATTACK_STANDARD if part in self.components]
        return self

    def name(self) -> str:
        if self.components == list(AUTOATTACK_STANDARD):
            return f"AutoAttack standard ({self.budget})"
        return f"AutoAttack standard parts {'+'.join(self.components)} ({self.budget})"

    def build(self, torchattacks: Any, model: nn.Module, num_classes: int) -> Any:
        """Each part attacks only the images the parts before it left right, as in AutoAttack."""
        norm = _NORM_NAMES[self.norm]
        if self.components == list(AUTOATTACK_STANDARD):
            return torchattacks.AutoAttack(
                model, norm=norm, eps=self.epsilon, version="standard", n_classes=num_classes, seed=self.seed
            )
        common = {"norm": norm, "eps": self.epsilon, "seed": self.seed, "n_restarts": 1}
        build = {
            "apgd-ce": lambda: torchattacks.APGD(model, loss="ce", **common),
            "apgd-t": lambda: torchattacks.APGDT(model, n_classes=num_classes, **common),
            "fab-t": lambda: torchattacks.FAB(model, multi_targeted=True, n_classes=num_classes, **common),
            "square": lambda: torchattacks.Square(model, n_queries=5000, **common),
        }
        parts = [build[part]() for part in self.components]
        return parts[0] if len(parts) == 1 else torchattacks.MultiAttack(parts)


class SpatialAttack(BaseModel):
    """The worst of a grid of rotations and shifts (Engstrom et al. 2019): a class no Lp ball covers."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["spatial"] = "spatial"
    # defaults small enough that Fashion-MNIST models are neither all broken nor all intact (at ±30° and
    # ±3 px, the budget of Engstrom et al., every defense of the image sweep fell to 0.00-0.06)
    max_rotation: float = Field(10.0, ge=0.0, le=180.0, description="degrees either way")
    max_translation: float = Field(1.0, ge=0.0, description="pixels either way, each axis")
    rotations: int = Field(5, ge=1, description="grid points over the rotation range")
    translations: int = Field(3, ge=1, description="grid points over each shift range")
    threat_class: ClassVar[str] = "spatial"  # no training threat is spatial: held out for every defense
    epsilon: ClassVar[float | None] = None
    black_box: ClassVar[bool] = False

    @property
    def grid(self) -> SpatialGrid:
        return SpatialGrid(self.max_rotation, self.max_translation, self.rotations, self.translations)

    def describe(self) -> str:
        return f"latentguard worst-of-grid spatial attack ({self.grid.describe()})"

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return spatial_attack(model, images, labels, self.grid)


IMAGE_ATTACKS.register("spatial", SpatialAttack)


class FunctionAttack:
    """A plain callable ``(model, images, labels) -> adversarial images`` (by import path or registered as a
    function), with the spec's remaining keys as keyword arguments. Its threat class is its own kind, so it
    is held out for every defense."""

    epsilon: float | None = None
    black_box = False

    def __init__(self, function: Callable[..., Tensor], params: dict[str, Any], kind: str) -> None:
        self.function, self.params, self.threat_class = function, params, kind

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"user attack {self.threat_class}" + (f" ({settings})" if settings else "")

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return self.function(model, images, labels, **self.params)


class ImageAttackSpec(KindSpec):
    """One held-out attack: a name for tables, which attack (a registered kind or an import path, with its
    settings alongside) and how many test images it attacks."""

    registry: ClassVar[Registry[Any]] = IMAGE_ATTACKS
    positional: ClassVar[int] = 3  # a plain callable takes (model, images, labels)
    wrap_function = staticmethod(FunctionAttack)

    name: str = Field(min_length=1)
    examples: int = Field(default=500, gt=0, description="attack the first N test images: a fixed subset")

    @property
    def attack(self) -> Any:
        """The attack object: ``perturb(model, images, labels)``, ``describe()``, ``threat_class``,
        ``epsilon``, ``black_box``."""
        return self.built

    def for_seed(self, seed: int) -> Any:
        """A fresh copy of the attack for one evaluation; an attack with a ``seed`` setting gets ``seed``."""
        attack = self.built
        if isinstance(attack, BaseModel):
            return attack.model_copy(update={"seed": seed} if "seed" in type(attack).model_fields else {})
        return attack

    def describe(self) -> str:
        """One line naming the library or author, the attack, its budget and its subset."""
        return f"{self.built.describe()} on {self.examples} test images"


@dataclass
class AttackOutcome:
    """Accuracy on one fixed test subset before and under attack, and how long the attack took."""

    robust_accuracy: float
    clean_accuracy: float
    examples: int
    seconds: float
    breakdown: dict[str, float] | None = None  # a non-adversarial suite's score per part (e.g. corruption)


def _import_torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError as exc:
        raise UserError(f"held-out image attacks need torchattacks: {_INSTALL_HINT}") from exc
    return torchattacks


def _check_budget(adversarial: Tensor, clean: Tensor, spec: ImageAttackSpec) -> None:
    """Fail loudly if an attack returned images outside its threat model: accuracy would mean nothing."""
    attack = spec.attack
    if not isinstance(adversarial, Tensor) or adversarial.shape != clean.shape:
        got = tuple(adversarial.shape) if isinstance(adversarial, Tensor) else type(adversarial).__name__
        raise RuntimeError(f"attack {spec.name!r} returned {got}, expected images of {tuple(clean.shape)}")
    norm, epsilon = getattr(attack, "threat_class", None), getattr(attack, "epsilon", None)
    if norm in _NORM_NAMES and epsilon is not None:
        delta = (adversarial - clean).flatten(1)
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        tolerance = 1e-3 * epsilon + 1e-5
        if delta.numel() and float(size.max()) > epsilon + tolerance:
            raise RuntimeError(
                f"attack {spec.name!r} returned a perturbation of {norm} size {float(size.max()):.4g} "
                f"> epsilon {epsilon:g}"
            )
    if float(adversarial.min()) < -1e-6 or float(adversarial.max()) > 1.0 + 1e-6:
        raise RuntimeError(f"attack {spec.name!r} returned pixels outside [0, 1]")


def _run_suite(
    model: nn.Module, images: Tensor, labels: Tensor, spec: ImageAttackSpec, seed: int, start: float
) -> AttackOutcome:
    """A non-adversarial suite: its mean accuracy is the robust score, its parts the breakdown."""
    with frozen(model):
        with torch.no_grad():
            clean = float((model(images).argmax(dim=-1) == labels).float().mean())
        score, breakdown = spec.for_seed(seed).evaluate(model, images, labels)
    return AttackOutcome(
        robust_accuracy=float(score),
        clean_accuracy=clean,
        examples=int(labels.shape[0]),
        seconds=time.perf_counter() - start,
        breakdown={name: float(value) for name, value in breakdown.items()},
    )


def run_attack(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    spec: ImageAttackSpec,
    *,
    batch_size: int = 250,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> AttackOutcome:
    """Attack the first ``spec.examples`` test images; robust accuracy counts images right before and after.

    Counting an image as robust only if it was also classified correctly clean (as AutoAttack does) keeps
    robust accuracy ≤ clean accuracy whatever the attack returns for already-misclassified images. Runs
    under a forked RNG seeded with ``seed``: reproducible, and the caller's random state is untouched.
    """
    device = torch.device(device)
    count = min(spec.examples, labels.shape[0])
    if count == 0:
        raise ValueError(f"attack {spec.name!r}: no test images to attack")
    subset_images, subset_labels = images[:count], labels[:count]
    clean_correct = robust_correct = 0
    start = time.perf_counter()
    forked = [device] if device.type == "cuda" else []
    if hasattr(spec.attack, "evaluate"):  # not adversarial: a score and its breakdown (common corruptions)
        return _run_suite(model, subset_images.to(device), subset_labels.to(device), spec, seed, start)
    with frozen(model), torch.random.fork_rng(devices=forked):  # only input gradients: no weight gradients
        torch.manual_seed(seed)
        attack = spec.for_seed(seed)
        for first in range(0, count, batch_size):
            batch = subset_images[first : first + batch_size].to(device)
            target = subset_labels[first : first + batch_size].to(device)
            with torch.no_grad():
                logits = model(batch)
            right = logits.argmax(dim=-1) == target
            adversarial = attack.perturb(model, batch, target).detach()
            _check_budget(adversarial, batch, spec)
            with torch.no_grad():
                still_right = model(adversarial).argmax(dim=-1) == target
            clean_correct += int(right.sum())
            robust_correct += int((right & still_right).sum())
    return AttackOutcome(
        robust_accuracy=robust_correct / count,
        clean_accuracy=clean_correct / count,
        examples=count,
        seconds=time.perf_counter() - start,
    )
