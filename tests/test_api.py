"""The README's Python example, run as written: LAT on a user's own model and DataLoader, then evaluation."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its Python API example"
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
