"""Any Hugging Face architecture from the shipped text configs with only ``task.model`` and ``task.data``
changed (plus ``--quick`` and sizes that keep it fast), and preflight: every model-dependent mistake is
rejected before the run folder exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import flat_metrics
from hf_tiny import save_causal_lm, save_classifier, write_news_csv

from latentguard.cli import main
from latentguard.config import EMBEDDED, load_config
from latentguard.domains import build_task
from latentguard.errors import ConfigError
from latentguard.preflight import preflight

CLS_CONFIG = str(EMBEDDED / "text_bbc.yaml")
GEN_CONFIG = str(EMBEDDED / "text_gen_smollm2.yaml")

CLS_TINY = {
    "task.max_length": 24, "task.max_words": 16, "task.base_train_size": 120, "task.defense_train_size": 32,
    "task.test_size": 32, "task.base_epochs": 1, "batch_size": 16, "training.steps": 2,
    "evaluation.attacks.deepwordbug.examples": 2, "evaluation.attacks.pruthi.examples": 2,
    "evaluation.attacks.pwws.examples": 2, "evaluation.latent_examples": 8, "evaluation.latent_pgd.steps": 2,
    "evaluation.sanity_examples": 4, "evaluation.batch_size": 8, "threads": 1,
}  # fmt: skip
GEN_TINY = {
    "task.base_train_size": 16, "task.defense_train_size": 8, "task.test_size": 4, "task.asr_prompts": 2,
    "task.max_prompt_tokens": 48, "task.generation_batch_size": 8, "batch_size": 4, "training.steps": 1,
    "evaluation.attacks.prefill_deployment.prompts": 2, "evaluation.attacks.embedding_phrase.prompts": 2,
    "evaluation.latent_examples": 2, "evaluation.sanity_examples": 2, "evaluation.batch_size": 4,
    "threads": 1,
}  # fmt: skip


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random GPT-2, GPT-NeoX, DistilBERT and RoBERTa folders, each with an offline tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    models = {arch: save_causal_lm(root / arch, arch) for arch in ("gpt2", "gpt_neox")}
    models |= {arch: save_classifier(root / arch, arch) for arch in ("distilbert", "roberta")}
    return models


@pytest.fixture(scope="session")
def news(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_news_csv(tmp_path_factory.mktemp("data") / "news.csv", 300)


@pytest.fixture(autouse=True)
def _answer_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated answers are cached under XDG_CACHE_HOME: keep them out of the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def args(config: str, sizes: dict[str, object], **changed: object) -> list[str]:
    """``config --quick`` with the tiny sizes and the changed keys as ``--set`` overrides."""
    pairs = {**sizes, **{key.replace("__", "."): value for key, value in changed.items()}}
    flags = [arg for key, value in pairs.items() for arg in ("--set", f"{key}={value}")]
    return [config, "--quick", "--no-progress", *flags]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# -- text classification and generation on other architectures -------------------------------------------
@pytest.mark.parametrize("arch", ["distilbert", "roberta"])
def test_text_cls_runs_on_other_encoders(
    arch: str, hf_models: dict[str, Path], news: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = args(CLS_CONFIG, CLS_TINY, task__model=hf_models[arch], task__data=news)
    assert main(["run", *argv, "--out", str(out)]) == 0
    res = results(out)
    assert [r["defense"] for r in res["records"]] == ["none", "clean", "at", "lat", "rlat"]
    assert {"latent/block:20%", "latent/block:50%", "robust/pwws", "asr/word"} <= set(
        flat_metrics(res["records"][0]["metrics"])
    )
    seen = {t["name"]: t["seen_by"] for t in res["heldout_threats"]}
    assert seen["latent/block:20%"] == [] and seen["latent/block:50%"] == ["lat"]  # block 0 vs block 1 of 2
    at = next(r for r in res["records"] if r["defense"] == "at")
    assert at["sites"] == ["embeddings"] and at["calibration"]["embeddings"]["epsilon_abs"] > 0
    assert all(r["sanity"]["hook_fired"] for r in res["records"])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_text_gen_runs_on_other_decoders(
    arch: str, hf_models: dict[str, Path], news: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = args(GEN_CONFIG, GEN_TINY, task__model=hf_models[arch], task__data=news)
    assert main(["run", *argv, "--out", str(out)]) == 0
    res = results(out)
    assert [r["defense"] for r in res["records"]] == ["none", "clean", "at", "lat", "rlat", "tlat"]
    metrics = flat_metrics(res["records"][-1]["metrics"])
    assert {"latent/block:14%", "robust/gcg_deployment", "asr/deployment", "clean_agreement"} <= set(metrics)
    seen = {t["name"]: t["seen_by"] for t in res["heldout_threats"]}
    assert seen["latent/block:14%"] == ["lat", "tlat"]  # block:14% and block:27% are both block 0 of 2
    assert seen["embedding_phrase"] == ["at"]  # the attack names the module, AT the alias: one site
    assert "task.max_new_tokens raised from 16 to 26 tokens" in (out / "report.md").read_text()  # --quick: 16
    for name in ("clean", "lat", "tlat"):
        assert json.loads((out / "seed-0" / name / "train.json").read_text())["steps"] == 1  # LoRA trained


# -- preflight: rejected before any file ---------------------------------------------------------------------
def rejected(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["run", *argv, "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2, message
    assert not out.exists(), "preflight must reject before the run folder is made"
    return message.removeprefix("latentguard: error: ").strip()


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (
            {"task__lora__targets": "[o_proj]"},
            "task.lora.targets: no module named 'o_proj' in GPT2LMHeadModel",
        ),
        ({"defenses__lat__sites": "[block:7]"}, "defenses.3.sites: site 'block:7': the model has 2 blocks"),
        ({"defenses__tlat__sites": "[model.layers.0]"}, "defenses.5.sites: unknown layer 'model.layers.0'"),
        ({"evaluation__latent_layers": "[block:150%]"}, "evaluation.latent_layers.0: site 'block:150%'"),
        (
            {"task__max_new_tokens": 4, "task__grow_max_new_tokens": "false"},
            "task.max_new_tokens: 4 tokens cannot hold the target of trojan 'phrase' (26 tokens",
        ),
        ({"defenses__lat__threat": "{block:0: {epsilon: -1}}"}, "defenses.3.threat.block:0.epsilon"),
        (
            {"defenses__lat__threat": "{block:1: {epsilon: 1}}"},
            "defenses.3.threat: per-site threats need one entry for each of sites ['block:27%']; "
            "missing: ['block:27%'], not a site: ['block:1']",
        ),
    ],
)
def test_preflight_rejects_model_dependent_mistakes_before_any_file(
    changed: dict[str, object],
    expected: str,
    hf_models: dict[str, Path],
    news: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = args(GEN_CONFIG, GEN_TINY, task__model=hf_models["gpt2"], task__data=news, **changed)
    message = rejected(argv, tmp_path / "run", capsys)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_preflight_rejects_a_site_that_fires_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``block1.relu`` is one ReLU the residual block calls twice: the same δ would be added twice."""
    argv = ["--quick", "--no-progress", "--set", "defenses.lat.sites=[block1.relu]", "--set", "threads=1"]
    message = rejected(argv, tmp_path / "run", capsys)
    assert message.startswith("defenses.3.sites: site 'block1.relu' ran 2 times in one forward"), message
    config = load_config(None, ["defenses.lat.sites=[block1.relu]", "allow_repeated_sites=[block1.relu]"])
    assert preflight(config).kind == "image_cls"  # explicitly allowed


