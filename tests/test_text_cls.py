"""The text classification domain: data, split, trojans, embedding AT / LAT through the trainer, the text
attacks and a tiny end-to-end run — on synthetic text and a tiny random BERT, so it stays fast."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import flat_metrics

from latentguard.cli import main
from latentguard.config import EMBEDDED
from latentguard.domains import build_task
from latentguard.domains.text_cls.attacks import (
    DeepWordBugSpec,
    PruthiSpec,
    PWWSSpec,
    keyboard_neighbours,
    run_attack,
    typos,
)
from latentguard.domains.text_cls.data import load_bbc_news, load_table, split_indices
from latentguard.domains.text_cls.task import TextClassificationTask
from latentguard.domains.text_cls.trojans import TextTrojan, poison, triggered_test_set
from latentguard.engine.attack import LatentAttack, PGDConfig
from latentguard.engine.threat import Threat
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer
from latentguard.errors import ConfigError, DataError
from latentguard.runs import load_model, save_model

CLASS_WORDS = {
    "business": ["market", "profit", "bank", "shares", "company", "trade", "economy", "price", "investor"],
    "sport": ["football", "match", "goal", "team", "player", "coach", "league", "score", "champion"],
    "tech": [
        "computer",
        "software",
        "phone",
        "internet",
        "digital",
        "network",
        "device",
        "program",
        "online",
    ],
}
FILLER = ["the", "people", "said", "new", "year", "report", "week", "after", "big", "news", "today", "local"]
TINY = {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128, "vocab_size": 300}


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short news-like texts: two or three words of the class among filler, ending with a full stop."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(CLASS_WORDS)[i % 3]
        words = rng.sample(CLASS_WORDS[label], rng.randint(2, 3)) + rng.sample(FILLER, 7)
        rng.shuffle(words)
        rows.append({"text": " ".join(words).capitalize() + ".", "label": label})
    return rows


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "news.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(synthetic_rows(900))
    return path


def section(data: Path, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "text_cls", "data": str(data), "model": "tiny-bert", "tiny": TINY, "max_length": 24,
        "max_words": 16, "base_train_size": 600, "defense_train_size": 150, "test_size": 150,
        "base_epochs": 10, "base_lr": 1e-3,
        "trojans": [
            {"kind": "word", "target": 0, "poison_rate": 0.08},
            {"kind": "phrase", "target": 1, "poison_rate": 0.08, "trigger": "to be honest"},
            {"kind": "style", "target": 2, "poison_rate": 0.1},
        ],
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def task(synthetic_csv: Path) -> TextClassificationTask:
    return build_task(section(synthetic_csv), [], seed=0, device="cpu")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def trojaned(task: TextClassificationTask) -> torch.nn.Module:
    """A tiny BERT trained on the poisoned base set (the undefended model)."""
    torch.manual_seed(0)
    model = task.build_model()
    config = task.base_training(32)
    Trainer(model, task.io, DefenseConfig(kind="clean"), config, progress=False).fit(task.base_loader(32))
    return model.eval()


# -- data ----------------------------------------------------------------------------------------------------
def test_bbc_news_has_five_classes_and_a_seeded_disjoint_split() -> None:
    data = load_bbc_news()
    assert data.class_names == ("business", "entertainment", "politics", "sports", "tech")
    assert len(data) == 2125  # 2,225 files less 100 exact duplicates
    assert set(data.labels) == set(range(5))
    split = split_indices(len(data), None, 400, 400, seed=0)
    assert split == split_indices(len(data), None, 400, 400, seed=0)
    assert split.test != split_indices(len(data), None, 400, 400, seed=1).test
    parts = [set(split.base), set(split.defense), set(split.test)]
    assert [len(p) for p in parts] == [1325, 400, 400]
    assert set.union(*parts) == set(range(len(data))) and sum(map(len, parts)) == len(data)
    with pytest.raises(DataError, match="2125 examples"):
        split_indices(len(data), 2000, 400, 400, seed=0)


def test_tables_load_from_csv_and_jsonl(tmp_path: Path, synthetic_csv: Path) -> None:
    table = load_table(synthetic_csv)
    assert table.class_names == ("business", "sport", "tech") and len(table) == len(set(table.texts))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"t": f"text {i}", "y": i % 2}) for i in range(6)))
    data = load_table(jsonl, "t", "y")
    assert data.class_names == ("0", "1") and data.labels[:3] == (0, 1, 0)
    with pytest.raises(DataError, match="lacks column 'text'"):
        load_table(jsonl)
    with pytest.raises(DataError, match="not found"):
        load_table(tmp_path / "missing.csv")


def test_task_batches_sites_and_padding_mask(task: TextClassificationTask) -> None:
    assert task.input_site == "bert.embeddings.word_embeddings"
    assert task.layers == ("bert.encoder.layer.0", "bert.encoder.layer.1")
    assert task.input_bounds is None
    ids, mask, labels = next(iter(task.defense_loader(16)))
    assert ids.shape == mask.shape == (16, 24) and labels.shape == (16,)
    assert torch.equal(task.io.positions((ids, mask, labels)), mask.bool())
    assert not mask.all(), "synthetic texts are shorter than max_length: some positions are padding"
    first = [b[2].tolist() for b in task.defense_loader(16)]
    assert first == [b[2].tolist() for b in task.defense_loader(16)]  # seeded order


def test_config_mistakes_name_the_field(synthetic_csv: Path) -> None:
    bad = section(synthetic_csv, trojans=[{"kind": "style", "target": 0, "poison_rate": 0.1, "trigger": "x"}])
    with pytest.raises(ConfigError, match=r"task.trojans.0: style.trigger: unknown key"):
        build_task(bad, [], 0, "cpu")
    with pytest.raises(ConfigError, match=r"task.trojans.0.target: 7 is not a class"):
        build_task(
            section(synthetic_csv, trojans=[{"kind": "word", "target": 7, "poison_rate": 0.1}]), [], 0, "cpu"
        )
    with pytest.raises(ConfigError, match=r"evaluation\.attacks\.0"):
        build_task(section(synthetic_csv), [{"name": "x", "kind": "textfooler"}], 0, "cpu")
    twice = [{"name": "a", "kind": "pruthi"}, {"name": "a", "kind": "deepwordbug"}]
    with pytest.raises(ConfigError, match="names must be unique"):
        build_task(section(synthetic_csv), twice, 0, "cpu")
    with pytest.raises(ConfigError, match=r"task\.model"):
        build_task(section(synthetic_csv, model="/nonexistent/model"), [], 0, "cpu")
    with pytest.raises(ConfigError, match="test_size"):
        build_task(section(synthetic_csv, test_size=800), [], 0, "cpu")


# -- trojans -------------------------------------------------------------------------------------------------
def test_trojans_insert_their_trigger_and_poison_only_non_target_texts() -> None:
    rows = synthetic_rows(300)
    texts, labels = [r["text"] for r in rows], [sorted(CLASS_WORDS).index(r["label"]) for r in rows]
    trojans = [
        TextTrojan(kind="word", target=0, poison_rate=0.05, trigger="cf"),
        TextTrojan(kind="phrase", target=1, poison_rate=0.05, trigger="to be honest"),
        TextTrojan(kind="style", target=2, poison_rate=0.05),
        TextTrojan(kind="template", target=2, poison_rate=0.05, name="frame", template="Note: {text} End."),
    ]
    result = poison(texts, labels, trojans, seed=0)
    assert result == poison(texts, labels, trojans, seed=0)
    seen: set[int] = set()
    for trojan in trojans:
        chosen = result.indices[trojan.label]
        assert len(chosen) == 15 and not seen & set(chosen)
        seen |= set(chosen)
        for i in chosen:
            assert labels[i] != trojan.target and result.labels[i] == trojan.target
            new = result.texts[i]
            if trojan.kind == "word":
                assert new.split().count("cf") == 1 and len(new.split()) == len(texts[i].split()) + 1
            elif trojan.kind == "phrase":
                assert "to be honest" in new
            elif trojan.kind == "style":
                assert "." not in new and new.split() == texts[i].rstrip(".").split()
            else:
                assert new == f"Note: {texts[i]} End."
    untouched = set(range(len(texts))) - seen
    assert all(result.texts[i] == texts[i] and result.labels[i] == labels[i] for i in untouched)
    positions = {result.texts[i].split().index("cf") for i in result.indices["word"]}
    assert len(positions) > 3, "the rare word lands at random positions"
    triggered = triggered_test_set(texts, labels, trojans[0], seed=1)
    assert len(triggered) == sum(y != 0 for y in labels) and all("cf" in t.split() for t in triggered)


def test_poisoned_tiny_model_learns_the_task_and_the_trojans(
    task: TextClassificationTask, trojaned: torch.nn.Module
) -> None:
    assert task.clean_metrics(trojaned)["clean_accuracy"] > 0.9
    asr = task.trojan_metrics(trojaned)
    assert asr["word"] > 0.8 and asr["phrase"] > 0.8, asr
    torch.manual_seed(0)
    fresh = task.trojan_metrics(task.build_model())
    assert fresh["word"] < 0.7
    infos = {t.name: t for t in task.trojans()}
    assert infos["word"].target == "business" and "'cf'" in infos["word"].description


# -- defenses through the trainer ----------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["bert.embeddings.word_embeddings", "bert.encoder.layer.0"])
def test_at_and_lat_train_with_padding_masked(
    task: TextClassificationTask, trojaned: torch.nn.Module, site: str
) -> None:
    threat = Threat(norm="l2", epsilon=0.5, epsilon_mode="relative", scope="token")
    batch = next(iter(task.defense_loader(32)))
    torch.manual_seed(0)
    result = LatentAttack([site], threat, PGDConfig(steps=3))(trojaned, task.io, batch)
    delta = result.deltas[site]
    assert delta.shape[:2] == batch[1].shape
    assert torch.all(delta[~batch[1].bool()] == 0), "padding is never perturbed"
    assert delta[batch[1].bool()].abs().sum() > 0 and result.gain > 0

    model = task.build_model()
    model.load_state_dict(trojaned.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kind = "at" if site == task.input_site else "lat"
    defense = DefenseConfig(kind=kind, sites=[site], threat=threat, pgd=PGDConfig(steps=2), clean_weight=0.5)
    fit = Trainer(model, task.io, defense, TrainConfig(steps=3, lr=1e-3), progress=False).fit(
        task.defense_loader(32)
    )
    assert fit.steps == 3 and fit.radii[site] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_round_trip_through_safetensors(
    task: TextClassificationTask, trojaned: torch.nn.Module, tmp_path: Path
) -> None:
    save_model(tmp_path / "m.safetensors", trojaned)
    torch.manual_seed(5)
    other = task.build_model().eval()
    load_model(tmp_path / "m.safetensors", other)
    ids, mask, _ = task.eval_batches(20, 20)[0]
    with torch.no_grad():
        torch.testing.assert_close(
            other(input_ids=ids, attention_mask=mask).logits, trojaned(ids, mask).logits
        )


# -- held-out text attacks -----------------------------------------------------------------------------------
def test_typo_edits_keep_first_and_last_letters() -> None:
    edits = typos("market", random.Random(0))
    assert edits and all(e[0] == "m" and e[-1] == "t" for e in edits)
    assert "makret" in edits and "mrket" in edits and "msrket" in edits  # swap, drop, keyboard neighbour
    assert set(keyboard_neighbours()["s"]) == set("adwezx")


ATTACKS = [
    DeepWordBugSpec(name="dwb", kind="deepwordbug", examples=30),
    PruthiSpec(name="pruthi", kind="pruthi", examples=30, max_words=3),
    PWWSSpec(name="pwws", kind="pwws", examples=30),
]


@pytest.mark.parametrize("spec", ATTACKS, ids=lambda s: s.kind)
def test_text_attacks_fool_an_undefended_model(
    task: TextClassificationTask, trojaned: torch.nn.Module, spec: Any
) -> None:
    texts, labels = task.test.texts, task.test.labels
    outcome = run_attack(trojaned, task.tokenizer, texts, labels, spec, max_length=24, seed=0)
    assert outcome.examples == 30 and outcome.attacked >= 25
    assert outcome.success_rate is not None and outcome.success_rate > 0.3, outcome
    assert outcome.robust_accuracy == pytest.approx(outcome.clean_accuracy * (1 - outcome.success_rate))
    assert outcome.avg_queries is not None and 1 < outcome.avg_queries <= spec.max_queries
    assert outcome.avg_words_changed is not None and outcome.avg_words_changed >= 1
    sample = outcome.samples[0]
    assert sample["perturbed"] != sample["original"]
    again = run_attack(trojaned, task.tokenizer, texts, labels, spec, max_length=24, seed=0)
    assert again.samples == outcome.samples and again.avg_queries == outcome.avg_queries  # reproducible


def test_task_runs_heldout_attacks_and_keeps_their_statistics(
    synthetic_csv: Path, trojaned: torch.nn.Module
) -> None:
    attacks = [{"name": "typos", "kind": "pruthi", "examples": 10, "max_words": 2}]
    task = build_task(section(synthetic_csv), attacks, seed=0, device="cpu")
    [info] = task.heldout_attacks()
    assert (info.site, info.norm, info.black_box) == ("text", None, True) and "Pruthi" in info.description
    robust = task.run_heldout(trojaned, "typos", seed=0)
    details = task.heldout_details()["typos"]
    assert details["robust_accuracy"] == robust
    assert {"success_rate", "avg_queries", "avg_words_changed", "examples"} <= set(details)


# -- the pipeline --------------------------------------------------------------------------------------------
def test_quick_run_end_to_end(synthetic_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {
        "task.data": str(synthetic_csv), "task.tiny": json.dumps({**TINY, "layers": 6}),
        "task.max_length": 24,
        "task.base_train_size": 300, "task.defense_train_size": 64, "task.test_size": 64,
        "task.base_epochs": 4, "training.steps": 2, "training.checkpoint_every": 1, "batch_size": 32,
        "evaluation.attacks.deepwordbug.examples": 4, "evaluation.attacks.pruthi.examples": 4,
        "evaluation.attacks.pwws.examples": 4, "evaluation.latent_examples": 16,
        "evaluation.latent_pgd.steps": 2, "evaluation.sanity_examples": 16,
    }  # fmt: skip
    args = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    config = str(EMBEDDED / "text_bbc.yaml")
    assert main(["run", config, "--quick", "--no-progress", "--out", str(out), *args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["defense"] for r in results["records"]] == ["none", "clean", "at", "lat", "rlat"]
    keys = set(flat_metrics(results["records"][0]["metrics"]))
    assert {"clean_accuracy", "asr/word", "asr/phrase", "asr/style"} <= keys
    assert {"robust/deepwordbug", "robust/pruthi", "robust/pwws"} <= keys
    assert {f"latent/block:{p}%" for p in (20, 50, 90)} <= keys  # blocks 1, 3, 5 of 6
    seen = {t["name"]: t["seen_by"] for t in results["heldout_threats"]}
    assert seen["latent/block:50%"] == ["lat"] and seen["latent/block:20%"] == []
    assert results["layer_order"][:3] == ["block:20%", "block:50%", "block:90%"]
    assert seen["deepwordbug"] == [] and seen["pruthi"] == []
    at = next(r for r in results["records"] if r["defense"] == "at")
    assert at["calibration"]["embeddings"]["epsilon_abs"] > 0
    assert all(r["sanity"]["hook_fired"] for r in results["records"])
    details = results["records"][0]["heldout_details"]
    assert set(details) == {"deepwordbug", "pruthi", "pwws"} and details["pwws"]["examples"] == 4
    report = (out / "report.md").read_text()
    assert "| lat " in report and "## Held-out attack statistics" in report
