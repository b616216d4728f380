"""Site aliases (``embeddings``, ``block:N``, ``block:P%``), per-site threats and what a ModelIO must have."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_blobs, make_mlp
from torch import Tensor, nn

import latentguard as lg
from latentguard.config import load_config
from latentguard.engine.aliases import alias_table, block_index, module_name
from latentguard.engine.site import Intervention, resolve_module
from latentguard.errors import ConfigError, SiteError, UserError


class TinyLM(nn.Module):
    """Embedding, a list of three blocks and a head: the shape every Hugging Face model shares."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.stack = nn.Module()
        self.stack.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.extra = nn.ModuleList([nn.Linear(8, 8)])  # a shorter list: not the blocks
        self.head = nn.Linear(8, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        for block in self.stack.blocks:
            h = torch.relu(block(h))
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize(
    ("site", "name"),
    [
        ("embeddings", "embed"),
        ("block:0", "stack.blocks.0"),
        ("block:-1", "stack.blocks.2"),
        ("block:0%", "stack.blocks.0"),
        ("block:50%", "stack.blocks.1"),
        ("block:66%", "stack.blocks.1"),
        ("block:67%", "stack.blocks.2"),
        ("block:100%", "stack.blocks.2"),
        ("head", "head"),
    ],
)
def test_aliases_resolve_to_the_module_they_stand_for(site: str, name: str) -> None:
    model = TinyLM()
    assert module_name(model, site) == name
    assert resolve_module(model, site) is model.get_submodule(name)


def test_alias_errors_say_what_is_valid() -> None:
    model = TinyLM()
    with pytest.raises(SiteError, match=r"the model has 3 blocks; use block:0\.\.2, block:-3\.\.-1"):
        resolve_module(model, "block:3")
    with pytest.raises(SiteError, match="at most 100%"):
        block_index("block:101%", 3)
    with pytest.raises(SiteError, match="expected block:N"):
        block_index("block:one", 3)
    with pytest.raises(SiteError, match="get_input_embeddings"):
        resolve_module(make_mlp(), "embeddings")
    assert alias_table(model)[:2] == [("embeddings", "embed"), ("block:0", "stack.blocks.0")]


def test_a_hook_at_an_alias_perturbs_that_block_and_keeps_the_alias_as_key() -> None:
    torch.manual_seed(0)
    model, ids = TinyLM().eval(), torch.randint(0, 10, (4, 5))
    with torch.no_grad(), Intervention(model, ["block:-1"], capture=True) as hooks:
        model(ids)
    assert set(hooks.activations) == {"block:-1"} and hooks.fired == {"block:-1": 1}
    delta = torch.ones_like(hooks.activations["block:-1"])
    with torch.no_grad(), Intervention(model, ["block:-1"]) as hooks:
        hooks.deltas = {"block:-1": delta}
        by_alias = model(ids)
    with torch.no_grad(), Intervention(model, ["stack.blocks.2"]) as hooks:
        hooks.deltas = {"stack.blocks.2": delta}
        by_name = model(ids)
    assert torch.equal(by_alias, by_name) and not torch.equal(by_alias, model(ids))


def test_a_reused_module_as_site_warns_in_the_python_api() -> None:
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(8, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 3))
    attack = lg.LatentAttack(["1"], lg.Threat(epsilon=0.1), lg.PGDConfig(steps=1))
    with pytest.warns(UserWarning, match="site '1' ran 2 times in one forward"):
        attack(model, lg.ClassifierIO(), make_blobs(16))


# -- per-site threats ----------------------------------------------------------------------------------------
def test_each_site_gets_its_own_ball() -> None:
    model, batch = make_mlp(), make_blobs(32)
    threats = {"1": lg.Threat(norm="l2", epsilon=0.5), "3": lg.Threat(norm="linf", epsilon=0.01)}
    result = lg.LatentAttack(["1", "3"], threats, lg.PGDConfig(steps=3))(model, lg.ClassifierIO(), batch)
    assert result.radii == {"1": 0.5, "3": 0.01}
    assert float(result.deltas["1"].norm(dim=1).max()) <= 0.5 + 1e-6
    assert (
        float(result.deltas["3"].abs().max()) <= 0.01 + 1e-6 and float(result.deltas["1"].abs().max()) > 0.01
    )
    defense = lg.DefenseConfig(kind="lat", sites=["1", "3"], threat=threats)
    assert "1: l2 ε=0.5" in defense.describe() and "3: linf ε=0.01" in defense.describe()
    trained = lg.Trainer(model, lg.ClassifierIO(), defense, lg.TrainConfig(steps=2), progress=False).fit(
        [batch]
    )
    assert trained.radii == {"1": 0.5, "3": 0.01}


@pytest.mark.parametrize(
    ("threat", "message"),
    [
        ("{block2: {epsilon: 0.5}, stem: {epsilon: 1}}", "per-site threats need one entry for each of sites"),
        ("{block2: {epsilon: 0}}", "defenses.3.threat.block2.epsilon: Input should be greater than 0"),
        ("{block2: {eps: 1}}", "defenses.3.threat.block2.eps: unknown key"),
        ("{epsilon: 0.5, radius: 1}", "defenses.3.threat.radius: unknown key"),
    ],
)
def test_per_site_threat_errors_name_the_field(threat: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"defenses.lat.threat={threat}"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_per_site_threat_loads_from_yaml() -> None:
    config = load_config(
        None, ["defenses.lat.sites=[block1, block2]", "defenses.lat.threat={block1: {}, block2: {}}"]
    )
    lat = next(d for d in config.defenses if d.name == "lat")
    assert lat.threats(["block1", "block2"]) == {"block1": lg.Threat(), "block2": lg.Threat()}


# -- what a ModelIO needs ------------------------------------------------------------------------------------
class ThreeMethodIO:
    """forward, loss and positions only: what an older README said was enough."""

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        return model(batch["x"])

    def loss(self, output: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(output, batch["y"], reduction="none")

    def positions(self, batch: Any) -> None:
        return None


def test_a_model_io_missing_methods_is_one_line_naming_them() -> None:
    model, (x, y) = make_mlp(), make_blobs(16)
    batches = [{"x": x, "y": y}]
    with pytest.raises(UserError, match=r"^io: ThreeMethodIO lacks score\(\), which accuracy needs"):
        lg.accuracy(model, batches, io=ThreeMethodIO())  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"lacks to_device\(\), which Trainer needs"):
        lg.Trainer(model, ThreeMethodIO(), lg.DefenseConfig(kind="clean"))  # type: ignore[arg-type]
    score = lambda output, batch: (output.argmax(1) == batch["y"]).float()  # noqa: E731
    robust, _ = lg.latent_robustness(
        model, batches, "1", lg.Threat(epsilon=0.1), lg.PGDConfig(steps=1), io=ThreeMethodIO(), score=score
    )  # type: ignore[arg-type]
    assert 0.0 <= robust <= 1.0
    attack = lg.LatentAttack(["1"], lg.Threat(epsilon=0.1), lg.PGDConfig(steps=1), lg.Targeted(target=0))
    with pytest.raises(UserError, match=r"lacks with_labels\(\), labels\(\), which Targeted needs"):
        attack(model, ThreeMethodIO(), batches[0])  # type: ignore[arg-type]
