"""Image data sources: Fashion-MNIST (the default), a folder of images in class subfolders, an ``.npz`` file
of arrays, or any registered or importable function that returns an :class:`ImageData`.

Every source gives float images ``(N, C, H, W)`` in [0, 1] and int64 labels; channels, size and class count
come from the data. A source without its own test split gets one carved off with a fixed generator, so every
seed is tested on the same images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentguard.domains.image.data import CLASS_NAMES, DEFAULT_DATA_DIR, load_fashion_mnist
from latentguard.errors import DataError
from latentguard.registry import IMAGE_DATASETS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEST_SHARE = 0.2  # the share held out as the test split when a source has none


@dataclass(frozen=True)
class ImageData:
    """A training pool and a test split, with a name per class index."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        for split, images, labels in (
            ("train", self.train_images, self.train_labels),
            ("test", self.test_images, self.test_labels),
        ):
            if images.ndim != 4 or labels.shape != (images.shape[0],):
                raise DataError(
                    f"image data: {split} images must be (N, C, H, W) with N labels, got "
                    f"{tuple(images.shape)} and {tuple(labels.shape)}"
                )
            if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
                raise DataError(f"image data: {split} pixels must lie in [0, 1]")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
                raise DataError(f"image data: {split} labels must be 0..{len(self.class_names) - 1}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(
                f"image data: train images are {tuple(self.train_images.shape[1:])}, test images "
                f"{tuple(self.test_images.shape[1:])}"
            )

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@IMAGE_DATASETS.register("fashion-mnist")
def fashion_mnist(data_dir: Path = DEFAULT_DATA_DIR) -> ImageData:
    """Fashion-MNIST from the Debian package (60k training, 10k test, 28×28 grey, 10 classes)."""
    train_images, train_labels = load_fashion_mnist(data_dir, "train")
    test_images, test_labels = load_fashion_mnist(data_dir, "test")
    return ImageData(train_images, train_labels, test_images, test_labels, CLASS_NAMES)


def _split_off_test(images: Tensor, labels: Tensor, names: tuple[str, ...]) -> ImageData:
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(0))
    test = max(1, round(TEST_SHARE * labels.shape[0]))
    return ImageData(
        images[order[test:]], labels[order[test:]], images[order[:test]], labels[order[:test]], names
    )


def _read_class_folders(root: Path, names: tuple[str, ...] | None = None) -> tuple[Tensor, Tensor, tuple]:
    """Every image under ``root/<class>/``; class indices follow sorted folder names."""
    from PIL import Image, UnidentifiedImageError

    names = names or tuple(
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    )
    if len(names) < 2:
        raise DataError(f"{root}: expected one subfolder per class (at least 2), found {len(names)}")
    arrays, labels, shape = [], [], None
    pictures = []
    for index, name in enumerate(names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{root / name}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as image:
                    pictures.append(
                        (path, image.convert("RGBA" if image.mode in ("P", "LA") else image.mode))
                    )
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
            labels.append(index)
    grey = all(image.mode in ("L", "1", "I", "I;16") for _, image in pictures)
    for path, image in pictures:
        array = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
        array = array[None] if grey else array.transpose(2, 0, 1)
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise DataError(
                f"{path}: image of size {array.shape[1:]}, the others are {shape[1:]}; resize them"
            )
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64), names


def image_folder(path: Path) -> ImageData:
    """``path/<class>/*.png`` (a test split carved off), or ``path/{train,test}/<class>/``."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        train_images, train_labels, names = _read_class_folders(path / "train")
        test_images, test_labels, _ = _read_class_folders(path / "test", names)
        return ImageData(train_images, train_labels, test_images, test_labels, names)
    images, labels, names = _read_class_folders(path)
    return _split_off_test(images, labels, names)


def _as_images(array: np.ndarray, path: Path, key: str) -> Tensor:
    """uint8 (0..255) or float (0..1) arrays of shape N×H×W, N×H×W×C (C ≤ 4) or N×C×H×W."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 4:
        raise DataError(f"{path}: array {key!r} has shape {array.shape}, expected N×H×W or N×H×W×C")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / scale)


def npz_arrays(path: Path) -> ImageData:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test`` (or ``images, labels``: a test split is carved
    off), and optionally ``class_names``."""
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    names = tuple(str(n) for n in arrays["class_names"]) if "class_names" in arrays else None

    def labels_of(key: str) -> Tensor:
        return torch.from_numpy(np.asarray(arrays[key]).astype(np.int64).reshape(-1))

    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        train_labels, test_labels = labels_of("y_train"), labels_of("y_test")
        count = int(max(train_labels.max(), test_labels.max())) + 1
        names = names or tuple(str(i) for i in range(count))
        return ImageData(
            _as_images(arrays["x_train"], path, "x_train"),
            train_labels,
            _as_images(arrays["x_test"], path, "x_test"),
            test_labels,
            names,
        )
    if {"images", "labels"} <= arrays.keys():
        labels = labels_of("labels")
        names = names or tuple(str(i) for i in range(int(labels.max()) + 1))
        return _split_off_test(_as_images(arrays["images"], path, "images"), labels, names)
    raise DataError(
        f"{path}: expected arrays x_train, y_train, x_test, y_test (or images, labels); found "
        f"{', '.join(sorted(arrays)) or 'none'}"
    )


@functools.lru_cache(maxsize=4)
def load_image_data(source: str, data_dir: Path, kwargs: tuple[tuple[str, Any], ...] = ()) -> ImageData:
    """The data named by ``task.data``: a registered source or import path, a folder, or an ``.npz`` file.
    Cached: every seed and every stage of a run shares one copy."""
    if source in IMAGE_DATASETS or ":" in source:
        factory = IMAGE_DATASETS.get(source, "task.data")
        options = dict(kwargs)
        if source == "fashion-mnist":
            options.setdefault("data_dir", data_dir)
        data = factory(**options)
        if not isinstance(data, ImageData):
            raise DataError(f"task.data: {source!r} returned {type(data).__name__}, expected an ImageData")
        return data
    path = Path(source).expanduser()
    if path.is_dir():
        return image_folder(path)
    if path.suffix == ".npz" and path.is_file():
        return npz_arrays(path)
    raise DataError(
        f"task.data: {source!r} is neither a registered dataset ({', '.join(IMAGE_DATASETS.names())}), "
        "an import path, an image folder nor an .npz file"
    )
