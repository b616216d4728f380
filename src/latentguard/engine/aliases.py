"""Site names that do not depend on the architecture: ``embeddings``, ``block:N``, ``block:-N``, ``block:P%``.

A site is ``input``, the dotted name of a submodule (``transformer.h.3``), or one of these aliases, resolved
against the model itself:

- ``embeddings``: the module ``model.get_input_embeddings()`` returns (any Hugging Face model);
- ``block:N``: block ``N`` of the model's blocks, the items of its longest ``nn.ModuleList``
  (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ``distilbert.transformer.layer``,
  ``roberta.encoder.layer``, …);
  ``block:-1`` is the last one;
- ``block:P%``: block ``⌊P·N/100⌋`` of ``N`` (capped at the last): ``block:0%`` is the first, ``block:50%``
  the middle one, ``block:100%`` the last, whatever the depth.

Results keep the site as written; only the hooks see the module it stands for.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence

from torch import nn

from latentguard.errors import SiteError

EMBEDDINGS = "embeddings"
BLOCK = "block:"
_BLOCK = re.compile(r"^block:(?:(?P<index>-?[0-9]+)|(?P<percent>[0-9]+(?:\.[0-9]+)?)%)$")


def is_alias(site: str) -> bool:
    return site == EMBEDDINGS or site.startswith(BLOCK)


def block_list(model: nn.Module) -> tuple[str, int]:
    """The name and length of the model's list of blocks: its longest ``nn.ModuleList`` (the outermost on a
    tie). A ``SiteError`` when the model has none."""
    best, size = "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > size:
            best, size = name, len(module)
    if not size:
        raise SiteError(
            f"{type(model).__name__} has no list of blocks (nn.ModuleList) for 'block:…' sites; "
            "name a module instead (latentguard layers CONFIG --all lists them)"
        )
    return best, size


def block_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the model's blocks, in order (``transformer.h.0``, ``transformer.h.1``, …)."""
    name, size = block_list(model)
    prefix = f"{name}." if name else ""
    return tuple(f"{prefix}{i}" for i in range(size))


def embeddings_name(model: nn.Module) -> str:
    """The dotted name of the module ``model.get_input_embeddings()`` returns."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(embeddings, nn.Module):
        raise SiteError(
            f"site 'embeddings' needs a model with get_input_embeddings() (a Hugging Face model); "
            f"{type(model).__name__} has none: name its embedding module instead"
        )
    for name, module in model.named_modules():
        if module is embeddings:
            return name
    raise SiteError(f"{type(model).__name__}'s input embeddings are not one of its submodules")


def block_index(site: str, count: int) -> int:
    """The block index ``site`` (``block:N``, ``block:-N`` or ``block:P%``) means among ``count`` blocks."""
    match = _BLOCK.match(site)
    if match is None:
        raise SiteError(f"site {site!r}: expected block:N, block:-N or block:P% (e.g. block:4, block:50%)")
    if match["percent"] is not None:
        percent = float(match["percent"])
        if percent > 100:
            raise SiteError(f"site {site!r}: a relative depth is at most 100%")
        return min(count - 1, math.floor(percent * count / 100))
    index = int(match["index"])
    if not -count <= index < count:
        raise SiteError(
            f"site {site!r}: the model has {count} blocks; use block:0..{count - 1}, block:-{count}..-1 "
            "or a relative depth such as block:50%"
        )
    return index % count


def alias_target(site: str, embeddings: str | None, blocks: Sequence[str]) -> str:
    """The module name ``site`` stands for, given the embedding module's and the blocks' names (no model
    needed); names that are not aliases come back unchanged."""
    if site == EMBEDDINGS:
        if embeddings is None:
            raise SiteError("site 'embeddings': this model has no input embeddings")
        return embeddings
    if site.startswith(BLOCK):
        if not blocks:
            raise SiteError(f"site {site!r}: this model has no list of blocks")
        return blocks[block_index(site, len(blocks))]
    return site


def module_name(model: nn.Module, site: str) -> str:
    """The dotted module name ``site`` stands for in ``model`` (unchanged when it is not an alias)."""
    if site == EMBEDDINGS:
        return embeddings_name(model)
    if site.startswith(BLOCK):
        return alias_target(site, None, block_names(model))
    return site


def alias_table(model: nn.Module) -> list[tuple[str, str]]:
    """``(alias, module name)`` for every alias ``model`` offers: ``embeddings`` and ``block:0..N-1``."""
    rows = []
    with contextlib.suppress(SiteError):
        rows.append((EMBEDDINGS, embeddings_name(model)))
    with contextlib.suppress(SiteError):
        rows += [(f"{BLOCK}{i}", name) for i, name in enumerate(block_names(model))]
    return rows
