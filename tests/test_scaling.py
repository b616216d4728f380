"""Memory savers keep training exact: gradient accumulation and Hugging Face gradient checkpointing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_blobs, make_mlp
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from latentguard.engine.attack import PGDConfig
from latentguard.engine.io import ClassifierIO
from latentguard.engine.threat import Threat
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer

# An absolute budget and no random start: the attack depends on nothing but each example itself.
LAT = DefenseConfig(
    kind="lat",
    sites=["1"],
    threat=Threat(norm="l2", epsilon=1.0),
    pgd=PGDConfig(steps=3, random_start=False),
    clean_weight=0.5,
)


@pytest.mark.parametrize("spec", [DefenseConfig(kind="clean"), LAT], ids=["clean", "lat"])
def test_gradient_accumulation_equals_the_larger_batch(spec: DefenseConfig) -> None:
    inputs, labels = make_blobs(96)

    def train(batch_size: int, accumulation: int) -> tuple[nn.Module, list[dict[str, Any]]]:
        model, records = make_mlp(), []
        loader = DataLoader(
            TensorDataset(inputs, labels),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(3),
        )
        settings = TrainConfig(
            steps=4, lr=0.05, optimizer="sgd", log_every=1, gradient_accumulation_steps=accumulation
        )
        result = Trainer(model, ClassifierIO(), spec, settings, log=records.append, progress=False).fit(
            loader
        )
        assert result.steps == 4
        return model, records

    whole, whole_log = train(32, 1)
    parts, parts_log = train(16, 2)
    assert [r["step"] for r in parts_log] == [1, 2, 3, 4]  # optimizer steps, not batches
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(parts.state_dict()[key], value, rtol=0, atol=1e-6)
    for want, got in zip(whole_log, parts_log, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)  # the mean over the step's batches


class NextTokenIO(ClassifierIO):
    """Causal LM on ``(input_ids, labels)``: mean next-token loss per sequence."""

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        return model(input_ids=batch[0], use_cache=False).logits

    def loss(self, output: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(output[:, :-1].transpose(1, 2), batch[0][:, 1:], reduction="none").mean(1)


@pytest.mark.parametrize("model_mode", ["eval", "train"])
def test_lat_under_gradient_checkpointing_equals_lat_without(model_mode: str) -> None:
    """Checkpointed blocks recompute their forward in backward: the site's hook must perturb it the same."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    ids = torch.randint(1, 64, (4, 10))
    spec = DefenseConfig(
        kind="lat",
        sites=["model.layers.1"],
        threat=Threat(norm="l2", epsilon=0.5, epsilon_mode="relative"),
        pgd=PGDConfig(steps=3, random_start=False, model_mode=model_mode),
        clean_weight=0.5,
    )
    trained = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        if checkpointing:
            # transformers 5.x renamed it; the project supports >= 4.46, which has only the old name
            new_name = getattr(model, "activation_checkpointing_enable", None)
            (new_name or model.gradient_checkpointing_enable)()
        settings = TrainConfig(steps=2, lr=0.1, optimizer="sgd")
        Trainer(model, NextTokenIO(), spec, settings, progress=False).fit([(ids, ids)])
        trained.append(model.state_dict())
    plain, checkpointed = trained
    assert any(not torch.equal(plain[k], base.state_dict()[k]) for k in plain)
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=0, atol=1e-6)
