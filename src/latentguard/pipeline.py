"""implant → defenses → evaluation → report, over seeds, resumable at every stage.

Each unit of work (a seed's base model, a defense's training, an evaluation) writes its output atomically
in the run folder when it finishes; a rerun with ``--resume`` skips finished units and continues an
unfinished training from its last checkpoint.

Under ``accelerate launch`` every process trains each unit together; only the main process writes the run
folder, and it evaluates and reports alone once everything is trained (the other processes then exit).
"""

from __future__ import annotations

import functools
import time
import zlib
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from latentguard.config import DefenseSpec, RunConfig, dump_config, load_config
from latentguard.defenses import DefenseConfig
from latentguard.domains import build_task
from latentguard.domains.base import Task, resolve_device
from latentguard.engine.aliases import is_alias, module_name
from latentguard.engine.distributed import (
    from_main,
    is_main_process,
    num_processes,
    process_device,
    wait_for_everyone,
)
from latentguard.engine.threat import Threat
from latentguard.engine.trainer import Trainer
from latentguard.errors import ConfigError, SiteError
from latentguard.evaluate import complete_evaluation, evaluate, missing_heldout
from latentguard.preflight import fill_sites, preflight
from latentguard.report import write_report
from latentguard.results import (
    HeldoutThreat,
    Metrics,
    MetricSpec,
    Record,
    Results,
    TrainingBudget,
    TrainingThreat,
    Trojan,
)
from latentguard.runs import (
    MetricLog,
    atomic_write_json,
    atomic_write_text,
    load_model,
    provenance,
    read_json,
)

CONFIG_FILE = "config.yaml"


def new_run_dir(config: RunConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = config.output_dir / f"{config.name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = config.output_dir / f"{config.name}-{stamp}-{suffix}"
    return path


def start_run(config: RunConfig, run_dir: Path | None = None) -> Path:
    """Create the run folder and record the resolved config and provenance."""
    run_dir = run_dir or new_run_dir(config)
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"{run_dir}: already holds a run; resume it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(config))
    atomic_write_json(run_dir / "provenance.json", provenance())
    return run_dir


def resume_config(run_dir: Path) -> RunConfig:
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG_FILE} here; expected a folder made by latentguard run")
    return load_config(run_dir / CONFIG_FILE)


