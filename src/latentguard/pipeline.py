"""implant → defenses → evaluation → report, over seeds, resumable at every stage.

Each unit of work (a seed's base model, a defense's training, an evaluation) writes its output atomically
in the run folder when it finishes; a rerun with ``--resume`` skips finished units and continues an
unfinished training from its last checkpoint.

Under ``accelerate launch`` every process trains each unit together; only the main process writes the run
folder, and it evaluates and reports alone once everything is trained (the other processes then exit).
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import sys
import time
import zlib
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
from latentguard.errors import CheckpointError, ConfigError, SiteError
from latentguard.evaluate import complete_evaluation, evaluate, missing_heldout
from latentguard.fingerprint import (
    BASE_RECORD,
    EVAL_RECORD,
    TRAIN_RECORD,
    Fingerprint,
    StaleUnits,
    base_fingerprint,
    defense_fingerprint,
    evaluation_fingerprint,
    remove,
    scan,
    valid_record,
)
from latentguard.lock import run_lock
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
from latentguard.signals import interruptible
from latentguard.storage import storage_errors

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
        self.units = StaleUnits(run_dir, strict=False, note=note)  # run() sets strict for --strict-resume
        self.stage = "starting"  # where an interrupted run stopped, for its message

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
        checkpoint = self.seed_dir(seed) / "base.checkpoint.safetensors"
        torch.manual_seed(seed)
        model = task.build_model().to(self.device)
        fingerprint = base_fingerprint(self.config, seed)
        if self._unit_done(path, self.seed_dir(seed) / "base.json", fingerprint, BASE_RECORD, checkpoint):
            load_model(path, model)
            return model
        self.stage = f"seed {seed}: training the base model (implanting the trojans)"
        # Accelerate fixes mixed precision once per process: the base model trains as the defenses do; it
        # checkpoints as they do unless the task sets its own interval.
        settings = task.base_training(self.config.batch_size)
        update: dict[str, Any] = {"mixed_precision": self.config.training.mixed_precision}
        if not settings.checkpoint_every:
            update["checkpoint_every"] = self.config.training.checkpoint_every
        trainer = Trainer(
            model,
            task.io,
            DefenseConfig(kind="clean"),
            settings.model_copy(update=update),
            device=self.device,
            checkpoint=checkpoint,
            log=self.log.writer(f"seed-{seed}/base"),
            progress=self.config.progress,
            description=f"seed {seed} implant trojans",
            stamp={"fingerprint": fingerprint.record()},
        )
        result = trainer.fit(task.base_loader(self.config.batch_size))
        stamp = {"seed": seed, "steps": result.steps, "fingerprint": fingerprint.record()}
        trainer.save_model(path, stamp)  # every process (FSDP2 gathers)
        if is_main_process():
            atomic_write_json(
                self.seed_dir(seed) / "base.json",
                {"seconds": result.seconds, "steps": result.steps, "fingerprint": fingerprint.record()},
            )
            checkpoint.unlink(missing_ok=True)
        wait_for_everyone()  # no process may look for the file before it is there
        if trainer.sharded:  # FSDP2 sharded the model in place: go on from the whole saved weights
            return self.base_model(task, seed)
        return model

    def train_defense(self, task: Task, seed: int, defense: DefenseSpec) -> nn.Module:
        folder = self.seed_dir(seed) / defense.name
        final = folder / "model.safetensors"
        base = task.defense_model(self.base_model(task, seed))  # e.g. with fresh LoRA adapters
        fingerprint = defense_fingerprint(self.config, seed, defense)
        checkpoint = folder / "checkpoint.safetensors"
        if self._unit_done(final, folder / "train.json", fingerprint, TRAIN_RECORD, checkpoint):
            load_model(final, base)
            return base
        self.stage = f"seed {seed}: training defense {defense.name}"
        torch.manual_seed(defense_seed(seed, defense.name))
        trainer = Trainer(
            base,
            task.io,
            fill_sites(defense, task),
            self.config.training,
            device=self.device,
            checkpoint=checkpoint,
            log=self.log.writer(f"seed-{seed}/{defense.name}"),
            progress=self.config.progress,
            description=f"seed {seed} {defense.name}",
            stamp={"fingerprint": fingerprint.record()},
        )
        result = trainer.fit(task.defense_loader(self.config.batch_size))
        stamp = {"seed": seed, "defense": defense.name, "fingerprint": fingerprint.record()}
        trainer.save_model(final, stamp)  # every process (FSDP2 gathers)
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
                    "fingerprint": fingerprint.record(),
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
        if (
            out.exists()
            and not force
            and self._trained(seed, defense)
            and self._complete_evaluation(task, seed, defense, out)
        ):
            return
        model = self.train_defense(task, seed, defense)
        self.stage = f"seed {seed}: evaluating {defense.name}"
        evaluation = evaluate(
            model, task, self.config.evaluation, defense, seed, progress=self.config.progress
        )
        fingerprint = evaluation_fingerprint(self.config, seed, defense)
        atomic_write_json(out, {**asdict(evaluation), "fingerprint": fingerprint.record()})
        self.log.write({"phase": f"seed-{seed}/{defense.name}/eval", **_numbers(evaluation.metrics)})

    def _complete_evaluation(self, task: Task, seed: int, defense: DefenseSpec, out: Path) -> bool:
        """Runs only the held-out attacks added to (or edited in) the config since ``out`` was written;
        ``False`` when the saved evaluation cannot be kept (damaged, or its model or settings changed)."""
        fingerprint = evaluation_fingerprint(self.config, seed, defense)
        saved = self._saved_evaluation(out, fingerprint)
        if saved is None:
            return False
        if not missing_heldout(task, saved) and "stale" not in saved:
            return True
        saved.pop("stale", None)
        model = self.train_defense(task, seed, defense)
        self.stage = f"seed {seed}: evaluating {defense.name} (held-out attacks added or edited)"
        bar = f"seed {seed} {defense.name} eval"
        completed = complete_evaluation(
            model, task, saved, seed, progress=self.config.progress, description=bar
        )
        if "fingerprint" in saved:  # a record from before fingerprints stays without one
            completed["fingerprint"] = fingerprint.record()
        atomic_write_json(out, completed)
        self.log.write({"phase": f"seed-{seed}/{defense.name}/eval", **_numbers(completed["metrics"])})
        return True

    def _trained(self, seed: int, defense: DefenseSpec) -> bool:
        """Whether the base model and ``defense``'s model are saved, fit the config and have whole records
        (checked without loading them); what does not is removed, to be redone."""
        folder, base = self.seed_dir(seed) / defense.name, self.seed_dir(seed) / "base"
        return self._unit_done(
            base.with_suffix(".safetensors"),
            base.with_suffix(".json"),
            base_fingerprint(self.config, seed),
            BASE_RECORD,
            base.with_suffix(".checkpoint.safetensors"),
        ) and self._unit_done(
            folder / "model.safetensors",
            folder / "train.json",
            defense_fingerprint(self.config, seed, defense),
            TRAIN_RECORD,
            folder / "checkpoint.safetensors",
        )

    def _saved_evaluation(self, out: Path, fingerprint: Fingerprint) -> dict[str, Any] | None:
        """The saved evaluation with the metrics of attacks edited or removed since dropped (so they run
        again), or ``None`` when it must be redone whole."""
        try:
            saved = read_json(out)
        except CheckpointError:
            saved = None
        if not valid_record(saved, EVAL_RECORD):
            note(f"{self.units.name(out)}: damaged or incomplete record; re-running this evaluation")
            return None
        stored = saved.get("fingerprint")
        changed = self.units.mismatch(stored, fingerprint)
        if changed is not None:
            self.units.refuse_or_note(out, changed, "re-running this evaluation")
            return None
        stored = stored if isinstance(stored, dict) else {}
        edited = self.units.attack_changes(stored, fingerprint)
        removed = [name for name in stored.get("attacks") or {} if name not in fingerprint.attacks]
        if edited:
            what = [change for changes in edited.values() for change in changes]
            self.units.refuse_or_note(out, what, "re-running " + ", ".join(edited))
        for name in [*edited, *removed]:
            saved["metrics"].get("heldout", {}).pop(name, None)
            saved.get("details", {}).pop(name, None)
        if removed:
            saved["stale"] = True  # rewritten without them, even when nothing needs to run
        return saved

    def _unit_done(
        self,
        weights: Path,
        record: Path,
        fingerprint: Fingerprint,
        required: dict[str, Any],
        checkpoint: Path,
    ) -> bool:
        """Whether a unit's saved weights can be used as they are. Weights made with another config, or
        whose record is damaged, are removed (with their checkpoint) so the unit is redone; a checkpoint
        made with another config is removed too. Every process decides alike from the same files; barriers
        are met only when something is removed (the main process evaluates alone, with no one to meet)."""
        if not weights.exists():
            if checkpoint.exists() and not self.units.weights_fit(checkpoint, fingerprint):
                _remove_together(checkpoint)
            return False
        stale = not self.units.weights_fit(weights, fingerprint)
        if not stale:
            try:
                stale = not valid_record(read_json(record), required)
            except CheckpointError:
                stale = True
            if stale:
                unit = self.units.name(weights)
                note(f"{self.units.name(record)}: damaged or missing record; redoing {unit}")
        if stale:
            _remove_together(weights, record, checkpoint)
        return not stale

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
            trojans=self._trojans(task, records),
            training_threats=self._training_threats(task, radii),
            input_budgets=self._input_budgets(),
            heldout_threats=self._heldout_threats(task),
            metrics=self._metric_table(task, records),
            implant_threshold=cfg.evaluation.implant_threshold,
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

    def _undefended_asr(self, records: list[Record]) -> dict[str, float]:
        """Per trojan: the mean ASR of the models that had no defense phase (the implant as it took)."""
        untrained = {d.name for d in self.config.defenses if not d.defense.trains}
        values: dict[str, list[float]] = {}
        for record in records:
            if record.defense in untrained:
                for name, value in record.metrics.get("trojan", {}).items():
                    if value is not None:
                        values.setdefault(name, []).append(value)
        return {name: sum(v) / len(v) for name, v in values.items()}

    def _implanted(self, name: str, records: list[Record]) -> bool | None:
        asr = self._undefended_asr(records).get(name)
        return None if asr is None else asr >= self.config.evaluation.implant_threshold

    def _trojans(self, task: Task, records: list[Record]) -> list[Trojan]:
        asr = self._undefended_asr(records)
        return [
            Trojan(
                name=t.name,
                description=t.description,
                distance=t.distance,
                undefended_asr=asr.get(t.name),
                implanted=self._implanted(t.name, records),
            )
            for t in task.trojans()
        ]

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

    def _metric_table(self, task: Task, records: list[Record]) -> list[MetricSpec]:
        metrics = [
            MetricSpec(group="clean", name=key, label=key.replace("_", " "))
            for key in task.clean_metric_keys()
        ]
        metrics += [
            MetricSpec(
                group="trojan",
                name=t.name,
                label=f"ASR {t.name}" + (" (not implanted)" if implanted is False else ""),
                higher_is_better=False,
                implanted=implanted,
            )
            for t in task.trojans()
            for implanted in [self._implanted(t.name, records)]
        ]
        for group, name, threat in self._heldout(task):
            seen = threat.seen_by
            label = threat.name + (f" (seen by {', '.join(seen)})" if seen else "")
            metrics.append(MetricSpec(group=group, name=name, label=label, seen_by=seen))
        return metrics

    def report(self) -> list[Path]:
        self.stage = "writing the report"
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
    config: RunConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    train_only: bool = False,
    strict_resume: bool = False,
) -> Path:
    """The whole pipeline; returns the run folder. ``strict_resume``: refuse to resume a folder whose saved
    units were made with another config (by default they, and what depends on them, are redone)."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    preflight(config)
    process_device(resolve_device(config.device))  # joins the launcher's processes (if any) on that device
    verb = "train" if train_only else "run"
    pipeline: Pipeline | None = None

    def where() -> tuple[Path | None, str]:
        return run_dir, pipeline.stage if pipeline else "starting"

    with interruptible(where, verb), storage_errors(lambda: run_dir, verb):
        if resume:
            assert run_dir is not None
        else:
            run_dir = _start_everywhere(config, run_dir)
        with _locked(run_dir):
            if resume and strict_resume:
                _refuse_stale(config, run_dir)
            pipeline = Pipeline(config, run_dir)
            pipeline.units.strict = strict_resume
            try:
                _train_evaluate_report(pipeline, train_only=train_only)
                if is_main_process():
                    pipeline.log.write({"phase": "run", "wall_seconds": time.perf_counter() - start})
            finally:
                pipeline.log.close()
    return run_dir


