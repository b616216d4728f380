"""Run folders: atomic writes, provenance (config, versions, git commit) and safetensors checkpoints."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from latentguard.errors import CheckpointError
from latentguard.storage import storage_errno

TRACKED_PACKAGES = (
    "torch",
    "numpy",
    "pydantic",
    "safetensors",
    "torchattacks",
    "transformers",
    "latentguard",
)


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` to write; on success it is fsynced and renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            yield tmp
        except SafetensorError as exc:  # safetensors reports a full disk only in its message
            code = storage_errno(exc)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(path)) from exc
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either the old file or the complete new one, never a torn write."""
    with _atomic_target(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file written by latentguard; a torn or foreign file is a ``CheckpointError``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the latentguard checkout in use, or ``None`` when it is not a git checkout."""
    where = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def provenance() -> dict[str, Any]:
    return {"git_commit": git_commit(), "versions": versions(), "command": " ".join(sys.argv)}


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> None:
    """Save tensors as safetensors atomically; ``metadata`` travels as JSON in the file header.

    Tensors sharing memory (tied input and output embeddings) are stored as separate copies.
    """
    flat: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in tensors.items():
        tensor = value.detach().contiguous().cpu()
        storage = tensor.untyped_storage().data_ptr()
        flat[key] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    with _atomic_target(path) as tmp:
        save_file(flat, tmp, metadata={"latentguard": json.dumps(metadata or {})})


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its latentguard metadata; anything else is refused, never unpickled."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        metadata = json.loads(header.get("latentguard", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint ({exc})") from exc
    return tensors, metadata


def save_model(path: Path, model: torch.nn.Module, metadata: dict[str, Any] | None = None) -> None:
    save_tensors(path, dict(model.state_dict()), metadata)


def load_model(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights saved by ``save_model`` into ``model``; returns the stored metadata."""
    tensors, metadata = load_tensors(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model ({first})") from exc
    return metadata


class MetricLog:
    """Step-by-step metrics as JSON lines, and to TensorBoard when asked."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, Any] = {}
        self.tensorboard_dir = tensorboard_dir
        if tensorboard_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                from latentguard.errors import ConfigError

                raise ConfigError(
                    "tensorboard: true needs the tensorboard package (pip install 'latentguard[tensorboard]')"
                ) from None

    def writer(self, tag: str) -> Callable[[dict[str, Any]], None]:
        """A logger bound to one phase (e.g. ``seed-0/lat``)."""

        def log(record: dict[str, Any]) -> None:
            self.write({"phase": tag, **record})

        return log

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard_dir is None:
            return
        tag = str(record.get("phase", "run"))
        if tag not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[tag] = SummaryWriter(str(self.tensorboard_dir / tag))
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key not in ("phase", "step") and isinstance(value, (int, float)):
                self._writers[tag].add_scalar(key, value, step)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
