"""What each saved unit of a run came from, so that ``--resume`` never mixes numbers of two configs.

Every unit records the exact config section it was made from, and a hash of it:

- the base model (``seed-N/base.safetensors``): the task section, the batch size, the mixed precision and
  the seed;
- a defense (``seed-N/<defense>/model.safetensors``): the base model's hash, the defense's spec and the
  training section;
- an evaluation (``seed-N/<defense>/eval.json``): the model's hash and the evaluation section, plus one hash
  per held-out attack spec, so that adding or editing one attack re-runs that attack alone.

A unit's hash contains the hash of what it was built on, so a change upstream reaches everything
downstream. Settings that cannot change a number (how often to log or checkpoint, threads, progress bars,
device) are left out. A unit saved before fingerprints existed records none and is taken as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from latentguard.config import DefenseSpec, RunConfig
from latentguard.errors import ConfigError

# TrainConfig fields that change no weight: a resumed run with other values gives the same model.
BOOKKEEPING = {"log_every", "eval_every", "checkpoint_every"}
DIGEST_LENGTH = 16


def digest(section: Any) -> str:
    text = json.dumps(section, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_LENGTH]


@dataclass(frozen=True)
class Fingerprint:
    """A config section and its hash; ``attack_specs`` (evaluations only): each held-out attack's spec,
    hashed one by one so that an edited or added attack re-runs alone."""

    section: dict[str, Any]
    attack_specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def attacks(self) -> dict[str, str]:
        return {name: digest(spec) for name, spec in self.attack_specs.items()}

    @property
    def hash(self) -> str:
        return digest(self.section)

    def record(self) -> dict[str, Any]:
        """The JSON stored with the unit."""
        out: dict[str, Any] = {"hash": self.hash, "section": self.section}
        if self.attack_specs:
            out["attacks"] = self.attacks
            out["attack_specs"] = self.attack_specs
        return out


def base_fingerprint(config: RunConfig, seed: int) -> Fingerprint:
    return Fingerprint(
        {
            "task": config.task,
            "batch_size": config.batch_size,
            "mixed_precision": config.training.mixed_precision,
            "seed": seed,
        }
    )


def defense_fingerprint(config: RunConfig, seed: int, defense: DefenseSpec) -> Fingerprint:
    return Fingerprint(
        {
            "base": base_fingerprint(config, seed).hash,
            "defense": defense.model_dump(mode="json"),
            "training": config.training.model_dump(mode="json", exclude=BOOKKEEPING),
        }
    )


def evaluation_fingerprint(config: RunConfig, seed: int, defense: DefenseSpec) -> Fingerprint:
    evaluation = config.evaluation
    return Fingerprint(
        {
            "model": defense_fingerprint(config, seed, defense).hash,
            "evaluation": evaluation.model_dump(mode="json", exclude={"attacks", "implant_threshold"}),
        },
        attack_specs={str(spec.get("name")): spec for spec in evaluation.attacks},
    )


def changes(old: Any, new: Any, where: str = "") -> list[str]:
    """What differs between two sections, as ``path: old → new`` (a nested unit's hash as its name)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            path = f"{where}.{key}" if where else str(key)
            if key in ("base", "model") and not where and old.get(key) != new.get(key):
                found.append(f"the {'base model' if key == 'base' else 'trained model'} it was built on")
            elif old.get(key, "<unset>") != new.get(key, "<unset>"):
                found += changes(old.get(key, "<unset>"), new.get(key, "<unset>"), path)
        return found
    if old == new:
        return []
    return [f"{where or 'config'}: {_short(old)} → {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def stored_weights_record(path: Path) -> dict[str, Any] | None:
    """The fingerprint in a weights file's or checkpoint's metadata; ``None`` when it records none."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        metadata = json.loads(header.get("latentguard", "{}"))
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged file: loading it names the problem
    record = metadata.get("fingerprint") if isinstance(metadata, dict) else None
    return record if isinstance(record, dict) else None


class StaleUnits:
    """Decides, unit by unit, whether saved work still fits the config; notes or refuses what does not."""

    def __init__(self, run_dir: Path, *, strict: bool, note: Callable[[str], None]) -> None:
        self.run_dir = run_dir
        self.strict = strict
        self.note = note

    def name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.run_dir))
        except ValueError:
            return str(path)

    def mismatch(self, stored: Mapping[str, Any] | None, fingerprint: Fingerprint) -> list[str] | None:
        """``None`` when ``stored`` fits (or is absent: a unit older than fingerprints), else what changed."""
        if not stored or "hash" not in stored or stored["hash"] == fingerprint.hash:
            return None
        old = stored.get("section")
        found = changes(old, fingerprint.section) if isinstance(old, Mapping) else []
        return found or ["its config section"]

    def attack_changes(self, stored: Mapping[str, Any], fingerprint: Fingerprint) -> dict[str, list[str]]:
        """Held-out attacks whose spec changed since ``stored`` was written: name → what changed."""
        old_hashes, old_specs = stored.get("attacks") or {}, stored.get("attack_specs") or {}
        found: dict[str, list[str]] = {}
        for name, new in fingerprint.attack_specs.items():
            if name in old_hashes and old_hashes[name] != digest(new):
                old = old_specs.get(name)
                what = changes(old, new, f"evaluation.attacks.{name}") if isinstance(old, Mapping) else []
                found[name] = what or [f"evaluation.attacks.{name}"]
        return found

    def refuse_or_note(self, unit: Path, what: list[str], consequence: str = "re-running it") -> None:
        """Under ``strict`` a ``ConfigError`` naming the change; else one line saying what is redone."""
        shown = "; ".join(what[:3]) + (f"; and {len(what) - 3} more" if len(what) > 3 else "")
        if self.strict:
            raise ConfigError(
                f"{self.name(unit)} was made with another config ({shown}); --strict-resume refuses to mix "
                "them: resume without --strict-resume to redo it and what depends on it, or undo the edit"
            )
        self.note(f"{self.name(unit)}: config changed since it was made ({shown}); {consequence}")

    def weights_fit(self, weights: Path, fingerprint: Fingerprint) -> bool:
        """Whether finished weights (or a checkpoint) at ``weights`` were made with this config."""
        what = self.mismatch(stored_weights_record(weights), fingerprint)
        if what is None:
            return True
        self.refuse_or_note(weights, what)
        return False


def remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def valid_record(data: Any, required: Mapping[str, type | tuple[type, ...]]) -> bool:
    """Whether a JSON record holds every required key with a value of the expected type."""
    return isinstance(data, dict) and all(isinstance(data.get(k), t) for k, t in required.items())


BASE_RECORD: dict[str, type | tuple[type, ...]] = {"seconds": (int, float), "steps": int}
TRAIN_RECORD: dict[str, type | tuple[type, ...]] = {**BASE_RECORD, "calibration": dict}
EVAL_RECORD: dict[str, type | tuple[type, ...]] = {
    "metrics": dict,
    "sanity": dict,
    "calibration": dict,
    "seconds": (int, float),
}


def scan(config: RunConfig, run_dir: Path) -> list[str]:
    """Every saved unit of ``run_dir`` made with another config than ``config``, as ``unit (what changed)``.

    Reads only metadata and JSON records; changes nothing (``--strict-resume`` refuses when any is found).
    """
    units = StaleUnits(run_dir, strict=False, note=lambda _: None)
    found: list[str] = []

    def check(path: Path, stored: Mapping[str, Any] | None, fingerprint: Fingerprint) -> None:
        what = units.mismatch(stored, fingerprint)
        if what is not None:
            found.append(f"{units.name(path)} ({'; '.join(what[:3])})")

    for seed in config.seeds:
        folder = run_dir / f"seed-{seed}"
        weights = [(folder / f"base{suffix}", base_fingerprint(config, seed)) for suffix in WEIGHT_SUFFIXES]
        for defense in config.defenses:
            fingerprint = defense_fingerprint(config, seed, defense)
            weights += [(folder / defense.name / name, fingerprint) for name in DEFENSE_FILES]
        for path, fingerprint in weights:
            if path.exists():
                check(path, stored_weights_record(path), fingerprint)
        for defense in config.defenses:
            path = folder / defense.name / "eval.json"
            stored = _json_or_none(path)
            record = stored.get("fingerprint") if isinstance(stored, dict) else None
            if not isinstance(record, dict):
                continue
            fingerprint = evaluation_fingerprint(config, seed, defense)
            check(path, record, fingerprint)
            edited = units.attack_changes(record, fingerprint)
            if edited and record.get("hash") == fingerprint.hash:
                what = [change for changes_ in edited.values() for change in changes_]
                found.append(f"{units.name(path)} ({'; '.join(what[:3])})")
    return found


WEIGHT_SUFFIXES = (".safetensors", ".checkpoint.safetensors")
DEFENSE_FILES = ("model.safetensors", "checkpoint.safetensors")


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
