"""One small mechanism for every open set of kinds: name → factory, built-ins and plugins alike.

Tasks, image models and datasets, trojan triggers, held-out attacks and defenses each have a
:class:`Registry`. The built-in kinds register through :meth:`Registry.register` exactly as user code does::

    from latentguard.registry import IMAGE_TRIGGERS

    @IMAGE_TRIGGERS.register("quadrant")
    class QuadrantShift(BaseModel):
        kind: Literal["quadrant"] = "quadrant"
        amount: float = 0.3
        def apply(self, images): ...

A config names a kind by its registered name, or by import path (``"my_pkg.triggers:quadrant_shift"``),
which loads the object without any registration. User modules that register kinds are imported with
``plugins: [my_pkg.plugins]`` in a config or ``--plugin MODULE`` on the command line.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

from latentguard.errors import ConfigError

T = TypeVar("T")


def is_import_path(name: str) -> bool:
    """``"package.module:attribute"``: a kind given by where it lives rather than by a registered name."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr and all(part.isidentifier() for part in module.split(".")))


def load_object(path: str, where: str) -> Any:
    """The object at ``"package.module:attribute"`` (dotted attributes allowed); errors name ``where``."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({exc})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


class Registry(Generic[T]):
    """Named kinds of one sort (e.g. image triggers). ``what`` names the sort in error messages."""

    def __init__(self, what: str, *, load: Iterable[str] = ()) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._load = tuple(load)  # modules whose import registers the built-in kinds (lazily, once)
        self._loaded = False

    def register(self, name: str, entry: T | None = None, *, replace: bool = False) -> Any:
        """Register ``entry`` under ``name``; without ``entry``, a decorator that registers what it wraps."""
        if entry is None:
            return lambda wrapped: self.register(name, wrapped, replace=replace)
        if not name or is_import_path(name):
            raise ValueError(f"{self.what}: {name!r} is not a valid kind name (no ':' allowed)")
        if name in self._entries and not replace and self._entries[name] != entry:
            raise ValueError(f"{self.what} {name!r} is already registered (pass replace=True to override)")
        self._entries[name] = entry
        return entry

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._load:
                importlib.import_module(module)

    def entries(self) -> dict[str, T]:
        """Every registered name and entry (a copy)."""
        self._ensure_loaded()
        return dict(self._entries)

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def get(self, name: str, where: str = "kind") -> T:
        """The entry registered as ``name``, or loaded from an import path; a one-line error otherwise."""
        self._ensure_loaded()
        if name in self._entries:
            return self._entries[name]
        if is_import_path(name):
            return load_object(name, where)
        close = difflib.get_close_matches(name, self._entries, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{where}: unknown {self.what} {name!r}{hint}; registered: {', '.join(self.names())}, "
            "or an import path 'package.module:name'"
        )


def load_plugins(modules: Iterable[str], where: str = "plugins") -> None:
    """Import user modules that register kinds; the current folder is importable, as for ``python -m``."""
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{where}: cannot import plugin module {name!r} ({exc})") from None


def check_keywords(function: Callable[..., Any], params: dict[str, Any], where: str, skip: int = 0) -> None:
    """Fail with one line when ``function`` cannot take ``params`` as keywords after ``skip`` positionals."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin without a signature: let the call decide
    try:
        signature.bind_partial(*([None] * skip), **params)
    except TypeError as exc:
        name = getattr(function, "__qualname__", repr(function))
        raise ConfigError(f"{where}: {name} does not take these settings ({exc})") from None


def build_kind(
    registry: Registry[Any],
    kind: str,
    params: dict[str, Any],
    where: str,
    wrap_function: Callable[[Callable[..., Any], dict[str, Any]], Any],
    *,
    positional: int = 1,
) -> Any:
    """An object of ``kind`` with ``params``: a registered pydantic model is validated, a plain callable is
    wrapped with the params as its keyword arguments. Problems are ``ValueError`` (for use inside pydantic
    validators, which then name the config field)."""
    from pydantic import BaseModel, ValidationError

    try:
        entry = registry.get(kind, where)
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix(f"{where}: ")) from None
    if isinstance(entry, type) and issubclass(entry, BaseModel):
        data = {"kind": kind, **params} if "kind" in entry.model_fields else params
        try:
            return entry.model_validate(data)
        except ValidationError as exc:
            from latentguard.config import format_validation_error

            raise ValueError(format_validation_error(exc, prefix=f"{kind}")) from None
    if callable(entry):
        try:
            check_keywords(entry, params, kind, skip=positional)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return wrap_function(entry, params)
    raise ValueError(f"{kind!r} is neither a pydantic model nor a callable")


TASKS: Registry[Any] = Registry("task", load=("latentguard.domains.builtin",))
DEFENSES: Registry[Any] = Registry("defense", load=("latentguard.defenses",))
IMAGE_MODELS: Registry[Any] = Registry("image model", load=("latentguard.domains.image",))
IMAGE_DATASETS: Registry[Any] = Registry("image dataset", load=("latentguard.domains.image",))
IMAGE_TRIGGERS: Registry[Any] = Registry("image trigger", load=("latentguard.domains.image",))
IMAGE_ATTACKS: Registry[Any] = Registry("image attack", load=("latentguard.domains.image",))
TEXT_CLS_TRIGGERS: Registry[Any] = Registry(
    "text classification trigger", load=("latentguard.domains.text_cls",)
)
TEXT_CLS_ATTACKS: Registry[Any] = Registry(
    "text classification attack", load=("latentguard.domains.text_cls",)
)
TEXT_GEN_TRIGGERS: Registry[Any] = Registry("text generation trigger", load=("latentguard.domains.text_gen",))
TEXT_GEN_ATTACKS: Registry[Any] = Registry("text generation attack", load=("latentguard.domains.text_gen",))