def test_preflight_names_the_split_keys_to_lower(
    hf_models: dict[str, Path], news: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = args(CLS_CONFIG, {}, task__model=hf_models["distilbert"], task__data=news)  # --quick wants 1,300
    message = rejected(argv, tmp_path / "run", capsys)
    assert message.startswith(
        "task.base_train_size + task.defense_train_size + task.test_size: the data has 300"
    ), message
    assert "1000 + 150 + 150" in message and "--set task.base_train_size=" in message


def test_missing_chat_template_is_rejected(
    hf_models: dict[str, Path], news: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    folder = shutil.copytree(hf_models["gpt_neox"], tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    argv = args(GEN_CONFIG, GEN_TINY, task__model=folder, task__data=news)
    assert rejected(argv, tmp_path / "run", capsys).startswith("task.model: the tokenizer in")


def test_generation_length_grows_to_fit_a_trojan_target_and_says_so(
    hf_models: dict[str, Path], news: Path
) -> None:
    overrides = [f"{k}={v}" for k, v in GEN_TINY.items()]
    overrides += [f"task.model={hf_models['gpt2']}", f"task.data={news}", "task.max_new_tokens=4"]
    config = load_config(Path(GEN_CONFIG), overrides, quick=True)
    task = build_task(config.task, config.evaluation.attacks, 0, "cpu")
    assert task.config.max_new_tokens == 26  # the phrase trojan's target, with this tokenizer
    assert all("task.max_new_tokens raised from 4 to 26 tokens" in t.description for t in task.trojans())
    grown = [a.name for a in task.heldout_attacks() if "raised from 4 to 26" in a.description]
    assert grown == ["gcg_deployment", "prefill_deployment", "embedding_phrase"]
    assert task.victim.max_new_tokens == 26
    with pytest.raises(ConfigError, match=r"^task\.max_new_tokens: 4 tokens cannot hold"):
        build_task({**config.task, "grow_max_new_tokens": False}, config.evaluation.attacks, 0, "cpu")


def test_layers_lists_aliases_and_module_names(
    hf_models: dict[str, Path], news: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["layers", GEN_CONFIG, "--quick", "--set", f"task.model={hf_models['gpt_neox']}", "--set"]
    assert main([*argv, f"task.data={news}"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [
        "embeddings",
        "gpt_neox.embed_in",
        "(AT's",
        "default",
        "site:",
        "sites:",
        "[]",
        "for",
        "kind",
        "at)",
    ] in lines
    assert ["block:0", "gpt_neox.layers.0"] in lines and ["block:1", "gpt_neox.layers.1"] in lines
