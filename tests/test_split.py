"""The suffix-only inner loop gives the same perturbation and loss as the full hook path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from latentguard.domains.text_cls.model import SequenceClassifierIO
from latentguard.domains.text_gen.model import IGNORE, CausalLMIO
from latentguard.engine.attack import LatentAttack, PGDConfig
from latentguard.engine.io import ClassifierIO
from latentguard.engine.split import PrefixCache
from latentguard.engine.threat import Threat
from latentguard.errors import SiteError


def tiny_cnn() -> tuple[nn.Module, Any, Any]:
    from latentguard.domains.image.model import ResNetCNN

    torch.manual_seed(0)
    model = ResNetCNN(width=4).eval()
    batch = (torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,)))
    return model, ClassifierIO(), batch


def tiny_bert() -> tuple[nn.Module, Any, Any]:
    import transformers

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 50, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return model, SequenceClassifierIO(), (ids, mask, torch.randint(0, 3, (4,)))


def tiny_llama() -> tuple[nn.Module, Any, Any]:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    return model, CausalLMIO(), (ids, mask, ids.masked_fill(mask == 0, IGNORE))


CASES = {
    "cnn": (tiny_cnn, ["block2"]),
    "cnn-two-sites": (tiny_cnn, ["block1", "block3"]),
    "bert": (tiny_bert, ["bert.encoder.layer.1"]),
    "llama": (tiny_llama, ["model.layers.1"]),
}


# token scope needs (batch, positions, features) activations: the CNN has none
SCOPES = [(case, "example") for case in sorted(CASES)] + [("bert", "token"), ("llama", "token")]


@pytest.mark.parametrize(("case", "scope"), SCOPES)
def test_split_and_hook_paths_agree(case: str, scope: str) -> None:
    build, sites = CASES[case]
    model, io, batch = build()
    threat = Threat(norm="l2", epsilon=0.5, epsilon_mode="relative", scope=scope)
    results = {}
    for reuse in (False, True):
        attack = LatentAttack(sites, threat, PGDConfig(steps=4, reuse_prefix=reuse))
        torch.manual_seed(1)
        results[reuse] = attack(model, io, batch)
    for site in sites:
        torch.testing.assert_close(
            results[True].deltas[site], results[False].deltas[site], rtol=1e-4, atol=1e-5
        )
    assert results[True].losses == pytest.approx(results[False].losses, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("case", ["cnn", "bert", "llama"])
def test_prefix_modules_are_cached_and_restored(case: str) -> None:
    build, sites = CASES[case]
    model, io, batch = build()
    cache = PrefixCache(model, sites)
    with torch.no_grad():
        expected = cache.record(lambda: io.forward(model, batch))
    assert cache.cached_modules >= 2  # at least the embeddings/stem and the site
    with cache.active(), torch.no_grad():
        replayed = io.forward(model, batch)
    torch.testing.assert_close(getattr(replayed, "logits", replayed), getattr(expected, "logits", expected))
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_input_site_has_no_prefix() -> None:
    model, io, batch = tiny_cnn()
    cache = PrefixCache(model, ["input"])
    with torch.no_grad():
        cache.record(lambda: io.forward(model, batch))
    assert cache.cached_modules == 0


def test_objectives_that_run_other_inputs_disable_the_cache() -> None:
    model, _, _ = tiny_cnn()

    def other_inputs(run: Any, io: Any, batch: Any) -> Tensor:
        return io.loss(run((batch[0].flip(0), batch[1])), batch).mean()

    attack = LatentAttack(["block2"], Threat(epsilon=0.1), PGDConfig(steps=2), objective=other_inputs)
    assert attack.prefix_cache(model) is None


class Residual(nn.Module):
    """``head(pre(x) + site(pre(x)))``; from call ``in_place_from_call`` the sum goes into pre's output."""

    def __init__(self, in_place_from_call: int | None = None) -> None:
        super().__init__()
        self.pre, self.site, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.in_place_from_call = in_place_from_call
        self.calls = 0
        self.residual_pointers: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        residual = self.pre(x)
        self.residual_pointers.append(residual.data_ptr())
        hidden = self.site(residual)
        if self.in_place_from_call is not None and self.calls >= self.in_place_from_call:
            residual += hidden  # modifies the cached output of ``pre``
            return self.head(residual)
        return self.head(residual + hidden)


def _residual_batch() -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    return torch.randn(4, 5), torch.randint(0, 3, (4,))


