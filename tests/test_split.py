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
