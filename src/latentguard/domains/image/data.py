"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: gzipped IDX files parsed with numpy.

Reading the files directly keeps the image domain free of torchvision (which does not import beside the local
torch build) and of any download at run time.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from latentguard.errors import DataError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_SIDE = 28


def _read_gz(path: Path) -> bytes:
    """The decompressed bytes of ``path``; a missing or unreadable file is a ``DataError``."""
    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file not found: {path}; install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or set task.data_dir"
        )
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"Fashion-MNIST file {path} is not a readable gzip file: {exc}") from exc


def _parse_idx(data: bytes, path: Path, magic: int, dims: int) -> np.ndarray:
    """Check the IDX header (magic number, declared sizes) and return the payload as a uint8 array."""
    header_len = 4 + 4 * dims
    if len(data) < header_len:
        raise DataError(f"Fashion-MNIST file {path} is truncated: {len(data)} bytes, no full IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"Fashion-MNIST file {path} has IDX magic number {found:#010x}, expected {magic:#010x}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = int(np.prod(shape))
    if len(data) - header_len != expected:
        raise DataError(
            f"Fashion-MNIST file {path} holds {len(data) - header_len} data bytes, header says {expected} "
            f"(shape {shape})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def load_fashion_mnist(data_dir: Path, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """Images as float32 ``(N, 1, 28, 28)`` in [0, 1] and labels as int64 ``(N,)`` for one split."""
    if split not in _PREFIX:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    data_dir = Path(data_dir)
    image_path = data_dir / f"{_PREFIX[split]}-images-idx3-ubyte.gz"
    label_path = data_dir / f"{_PREFIX[split]}-labels-idx1-ubyte.gz"
    images = _parse_idx(_read_gz(image_path), image_path, _IMAGE_MAGIC, 3)
    labels = _parse_idx(_read_gz(label_path), label_path, _LABEL_MAGIC, 1)
    if images.shape[1:] != (_SIDE, _SIDE):
        raise DataError(f"Fashion-MNIST file {image_path} holds {images.shape[1:]} images, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST files disagree: {image_path} has {images.shape[0]} images, "
            f"{label_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"Fashion-MNIST file {label_path} holds label {int(labels.max())}, expected 0..9")
    image_tensor = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    return image_tensor, label_tensor