def test_a_suffix_that_modifies_the_prefix_in_place_still_agrees_with_the_hook_path() -> None:
    results = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        model = Residual(in_place_from_call=1)
        attack = LatentAttack(["site"], Threat(epsilon=0.5), PGDConfig(steps=5, reuse_prefix=reuse))
        torch.manual_seed(1)
        results[reuse] = attack(model, ClassifierIO(), _residual_batch())
    torch.testing.assert_close(results[True].deltas["site"], results[False].deltas["site"])
    assert results[True].losses == pytest.approx(results[False].losses, rel=1e-5)


def test_an_untouched_prefix_output_is_handed_out_without_a_copy_after_the_first_step() -> None:
    torch.manual_seed(0)
    model = Residual()
    LatentAttack(["site"], Threat(epsilon=0.5), PGDConfig(steps=4))(model, ClassifierIO(), _residual_batch())
    recorded, *steps = model.residual_pointers[-5:]  # the recording pass, then one call per PGD step
    assert steps[0] != recorded  # the first step gets a copy
    assert steps[1:] == [recorded] * 3  # then the recorded tensor itself


def test_an_in_place_change_that_starts_late_is_an_error_not_a_wrong_cache() -> None:
    torch.manual_seed(0)
    model = Residual(in_place_from_call=4)  # the recording and two steps leave it alone, the third changes it
    attack = LatentAttack(["site"], Threat(epsilon=0.5), PGDConfig(steps=4))
    with pytest.raises(SiteError, match="reuse_prefix"):
        attack(model, ClassifierIO(), _residual_batch())


class AddsIntoSite(Residual):
    """``head(site(pre(x)) + pre(x))`` with the sum written into the site's own output."""

    def forward(self, x: Tensor) -> Tensor:
        residual = self.pre(x)
        hidden = self.site(residual)
        hidden += residual
        return self.head(hidden)


def test_the_captured_clean_activation_is_the_sites_output_even_if_later_layers_change_it() -> None:
    torch.manual_seed(0)
    model = AddsIntoSite()
    inputs, labels = _residual_batch()
    attack = LatentAttack(["site"], Threat(epsilon=0.5), PGDConfig(steps=2))
    captured = attack.capture(model, ClassifierIO(), (inputs, labels))["site"]
    with torch.no_grad():
        torch.testing.assert_close(captured, model.site(model.pre(inputs)))


class Counted(nn.Module):
    """``head(site(pre(x)))`` that counts the calls of its head, optionally through ``pre`` again and ``site``
    twice (modules reused within one pass)."""

    def __init__(self, reuse_pre: bool = False, reuse_site: bool = False) -> None:
        super().__init__()
        self.pre, self.site, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.reuse_pre, self.reuse_site = reuse_pre, reuse_site
        self.head_calls = 0
        self.head.register_forward_pre_hook(lambda *_: setattr(self, "head_calls", self.head_calls + 1))

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.site(torch.tanh(self.pre(x)))
        if self.reuse_site:
            hidden = self.site(torch.tanh(hidden))
        if self.reuse_pre:
            hidden = self.pre(torch.tanh(hidden))  # depends on δ: must not be replayed
        return self.head(hidden)


@pytest.mark.parametrize("site", ["site", "input"])
def test_the_clean_pass_stops_after_the_site(site: str) -> None:
    torch.manual_seed(0)
    model, batch = Counted(), _residual_batch()
    attack = LatentAttack([site], Threat(epsilon=0.5), PGDConfig(steps=2))
    captured = attack.capture(model, ClassifierIO(), batch, attack.prefix_cache(model))[site]
    assert model.head_calls == 0  # nothing after the site ran
    expected = batch[0] if site == "input" else model.site(torch.tanh(model.pre(batch[0])))
    torch.testing.assert_close(captured, expected.detach())
    attack.capture(model, ClassifierIO(), batch, whole=True)
    assert model.head_calls == 1


@pytest.mark.parametrize("reuse", ["pre", "site"])
def test_a_module_reused_after_the_site_is_replayed_only_on_its_first_call(reuse: str) -> None:
    results = {}
    for cached in (False, True):
        torch.manual_seed(0)
        model = Counted(reuse_pre=reuse == "pre", reuse_site=reuse == "site")
        attack = LatentAttack(["site"], Threat(epsilon=0.5), PGDConfig(steps=4, reuse_prefix=cached))
        torch.manual_seed(1)
        if reuse == "site":
            with pytest.warns(UserWarning, match="site 'site' ran 2 times in one forward"):
                results[cached] = attack(model, ClassifierIO(), _residual_batch())
        else:
            results[cached] = attack(model, ClassifierIO(), _residual_batch())
    torch.testing.assert_close(results[True].deltas["site"], results[False].deltas["site"])
    assert results[True].losses == pytest.approx(results[False].losses, rel=1e-5)
