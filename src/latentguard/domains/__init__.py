"""Task adapters, one folder per domain, looked up by the config's ``task.kind``."""

from __future__ import annotations

import importlib
from typing import Any

from latentguard.domains.base import Task
from latentguard.errors import ConfigError

TASKS: dict[str, str] = {
    "image_cls": "latentguard.domains.image.task:ImageTask",
    "text_cls": "latentguard.domains.text_cls.task:TextClassificationTask",
    "text_gen": "latentguard.domains.text_gen.task:TextGenerationTask",
}


def task_class(kind: str) -> type[Task]:
    if kind not in TASKS:
        raise ConfigError(f"task.kind: unknown task {kind!r}; expected one of {', '.join(sorted(TASKS))}")
    module, _, name = TASKS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def build_task(section: dict[str, Any], attacks: list[dict[str, Any]], seed: int, device: Any) -> Task:
    """Validate the task section and held-out attacks with the domain's models and build the task."""
    cls = task_class(section["kind"])
    return cls.from_config(section, attacks, seed=seed, device=device)
