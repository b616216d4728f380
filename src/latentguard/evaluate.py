"""The evaluation suite: clean performance, trojan ASR, held-out attacks and attack sanity checks.

Held-out attacks come from the task (independent libraries such as torchattacks) plus latent PGD at
layers of the evaluator's choosing. Sanity checks follow AutoAttack's spirit: a robustness number is only
trusted when the hook fired, the perturbation gradient is non-zero, the attack beats random noise of the
same size and no black-box attack beats the white-box ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentguard.config import DefenseSpec, EvaluationConfig
from latentguard.domains.base import Task
from latentguard.engine.attack import LatentAttack, PGDConfig
from latentguard.engine.io import ClassifierIO, ModelIO, require
from latentguard.engine.site import Intervention, frozen
from latentguard.engine.threat import Threat
from latentguard.results import GROUPS, Metrics

BLACK_BOX_TOLERANCE = 0.02  # a black-box attack may beat white-box PGD by this much before we flag it


@dataclass
class Evaluation:
    metrics: Metrics = field(default_factory=lambda: {group: {} for group in GROUPS})
    sanity: dict[str, bool | None] = field(default_factory=dict)
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def accuracy_score(output: Tensor, batch: Any) -> Tensor:
    """Per-example correctness of a classifier's logits on ``(inputs, labels)``."""
    return (output.argmax(dim=1) == batch[1]).float()


def accuracy(model: nn.Module, batches: Iterable[Any], io: ModelIO | None = None) -> float:
    """Mean ``io.score`` over the batches (``io`` default: ``(inputs, labels)`` batches of a classifier)."""
    io = io or ClassifierIO()
    require(io, ("forward", "score"), "accuracy")
    scores = []
    with frozen(model), torch.no_grad():
        for batch in batches:
            scores.append(io.score(io.forward(model, batch), batch).float())
    if not scores:
        raise ValueError("accuracy: no batches")
    return float(torch.cat(scores).mean())


def latent_robustness(
    model: nn.Module,
    batches: list[Any],
    layer: str,
    threat: Threat | Mapping[str, Threat],
    pgd: PGDConfig | None = None,
    *,
    io: ModelIO | None = None,
    score: Callable[[Any, Any], Tensor] | None = None,
) -> tuple[float, dict[str, float]]:
    """Mean score (``score``, default ``io.score``) under latent PGD at ``layer`` and the calibration used
    (radius fixed on the first batch). ``threat`` may be a ``Threat`` or ``{layer: Threat}``."""
    io = io or ClassifierIO()
    require(io, ("forward", "loss", "positions", *(() if score else ("score",))), "latent_robustness")
    score = score or io.score
    attack = LatentAttack([layer], threat, pgd or PGDConfig(steps=20))
    attack.calibrate(model, io, batches[0])
    scores = []
    for batch in batches:
        result = attack(model, io, batch)
        with frozen(model), torch.no_grad(), Intervention(model, [layer]) as hooks:
            hooks.deltas = result.deltas
            output = io.forward(model, batch)
        scores.append(score(output, batch))
    calibration = {"mean_norm": attack.unit_sizes.get(layer, 0.0), "epsilon_abs": attack.radii()[layer]}
    return float(torch.cat(scores).float().mean()), calibration


def sanity_checks(
    model: nn.Module, task: Task, attack: LatentAttack, batch: Any, metrics: Metrics
) -> dict[str, bool | None]:
    """Checks that make a robustness number trustworthy (see module docstring)."""
    result = attack(model, task.io, batch)
    noise = attack.noise(model, task.io, batch)
    attacked = attack.loss_with(model, task.io, batch, result.deltas)
    noisy = attack.loss_with(model, task.io, batch, noise.deltas)
    return {
        "hook_fired": all(count > 0 for count in result.fired.values()),
        "grad_nonzero": result.first_grad_norm > 0,
        "attack_beats_noise": attacked > noisy,
        "blackbox_not_better": _black_box_not_better(task, metrics),
    }


def _black_box_not_better(task: Task, metrics: Metrics) -> bool | None:
    """False when a black-box attack found more errors than a white-box one with the same budget."""
    verdict: bool | None = None
    attacks = task.heldout_attacks()
    for black in (a for a in attacks if a.black_box):
        for white in (a for a in attacks if not a.black_box):
            if (white.site, white.norm, white.epsilon) != (black.site, black.norm, black.epsilon):
                continue
            heldout = metrics.get("heldout", {})
            b, w = heldout.get(black.name), heldout.get(white.name)
            if b is None or w is None:
                continue
            ok = b >= w - BLACK_BOX_TOLERANCE
            verdict = ok if verdict is None else verdict and ok
    return verdict


