"""Run only the suffix of a model in the attack's inner loop, for any architecture, without its code.

A clean forward pass is recorded once: which modules ran, in what order, what they returned. Every module
that *finished before the first perturbed site started* belongs to the prefix ``f(x)``: its output cannot
depend on the perturbation. While the cache is active those modules return their recorded output instead of
computing (forward hooks still fire), so each PGD step pays for the suffix ``g(h + δ)`` and the model's own
glue code (masks, position ids), never for the prefix. This covers ``nn.Sequential`` stacks, CNNs and the
block lists of Hugging Face encoders and decoders alike; when nothing can be cached (site ``input``, or a
module called more than once) it degrades to the plain hook path, still exact. The recording pass may stop
right after the sites (``LatentAttack.capture`` does): a cached module that the rest of the pass calls again
is replayed only on its first call of each pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from latentguard.engine.site import INPUT, resolve_module
from latentguard.errors import SiteError


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
    versions: dict[nn.Module, list[int]] = field(default_factory=dict)  # of ``outputs`` when returned
    clock: int = 0

    def unchanged(self, module: nn.Module) -> bool:
        """Whether nothing later in the pass changed the module's output in place (else it cannot replay)."""
        return _versions(self.outputs[module]) == self.versions[module]


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
                trace.versions[module] = _versions(output)

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
        if trace.calls.get(first_site) == 1 and trace.unchanged(first_site):
            chosen[first_site] = trace.outputs[first_site]
        for module, end in trace.ends.items():
            once = trace.calls[module] == 1 and module in trace.outputs
            if end < first_start and once and trace.unchanged(module):
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
        """Inside, cached modules return their recorded outputs; their forward is restored on exit.

        A recording may have stopped right after the sites (``LatentAttack.capture``), before a prefix
        module ran a second time: within one pass of the model only a cached module's first call is
        replayed, later calls run its forward.
        """
        patched: list[tuple[nn.Module, Any]] = []
        passes = [0]  # forward passes of the model since activation, counted by a hook on the model

        def new_pass(*_: Any) -> None:
            passes[0] += 1

        handle = self.model.register_forward_pre_hook(new_pass)
        try:
            for module, output in self.cached.items():
                patched.append((module, module.__dict__.get("forward")))
                module.forward = _Replay(output, module.forward, passes)  # type: ignore[method-assign]
            yield
        finally:
            handle.remove()
            for module, previous in patched:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous  # type: ignore[method-assign]


def _tensors(value: Any) -> list[Tensor]:
    """The tensors inside a module output (nested tuples, lists, dicts and named tuples)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _versions(value: Any) -> list[int]:
    """The version counters of a value's tensors: they move on every in-place change."""
    return [tensor._version for tensor in _tensors(value)]


class _Replay:
    """A cached module's forward: its recorded output, copied until the suffix is seen to leave it alone.

    The first replay hands out a copy. If no step modified that copy in place, later replays hand out the
    recorded tensors themselves (no copy per PGD step); their version counters guard the promise. Only the
    first call of each forward pass is replayed; a module called again in the same pass runs its forward.
    """

    def __init__(self, output: Any, forward: Callable[..., Any], passes: list[int]) -> None:
        self.output = output
        self.versions = _versions(output)
        self.copy: Any = None
        self.shared = False
        self.forward = forward  # the module's own, for a second call within one pass
        self.passes = passes  # the model's pass count (one item)
        self.replayed_in = -1  # the pass of the last replay

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.replayed_in == self.passes[0]:  # a reused module's later call: its input may depend on δ
            return self.forward(*args, **kwargs)
        self.replayed_in = self.passes[0]
        if not self.shared and self.copy is not None:
            self.shared = all(tensor._version == 0 for tensor in _tensors(self.copy))
        if not self.shared:
            self.copy = _clone(self.output)
            return self.copy
        if _versions(self.output) != self.versions:
            raise SiteError(
                "a module after the perturbed site modified a cached prefix output in place on a later "
                "PGD step only; set pgd.reuse_prefix: false for this model"
            )
        return self.output