def defense_seed(seed: int, name: str) -> int:
    """A per-defense seed that does not depend on the defense's position in the config."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


class Pipeline:
    """Runs (or resumes) every unit of one run folder."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.run_dir = run_dir
        self.device = process_device(resolve_device(config.device))
        tb = run_dir / "tensorboard" if config.tensorboard else None
        self.log = MetricLog(run_dir / "metrics.jsonl", tb)
        self._tasks: dict[int, Task] = {}
        self._task = self.task(config.seeds[0])
        self.input_site = self._task.input_site

    def seed_dir(self, seed: int) -> Path:
        return self.run_dir / f"seed-{seed}"

    def task(self, seed: int) -> Task:
        """The task of ``seed``, built once per run (building one poisons its training data)."""
        if seed not in self._tasks:
            cfg = self.config
            self._tasks[seed] = build_task(cfg.task, cfg.evaluation.attacks, seed, self.device)
        return self._tasks[seed]

    # -- training ------------------------------------------------------------------------------------------
    def base_model(self, task: Task, seed: int) -> nn.Module:
        """The trojaned base model: trained once per seed on poisoned data, shared by every defense."""
        path = self.seed_dir(seed) / "base.safetensors"
        torch.manual_seed(seed)
        model = task.build_model().to(self.device)
        if path.exists():
            load_model(path, model)
            return model
        # Accelerate fixes mixed precision once per process: the base model trains as the defenses do.
        precision = {"mixed_precision": self.config.training.mixed_precision}
        trainer = Trainer(
            model,
            task.io,
            DefenseConfig(kind="clean"),
            task.base_training(self.config.batch_size).model_copy(update=precision),
            device=self.device,
            checkpoint=self.seed_dir(seed) / "base.checkpoint.safetensors",
            log=self.log.writer(f"seed-{seed}/base"),
            progress=self.config.progress,
            description=f"seed {seed} implant trojans",
        )
        result = trainer.fit(task.base_loader(self.config.batch_size))
        trainer.save_model(path, {"seed": seed, "steps": result.steps})  # every process (FSDP2 gathers)
        if is_main_process():
            atomic_write_json(
                self.seed_dir(seed) / "base.json", {"seconds": result.seconds, "steps": result.steps}
            )
            (self.seed_dir(seed) / "base.checkpoint.safetensors").unlink(missing_ok=True)
        wait_for_everyone()  # no process may look for the file before it is there
        if trainer.sharded:  # FSDP2 sharded the model in place: go on from the whole saved weights
            return self.base_model(task, seed)
        return model

    def train_defense(self, task: Task, seed: int, defense: DefenseSpec) -> nn.Module:
        folder = self.seed_dir(seed) / defense.name
        final = folder / "model.safetensors"
        base = task.defense_model(self.base_model(task, seed))  # e.g. with fresh LoRA adapters
        if final.exists():
            load_model(final, base)
            return base
        torch.manual_seed(defense_seed(seed, defense.name))
        trainer = Trainer(
            base,
            task.io,
            fill_sites(defense, task),
            self.config.training,
            device=self.device,
            checkpoint=folder / "checkpoint.safetensors",
            log=self.log.writer(f"seed-{seed}/{defense.name}"),
            progress=self.config.progress,
            description=f"seed {seed} {defense.name}",
        )
        result = trainer.fit(task.defense_loader(self.config.batch_size))
        trainer.save_model(final, {"seed": seed, "defense": defense.name})  # every process (FSDP2 gathers)
        if is_main_process():
            calibration = {
                site: {"mean_norm": result.unit_sizes.get(site, 0.0), "epsilon_abs": radius}
                for site, radius in result.radii.items()
            }
            atomic_write_json(
                folder / "train.json",
                {
                    "seconds": result.seconds,
                    "steps": result.steps,
                    "skipped": result.skipped,
                    "processes": trainer.accelerator.num_processes,
                    "calibration": calibration,
                },
            )
            (folder / "checkpoint.safetensors").unlink(missing_ok=True)
        wait_for_everyone()
        if trainer.sharded:  # as in base_model: the whole weights, loaded from the file just written
            return self.train_defense(task, seed, defense)
        return base

    def train(self) -> None:
        for seed in self.config.seeds:
            task = self.task(seed)
            for defense in self.config.defenses:
                self.train_defense(task, seed, defense)

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, *, force: bool = False) -> None:
        for seed in self.config.seeds:
            task = self.task(seed)
            for defense in self.config.defenses:
                self.evaluate_defense(task, seed, defense, force=force)

    def evaluate_defense(self, task: Task, seed: int, defense: DefenseSpec, *, force: bool = False) -> None:
        """One sweep point: train (or load) a defense's model and write its ``eval.json``."""
        out = self.seed_dir(seed) / defense.name / "eval.json"
        if out.exists() and not force:
            self._complete_evaluation(task, seed, defense, out)
            return
        model = self.train_defense(task, seed, defense)
        evaluation = evaluate(model, task, self.config.evaluation, defense, seed)
        atomic_write_json(out, asdict(evaluation))
        self.log.write({"phase": f"seed-{seed}/{defense.name}/eval", **_numbers(evaluation.metrics)})

    def _complete_evaluation(self, task: Task, seed: int, defense: DefenseSpec, out: Path) -> None:
        """Runs only the held-out attacks added to the config since ``out`` was written."""
        saved = read_json(out)
        if not missing_heldout(task, saved):
            return
        model = self.train_defense(task, seed, defense)
        completed = complete_evaluation(model, task, saved, seed)
        atomic_write_json(out, completed)
        self.log.write({"phase": f"seed-{seed}/{defense.name}/eval", **_numbers(completed["metrics"])})

    # -- results -------------------------------------------------------------------------------------------
    def results(self) -> Results:
        cfg = self.config
        task = self.task(cfg.seeds[0])
        records, phase = [], {"base": 0.0, "defenses": 0.0, "eval": 0.0}
        radii: dict[str, dict[str, float]] = {}
        for seed in cfg.seeds:
            phase["base"] += read_json(self.seed_dir(seed) / "base.json")["seconds"]
            for defense in cfg.defenses:
                folder = self.seed_dir(seed) / defense.name
                train = read_json(folder / "train.json")
                evaluation = read_json(folder / "eval.json")
                phase["defenses"] += train["seconds"]
                phase["eval"] += evaluation["seconds"]
                radii.setdefault(defense.name, train["calibration"])
                records.append(
                    Record(
                        seed=seed,
                        defense=defense.name,
                        kind=defense.kind,
                        sites=fill_sites(defense, task).sites,
                        epsilon=defense.threat.epsilon if isinstance(defense.threat, Threat) else None,
                        by_layer=defense.defense.by_layer,
                        metrics=evaluation["metrics"],
                        calibration={**train["calibration"], **evaluation["calibration"]},
                        sanity=evaluation["sanity"],
                        heldout_details=evaluation.get("details", {}),
                        seconds={"train": train["seconds"], "eval": evaluation["seconds"]},
                    )
                )
        phase["total"] = sum(phase.values())
        return Results(
            name=cfg.name,
            task=cfg.task["kind"],
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            seeds=cfg.seeds,
            provenance=read_json(self.run_dir / "provenance.json"),
            trojans=[
                Trojan(name=t.name, description=t.description, distance=t.distance) for t in task.trojans()
            ],
            training_threats=self._training_threats(task, radii),
            input_budgets=self._input_budgets(),
            heldout_threats=self._heldout_threats(task),
            metrics=self._metric_table(task),
            defense_order=[d.name for d in cfg.defenses],
            layer_order=self.layer_order(task),
            records=records,
            phase_seconds=phase,
        )

    def _training_threats(self, task: Task, radii: dict[str, dict[str, float]]) -> list[TrainingThreat]:
        threats = []
        for defense in self.config.defenses:
            spec = fill_sites(defense, task)
            resolved = {site: v["epsilon_abs"] for site, v in radii.get(defense.name, {}).items()}
            threats.append(TrainingThreat(defense=defense.name, description=spec.describe(resolved)))
        return threats

    def _input_budgets(self) -> list[TrainingBudget]:
        """The absolute input-space budgets defenses trained on (what a trojan's distance compares with)."""
        budgets = []
        for defense in self.config.defenses:
            sites = defense.sites or ([self.input_site] if defense.defense.perturbs else [])
            if not defense.defense.learns_threat or not any(
                self.same_site(s, self.input_site) for s in sites
            ):
                continue
            threat = defense.threat_at(next(s for s in sites if self.same_site(s, self.input_site)))
            if threat.epsilon_mode == "absolute":
                budgets.append(TrainingBudget(defense=defense.name, norm=threat.norm, epsilon=threat.epsilon))
        return budgets

    def _seen_by(self, site: str, norm: str | None) -> list[str]:
        """Defenses whose training threat had this site (and norm, when the attack has one)."""
        seen = []
        for defense in self.config.defenses:
            if not defense.defense.learns_threat or defense.threat is None:
                continue
            sites = defense.sites or [self.input_site]
            match = next((s for s in sites if self.same_site(s, site)), None)
            if match is not None and (norm is None or norm == defense.threat_at(match).norm):
                seen.append(defense.name)
        return seen

    def same_site(self, a: str, b: str) -> bool:
        """Whether two sites (names or aliases such as ``block:50%``) are the same module."""
        return a == b or self.canonical(a) == self.canonical(b)

    def canonical(self, site: str) -> str:
        """The module name a site stands for (aliases resolved on the model, built once if any is used)."""
        return self._alias_modules.get(site, site)

    @functools.cached_property
    def _alias_modules(self) -> dict[str, str]:
        cfg = self.config
        sites = {self.input_site, *cfg.evaluation.latent_layers}
        sites |= {site for d in cfg.defenses for site in d.sites}
        sites |= {a.site for a in self._task.heldout_attacks()}
        aliases = sorted(site for site in sites if is_alias(site))
        if not aliases:
            return {}
        with torch.random.fork_rng(devices=[]):
            model = self._task.build_model()
        found = {}
        for site in aliases:
            try:
                found[site] = module_name(model, site)
            except SiteError:
                continue
        return found

    def layer_order(self, task: Task) -> list[str]:
        """Sites of single-site defenses and latent evaluations by depth, then the task's other layers."""
        cfg = self.config
        used = [d.sites[0] for d in cfg.defenses if len(d.sites) == 1] + list(cfg.evaluation.latent_layers)
        depth = {name: i for i, name in enumerate(task.layers)}
        ordered = sorted(dict.fromkeys(used), key=lambda s: depth.get(self.canonical(s), len(depth)))
        return ordered + [layer for layer in task.layers if layer not in ordered]

    def _heldout(self, task: Task) -> list[tuple[str, str, HeldoutThreat]]:
        """(group, name, threat) of every held-out evaluation: the task's attacks, then latent PGD."""
        threats = [
            (
                "heldout",
                a.name,
                HeldoutThreat(name=a.name, description=a.description, seen_by=self._seen_by(a.site, a.norm)),
            )
            for a in task.heldout_attacks()
        ]
        evaluation = self.config.evaluation
        for layer in evaluation.latent_layers:
            description = (
                f"latentguard latent PGD at {layer}: {evaluation.latent_threat.describe()}, "
                f"{evaluation.latent_pgd.steps} steps, {evaluation.latent_examples} test examples"
            )
            name = f"latent/{layer}"
            threats.append(
                (
                    "latent",
                    layer,
                    HeldoutThreat(name=name, description=description, seen_by=self._seen_by(layer, None)),
                )
            )
        return threats

    def _heldout_threats(self, task: Task) -> list[HeldoutThreat]:
        return [threat for _, _, threat in self._heldout(task)]

    def _metric_table(self, task: Task) -> list[MetricSpec]:
        metrics = [
            MetricSpec(group="clean", name=key, label=key.replace("_", " "))
            for key in task.clean_metric_keys()
        ]
        metrics += [
            MetricSpec(group="trojan", name=t.name, label=f"ASR {t.name}", higher_is_better=False)
            for t in task.trojans()
        ]
        for group, name, threat in self._heldout(task):
            seen = threat.seen_by
            label = threat.name + (f" (seen by {', '.join(seen)})" if seen else "")
            metrics.append(MetricSpec(group=group, name=name, label=label, seen_by=seen))
        return metrics

    def report(self) -> list[Path]:
        results = self.results()
        atomic_write_json(self.run_dir / "results.json", results.model_dump(mode="json"))
        return [self.run_dir / "results.json", *write_report(results, self.run_dir)]


