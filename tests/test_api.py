"""The README's Python example, run as written: LAT on a user's own model and DataLoader, then evaluation."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(marker: str = "api-example") -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md lost its Python API example ({marker})"
    return match.group(1)


def test_readme_python_example_runs_and_hardens_the_layer() -> None:
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    clean, latent = namespace["clean"], namespace["latent"]
    assert isinstance(clean, float) and isinstance(latent, float)
    assert clean > 0.8  # the toy task is learnable
    assert latent <= clean  # an attack never helps
    assert len(readme_example().strip().splitlines()) <= 25


def test_readme_dict_batch_example_runs_through_model_io_only() -> None:
    """A user's ModelIO over dict batches: training with one threat per site, accuracy, latent robustness and
    a targeted attack, none of which may index the batch as ``batch[1]``."""
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(readme_example("api-example-dict"), "README.md", "exec"), namespace)
    clean, latent, toward = namespace["clean"], namespace["latent"], namespace["toward_0"]
    assert isinstance(clean, float) and clean > 0.8
    assert isinstance(latent, float) and latent <= clean
    assert toward.gain > 0 and set(toward.radii) == {"2"}  # type: ignore[attr-defined]
    io = namespace["io"]
    readme = README.read_text(encoding="utf-8")
    for method in ("to_device", "forward", "loss", "positions", "labels", "with_labels", "score"):
        assert callable(getattr(io, method)) and f"`{method}(" in readme  # every method listed in the table