def sanity_attack(defense: DefenseSpec, task: Task, config: EvaluationConfig) -> LatentAttack:
    """The attack the sanity checks probe: the defense's own threat, else latent PGD at an eval layer."""
    if defense.threat is not None and defense.defense.perturbs:
        return LatentAttack(defense.sites or [task.input_site], defense.threat, config.latent_pgd)
    layer = (config.latent_layers or list(task.layers))[0]
    return LatentAttack([layer], config.latent_threat, config.latent_pgd)


def progress_bar(total: int, description: str, enabled: bool) -> tqdm:
    """An evaluation's bar, one tick per metric group or attack, in the training bars' style."""
    return tqdm(total=total, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)


def _tick(bar: tqdm | None, next_step: str | None = None) -> None:
    """One step done; show the next one."""
    if bar is not None:
        bar.update(1)
        if next_step:
            bar.set_postfix_str(next_step)


def evaluate(
    model: nn.Module,
    task: Task,
    config: EvaluationConfig,
    defense: DefenseSpec,
    seed: int,
    *,
    progress: bool = False,
) -> Evaluation:
    """Every metric of one trained model (``progress``: a bar over its attacks)."""
    start = time.perf_counter()
    model.eval()
    result = Evaluation()
    names = [a.name for a in task.heldout_attacks()]
    steps = ["clean", "trojans", *names, *(f"latent/{layer}" for layer in config.latent_layers), "sanity"]
    with progress_bar(len(steps), f"seed {seed} {defense.name} eval", progress) as bar:
        bar.set_postfix_str(steps[0])
        result.metrics["clean"].update(task.clean_metrics(model))
        _tick(bar, steps[1])
        result.metrics["trojan"].update(task.trojan_metrics(model))
        _tick(bar, steps[2])
        result.details = _run_heldout(model, task, names, seed, result.metrics, bar, steps[2:])
        batches = task.eval_batches(config.latent_examples, config.batch_size)
        for i, layer in enumerate(config.latent_layers):
            torch.manual_seed(seed)
            score, calibration = latent_robustness(
                model, batches, layer, config.latent_threat, config.latent_pgd, io=task.io, score=task.score
            )
            result.metrics["latent"][layer] = score
            result.calibration[f"eval:{layer}"] = calibration
            _tick(bar, steps[2 + len(names) + i + 1])
        torch.manual_seed(seed)
        probe = task.eval_batches(config.sanity_examples, config.sanity_examples)[0]
        attack = sanity_attack(defense, task, config)
        result.sanity = sanity_checks(model, task, attack, probe, result.metrics)
        _tick(bar)
    result.seconds = time.perf_counter() - start
    return result


def _run_heldout(
    model: nn.Module,
    task: Task,
    names: list[str],
    seed: int,
    metrics: Metrics,
    bar: tqdm | None = None,
    steps: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs the named held-out attacks into ``metrics``; returns their per-attack statistics. ``bar`` ticks
    once per attack, showing the next of ``steps`` (the attacks, then what follows them)."""
    for i, name in enumerate(names):
        torch.manual_seed(seed)
        metrics.setdefault("heldout", {})[name] = task.run_heldout(model, name, seed)
        _tick(bar, steps[i + 1] if steps and i + 1 < len(steps) else None)
    details = task.heldout_details()
    return {name: details[name] for name in names if name in details}


def missing_heldout(task: Task, evaluation: dict[str, Any]) -> list[str]:
    """The task's held-out attacks that a saved evaluation has no result for (added to the config later)."""
    done = evaluation["metrics"].get("heldout", {})
    return [a.name for a in task.heldout_attacks() if a.name not in done]


def complete_evaluation(
    model: nn.Module,
    task: Task,
    evaluation: dict[str, Any],
    seed: int,
    *,
    progress: bool = False,
    description: str = "eval",
) -> dict[str, Any]:
    """A saved evaluation with the held-out attacks it lacks run and merged in, and the black-box check
    redone over the full set, so adding an attack to a finished run costs only that attack."""
    start = time.perf_counter()
    model.eval()
    metrics = {group: dict(values) for group, values in evaluation["metrics"].items()}
    names = missing_heldout(task, evaluation)
    with progress_bar(len(names), description, progress) as bar:
        bar.set_postfix_str(names[0] if names else "")
        details = _run_heldout(model, task, names, seed, metrics, bar, names)
    return {
        **evaluation,
        "metrics": metrics,
        "details": {**evaluation.get("details", {}), **details},
        "sanity": {**evaluation["sanity"], "blackbox_not_better": _black_box_not_better(task, metrics)},
        "seconds": evaluation["seconds"] + time.perf_counter() - start,
    }
