"""Where to perturb a Hugging Face transformer, found from the model itself: shared by the text domains."""

from __future__ import annotations

from torch import nn

from latentguard.errors import ConfigError


def input_site_of(model: nn.Module) -> str:
    """The dotted name of the token-embedding module (e.g. ``model.embed_tokens`` for Llama)."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    for name, module in model.named_modules():
        if module is embeddings:
            return name
    raise ConfigError(f"task.model: {type(model).__name__}'s input embeddings are not one of its submodules")


def block_names(model: nn.Module) -> tuple[str, ...]:
    """The transformer blocks: the items of the longest ``ModuleList`` (``bert.encoder.layer.0`` …)."""
    best: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            best = tuple(f"{name}.{i}" for i in range(len(module)))
    if not best:
        raise ConfigError(f"task.model: found no list of transformer blocks in {type(model).__name__}")
    return best