def _locked(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The run folder's lock (main process only: the launcher's other processes work beside it)."""
    if not is_main_process():
        return contextlib.nullcontext()
    return run_lock(run_dir, " ".join(["latentguard", *map(shlex.quote, sys.argv[1:])]))


def _refuse_stale(config: RunConfig, run_dir: Path) -> None:
    stale = scan(config, run_dir)
    if stale:
        shown = "; ".join(stale[:3]) + (f"; and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise ConfigError(
            f"--strict-resume: {len(stale)} saved unit(s) were made with another config: {shown}; resume "
            "without --strict-resume to redo them and what depends on them, or undo the edit"
        )


def _remove_together(*paths: Path) -> None:
    """The main process removes ``paths`` once every process has looked at them; no one goes on before."""
    wait_for_everyone()
    if is_main_process():
        remove(*paths)
    wait_for_everyone()


def note(message: str) -> None:
    """One line on stderr about work the run redoes (main process only)."""
    if is_main_process():
        print(f"latentguard: note: {message}", file=sys.stderr, flush=True)


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
    config = resume_config(run_dir)
    pipeline: Pipeline | None = None

    def where() -> tuple[Path | None, str]:
        return run_dir, pipeline.stage if pipeline else "starting"

    with interruptible(where, "eval"), storage_errors(lambda: run_dir, "eval"), _locked(run_dir):
        pipeline = Pipeline(config, run_dir)
        try:
            _train_evaluate_report(pipeline, force=True)
        finally:
            pipeline.log.close()
    return run_dir
