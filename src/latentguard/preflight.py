"""Everything that depends on the model, checked before any file is written or any training starts.

Building the task validates its config against the user's data and the model's tokenizer (split sizes, the
chat template, whether each trojan target fits the generation length). Then the model is built, the
defenses' form of it made (LoRA targets must exist), and one small forward runs with counting hooks on every
site a defense trains at or the evaluation attacks: each must resolve to a module and run exactly once
(a module reused in the forward would get the same perturbation at every call), unless the config's
``allow_repeated_sites`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latentguard.config import DefenseSpec, RunConfig
from latentguard.defenses import DefenseConfig
from latentguard.domains import build_task
from latentguard.domains.base import Task, resolve_device
from latentguard.engine.aliases import is_alias, module_name
from latentguard.engine.site import INPUT, Intervention, frozen, resolve_module
from latentguard.engine.threat import Threat
from latentguard.errors import ConfigError, SiteError

NOT_A_MODULE = ("text",)  # held-out sites that edit the raw input (words, characters), not an activation


def fill_sites(defense: DefenseSpec, task: Task) -> DefenseConfig:
    """A perturbing defense given no sites (input-space AT) perturbs the task's input site (pixels, or token
    embeddings for text)."""
    fields = defense.model_dump(exclude={"name"})
    if defense.defense.perturbs and not defense.sites:
        fields["sites"] = [task.input_site]
    threat = fields.get("threat")
    single = isinstance(defense.threat, Threat)
    if single and threat["bounds"] is None and fields["sites"] == [INPUT] and task.input_bounds:
        threat["bounds"] = task.input_bounds
    return DefenseConfig.model_validate(fields)


@dataclass(frozen=True)
class SiteUse:
    """A site as one config field names it."""

    field: str
    site: str


def site_uses(config: RunConfig, task: Task) -> list[SiteUse]:
    """Every site the run perturbs, with the config field that names it."""
    uses = []
    for i, defense in enumerate(config.defenses):
        if defense.defense.perturbs:
            for site in fill_sites(defense, task).sites:
                uses.append(SiteUse(f"defenses.{i}.sites", site))
    for i, layer in enumerate(config.evaluation.latent_layers):
        uses.append(SiteUse(f"evaluation.latent_layers.{i}", layer))
    for attack in task.heldout_attacks():
        if attack.site not in NOT_A_MODULE:
            uses.append(SiteUse(f"evaluation.attacks.{attack.name}", attack.site))
    return uses


def _modules(model: nn.Module, uses: list[SiteUse]) -> dict[str, nn.Module]:
    modules = {}
    for use in uses:
        if use.site not in modules:
            try:
                modules[use.site] = resolve_module(model, use.site)
            except SiteError as exc:
                raise ConfigError(f"{use.field}: {exc}") from None
    return modules


def _distinct_per_defense(config: RunConfig, task: Task, modules: dict[str, nn.Module]) -> None:
    """Two sites of one defense must be two modules (an alias and a name for the same one would stack)."""
    for i, defense in enumerate(config.defenses):
        if defense.kind not in ("at", "lat", "rlat", "tlat"):
            continue
        seen: dict[int, str] = {}
        for site in fill_sites(defense, task).sites:
            key = id(modules[site])
            if key in seen:
                raise ConfigError(f"defenses.{i}.sites: {seen[key]!r} and {site!r} are the same module")
            seen[key] = site


def _fired_once(model: nn.Module, task: Task, uses: list[SiteUse], allowed: set[str]) -> None:
    """One forward on two test examples, counting how often each site's module runs."""
    batch = task.eval_batches(2, 2)[0]
    sites = list(dict.fromkeys(use.site for use in uses))
    fields = {use.site: use.field for use in reversed(uses)}  # first field naming each site
    with frozen(model), torch.no_grad(), Intervention(model, sites) as hooks:
        try:
            task.io.forward(model, batch)
        except SiteError as exc:
            raise ConfigError(f"{fields.get(INPUT, 'sites')}: {exc}") from None
    for site, count in hooks.fired.items():
        if count == 0:
            raise ConfigError(f"{fields[site]}: site {site!r} never ran in the model's forward pass")
        if count > 1 and site not in allowed:
            where = f" (module {module_name(model, site)})" if is_alias(site) else ""
            raise ConfigError(
                f"{fields[site]}: site {site!r}{where} ran {count} times in one forward (a reused module): "
                "the same perturbation would be added at each call; pick a module that runs once, or list "
                "the site in allow_repeated_sites"
            )


def preflight(config: RunConfig) -> Task:
    """Check what depends on the model before any folder is written; returns the first seed's task."""
    device = resolve_device(config.device)
    task = build_task(config.task, config.evaluation.attacks, config.seeds[0], device)
    uses = site_uses(config, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seeds[0])
        model = task.build_model()
        modules = _modules(model, uses)
        _distinct_per_defense(config, task, modules)
        model = task.defense_model(model.to(device))  # e.g. LoRA: its targets must exist
        if uses:
            _fired_once(model, task, uses, set(config.allow_repeated_sites))
    return task
