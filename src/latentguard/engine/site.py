"""Sites: where a perturbation lives, reached through forward hooks on an unmodified ``nn.Module``.

A site is ``"input"`` (the first positional argument of the model's forward), the dotted name of any
submodule (``"block2"``, ``"bert.encoder.layer.3"``, ``"model.layers.12"``) or an architecture-independent
alias (``"embeddings"``, ``"block:4"``, ``"block:50%"``: see ``aliases``). Hugging Face blocks return
tuples or output objects; the hook perturbs their first tensor, the hidden state.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from latentguard.engine.aliases import is_alias, module_name
from latentguard.errors import SiteError

INPUT = "input"


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_module(model: nn.Module, site: str) -> nn.Module:
    """The module at ``site`` (a name or an alias); an unknown name is a ``SiteError`` listing the closest
    valid names."""
    if site == INPUT:
        return model
    name = module_name(model, site) if is_alias(site) else site
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = module_names(model)
        close = difflib.get_close_matches(site, names, n=5, cutoff=0.4) or names[:5]
        raise SiteError(
            f"unknown layer {site!r} in {type(model).__name__}; closest valid names: {', '.join(close)} "
            "(or embeddings, block:N, block:P%)"
        ) from None


def _split_output(site: str, output: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The tensor to perturb inside a module's output, and how to put a changed one back."""
    if isinstance(output, Tensor):
        return output, lambda new: new
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        rest = list(output[1:])
        kind = type(output)
        if kind in (tuple, list):
            return output[0], lambda new: kind([new, *rest])
        return output[0], lambda new: kind(new, *rest)  # namedtuple
    if isinstance(output, Mapping):
        for key, value in output.items():
            if isinstance(value, Tensor):

                def rebuild(new: Tensor, key: str = key) -> Any:
                    output[key] = new
                    return output

                return value, rebuild
    raise SiteError(
        f"layer {site!r} returned {type(output).__name__}, which holds no tensor to perturb; "
        "expected a tensor, a tuple whose first item is a tensor, or a model output with a tensor field"
    )


class Intervention:
    """Hooks that record the clean activation at each site and add ``deltas[site]`` to it.

    Used as a context manager: hooks are removed on exit even if the forward raised. ``fired`` counts how
    often each site's hook ran, so callers can check that the layer really is on the forward path.
    ``start(site, activation)``, when given, makes the perturbation of a site that has none or one of
    another shape (stored in ``deltas``); without it a misfit perturbation is an error.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[str],
        *,
        capture: bool = False,
        start: Callable[[str, Tensor], Tensor] | None = None,
    ) -> None:
        if not sites:
            raise SiteError("no site given: name at least one layer (or 'input')")
        self.model = model
        self.sites = list(dict.fromkeys(sites))
        self.modules = {site: resolve_module(model, site) for site in self.sites}
        self.capture = capture
        self.start = start
        self.deltas: dict[str, Tensor] = {}
        self.activations: dict[str, Tensor] = {}
        self.fired: dict[str, int] = dict.fromkeys(self.sites, 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _apply(self, site: str, value: Tensor) -> Tensor:
        self.fired[site] += 1
        if self.capture:
            self.activations[site] = value.detach().clone()  # later layers may change it in place
        delta = self.deltas.get(site)
        if self.start is not None and (delta is None or delta.shape != value.shape):
            delta = self.deltas[site] = self.start(site, value)
        if delta is None:
            return value
        if delta.shape != value.shape:
            raise SiteError(
                f"perturbation for {site!r} has shape {tuple(delta.shape)} but the activation has "
                f"{tuple(value.shape)}"
            )
        return value + delta.to(value.dtype)

    def _input_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
            raise SiteError(
                "site 'input' needs the model's first positional argument to be a float tensor "
                "(token ids cannot be perturbed: use the embeddings site instead)"
            )
        return (self._apply(INPUT, args[0]), *args[1:]), kwargs

    def _module_hook(self, site: str) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            value, rebuild = _split_output(site, output)
            return rebuild(self._apply(site, value))

        return hook

    def __enter__(self) -> Intervention:
        for site, module in self.modules.items():
            if site == INPUT:
                handle = module.register_forward_pre_hook(self._input_hook, with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._module_hook(site))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_fired(self) -> None:
        silent = [site for site, count in self.fired.items() if count == 0]
        if silent:
            raise SiteError(f"layer(s) {', '.join(map(repr, silent))} never ran in the forward pass")

    def repeated(self) -> dict[str, int]:
        """Sites whose module ran more than once (a reused module): each call got the same perturbation."""
        return {site: count for site, count in self.fired.items() if count > 1}


@contextmanager
def frozen(model: nn.Module, *, train: bool = False) -> Iterator[nn.Module]:
    """Weights take no gradient and the model is in eval (or train) mode; both restored on exit."""
    modes = {module: module.training for module in model.modules()}
    grads = {param: param.requires_grad for param in model.parameters()}
    model.train(train)
    for param in grads:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode
        for param, flag in grads.items():
            param.requires_grad_(flag)
