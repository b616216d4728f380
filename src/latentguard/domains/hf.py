"""Hugging Face helpers shared by the text domains: a quiet lazy import, and where to perturb a model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from latentguard.engine import aliases
from latentguard.errors import ConfigError, SiteError

# The blocks a sweep perturbs when it names none: relative depths, so any architecture has them.
DEPTH_SWEEP: tuple[str, ...] = ("block:0", "block:25%", "block:50%", "block:75%", "block:-1")


class TinyTransformerSpec(BaseModel):
    """Size of a random tiny transformer for tests and smoke runs (each domain sets its own defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(64, ge=8, le=1024)
    layers: int = Field(4, ge=1, le=32)
    heads: int = Field(4, ge=1, le=32)
    intermediate_size: int = Field(128, ge=8, le=8192)
    vocab_size: int = Field(2000, ge=50, le=100_000)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyTransformerSpec:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


def input_site_of(model: nn.Module) -> str:
    """The dotted name of the token-embedding module (e.g. ``model.embed_tokens`` for Llama)."""
    try:
        return aliases.embeddings_name(model)
    except SiteError as exc:
        raise ConfigError(f"task.model: {exc}") from None


def block_names(model: nn.Module) -> tuple[str, ...]:
    """The transformer blocks: the items of the longest ``ModuleList`` (``bert.encoder.layer.0`` …)."""
    try:
        return aliases.block_names(model)
    except SiteError as exc:
        raise ConfigError(f"task.model: {exc}") from None


def block_linear_layers(model: nn.Module) -> list[str]:
    """Names, inside a block, of the blocks' linear layers (``nn.Linear``, GPT-2's ``Conv1D``): what LoRA
    adapts by default (``self_attn.q_proj``, ``attn.c_attn``, ``attention.query_key_value``, …)."""
    found: dict[str, None] = {}
    for block in block_names(model):
        for name, module in model.get_submodule(block).named_modules():
            if name and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                found[name] = None
    return list(found)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[Any]:
    """Import transformers (a clear error if missing) with its load reports and progress bars silenced."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("the text domains need transformers: pip install 'latentguard[text]'") from exc
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
