"""Checks on config text and values that pydantic does not make: duplicate YAML keys, non-finite numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, RootModel

from latentguard.errors import ConfigError


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (YAML would silently keep the last one)."""

    def __init__(self, key: Any, first_line: int, second_line: int) -> None:
        super().__init__(f"duplicate key {key!r} (lines {first_line} and {second_line})")
        self.key, self.first_line, self.second_line = key, first_line, second_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, refusing duplicate keys (``DuplicateKeyError``)."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def nonfinite_fields(value: Any, where: str = "") -> list[tuple[str, float]]:
    """(dotted path, value) of every NaN or infinite float in ``value`` (mappings, lists, pydantic models)."""
    if isinstance(value, RootModel):
        value = value.root
    if isinstance(value, BaseModel):
        value = dict(value)
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(where or "config", value)]
    found: list[tuple[str, float]] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            found += nonfinite_fields(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found += nonfinite_fields(item, f"{where}.{index}" if where else str(index))
    return found


def reject_nonfinite(value: Any, where: str = "") -> None:
    """A ``ConfigError`` naming the first NaN or infinite number in ``value`` (and how many others)."""
    bad = nonfinite_fields(value, where)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        path, number = bad[0]
        raise ConfigError(f"{path}: must be a finite number (got {number}){more}")
