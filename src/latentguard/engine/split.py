"""Run only the suffix of a model in the attack's inner loop, for any architecture, without its code.

A clean forward pass is recorded once: which modules ran, in what order, what they returned. Every module
that *finished before the first perturbed site started* belongs to the prefix ``f(x)``: its output cannot
depend on the perturbation. While the cache is active those modules return their recorded output instead of
computing (forward hooks still fire), so each PGD step pays for the suffix ``g(h + δ)`` and the model's own
glue code (masks, position ids), never for the prefix. This covers ``nn.Sequential`` stacks, CNNs and the
block lists of Hugging Face encoders and decoders alike; when nothing can be cached (site ``input``, or a
module called more than once) it degrades to the plain hook path, still exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from latentguard.engine.site import INPUT, resolve_module


def _clone(value: Any) -> Any:
    """A copy the suffix may modify in place without corrupting the cache (tensors only; containers kept)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_clone(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        copy = value.copy()
        for key, item in value.items():
            copy[key] = _clone(item)
        return copy
    return value


@dataclass
class _Trace:
    starts: dict[nn.Module, int] = field(default_factory=dict)
    ends: dict[nn.Module, int] = field(default_factory=dict)
    calls: dict[nn.Module, int] = field(default_factory=dict)
    outputs: dict[nn.Module, Any] = field(default_factory=dict)
    clock: int = 0


class PrefixCache:
    """Memoised prefix modules for one batch: record once with ``record``, then ``active()`` per step."""

    def __init__(self, model: nn.Module, sites: Sequence[str]) -> None:
        self.model = model
        self.sites = [resolve_module(model, site) for site in sites if site != INPUT]
        self.enabled = len(self.sites) == len(sites)  # the input site leaves no prefix to skip
        self.cached: dict[nn.Module, Any] = {}

    def record(self, forward: Callable[[], Any]) -> Any:
        """Run ``forward`` (a clean pass, normally under ``no_grad``) and keep the prefix outputs."""
        if not self.enabled:
            return forward()
        trace = _Trace()
        names = {module: name for name, module in self.model.named_modules()}
        handles = []

        def before(module: nn.Module, args: Any) -> None:
            trace.clock += 1
            trace.calls[module] = trace.calls.get(module, 0) + 1
            trace.starts.setdefault(module, trace.clock)

        def after(module: nn.Module, args: Any, output: Any) -> None:
            trace.clock += 1
            trace.ends[module] = trace.clock
            if not any(site in trace.starts for site in self.sites) or module in self.sites:
                trace.outputs[module] = output

        for module in names:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        try:
            result = forward()
        finally:
            for handle in handles:
                handle.remove()
        self.cached = self._choose(trace, names)
        return result

    def _choose(self, trace: _Trace, names: dict[nn.Module, str]) -> dict[nn.Module, Any]:
        """The largest modules that finished before the first site started (plus that site), called once."""
        started = [trace.starts[site] for site in self.sites if site in trace.starts]
        if not started:
            return {}
        first_start = min(started)
        first_site = next(site for site in self.sites if trace.starts.get(site) == first_start)
        chosen: dict[nn.Module, Any] = {}
        if trace.calls.get(first_site) == 1:
            chosen[first_site] = trace.outputs[first_site]
        for module, end in trace.ends.items():
            if end < first_start and trace.calls[module] == 1 and module in trace.outputs:
                chosen[module] = trace.outputs[module]

        # keep only the outermost: a cached parent never calls its children
        def inside_chosen(module: nn.Module) -> bool:
            name = names[module]
            return any(
                other is not module and name.startswith(names[other] + ".")
                for other in chosen
                if names[other]
            )

        return {module: out for module, out in chosen.items() if not inside_chosen(module) and names[module]}

    @property
    def cached_modules(self) -> int:
        return len(self.cached)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside, cached modules return their recorded outputs; their forward is restored on exit."""
        patched: list[tuple[nn.Module, Any]] = []
        try:
            for module, output in self.cached.items():
                patched.append((module, module.__dict__.get("forward")))
                module.forward = _replay(output)  # type: ignore[method-assign]
            yield
        finally:
            for module, previous in patched:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous  # type: ignore[method-assign]


def _replay(output: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return _clone(output)

    return forward
