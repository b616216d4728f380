"""Task adapters, one folder per domain, looked up by the config's ``task.kind`` in ``registry.TASKS``.

A user's task registers the same way: ``TASKS.register("my_task", MyTask)`` in a plugin module, or
``kind: "my_pkg.tasks:MyTask"`` in the config with no registration at all.
"""

from __future__ import annotations

from typing import Any

from latentguard.domains.base import Task
from latentguard.errors import ConfigError
from latentguard.registry import TASKS, load_object


def task_class(kind: str) -> type[Task]:
    entry = TASKS.get(kind, "task.kind")
    if isinstance(entry, str):  # a built-in registered by import path: its libraries load only now
        entry = load_object(entry, "task.kind")
    if not hasattr(entry, "from_config"):
        raise ConfigError(f"task.kind: {kind!r} is not a task (it has no from_config)")
    return entry


def build_task(section: dict[str, Any], attacks: list[dict[str, Any]], seed: int, device: Any) -> Task:
    """Validate the task section and held-out attacks with the domain's models and build the task."""
    cls = task_class(section["kind"])
    return cls.from_config(section, attacks, seed=seed, device=device)