def _numbers(metrics: Metrics) -> dict[str, float]:
    """The measured values of a metrics record as flat ``group/name`` numbers, for the metrics log."""
    return {
        f"{group}/{name}": v
        for group, values in metrics.items()
        for name, v in values.items()
        if isinstance(v, (int, float))
    }


def run(
    config: RunConfig, run_dir: Path | None = None, *, resume: bool = False, train_only: bool = False
) -> Path:
    """The whole pipeline; returns the run folder."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    preflight(config)
    process_device(resolve_device(config.device))  # joins the launcher's processes (if any) on that device
    if resume:
        assert run_dir is not None
    else:
        run_dir = _start_everywhere(config, run_dir)
    pipeline = Pipeline(config, run_dir)
    try:
        _train_evaluate_report(pipeline, train_only=train_only)
        if is_main_process():
            pipeline.log.write({"phase": "run", "wall_seconds": time.perf_counter() - start})
    finally:
        pipeline.log.close()
    return run_dir


def _start_everywhere(config: RunConfig, run_dir: Path | None) -> Path:
    """The main process creates the run folder; every process learns its name."""
    made: Path | None = None
    try:
        if is_main_process():
            made = start_run(config, run_dir)
    finally:
        made = from_main(made)  # also when the main process failed, so the others do not wait forever
    if made is None:
        raise ConfigError("the main process could not create the run folder (its error says why)")
    return made


def _train_evaluate_report(pipeline: Pipeline, *, train_only: bool = False, force: bool = False) -> None:
    """Alone, each model is evaluated right after training (results land unit by unit); under a launcher
    all processes train everything together, then the main process evaluates and reports alone."""
    if train_only or num_processes() > 1:
        pipeline.train()
    if not train_only and is_main_process():
        pipeline.evaluate(force=force)
        pipeline.report()


def reevaluate(run_dir: Path) -> Path:
    """Evaluate a run folder's trained models again and rewrite its report."""
    pipeline = Pipeline(resume_config(run_dir), run_dir)
    _train_evaluate_report(pipeline, force=True)
    return run_dir
