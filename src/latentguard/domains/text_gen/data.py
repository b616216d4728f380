"""Chat examples for text generation: prompts built offline from a text corpus, responses from the base model.

Each corpus text becomes one user message from a fixed instruction template ("summarise this news text",
"what is the topic of this news text"). The desired responses are the base model's own greedy answers
(self-distillation keeps its normal behaviour as the thing to preserve), generated once and cached on disk;
``responses: template`` writes them from the text and its label instead (tests, tiny models). Batches are
tokenised with the model's chat template and right-padded; labels cover the response tokens only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from latentguard.domains.text_gen.model import IGNORE, cache_root
from latentguard.runs import atomic_write_json

INSTRUCTIONS = {
    "summary": "Summarise this news text in one sentence: {text}",
    "topic": "What is the topic of this news text? {text}",
}


@dataclass(frozen=True)
class Example:
    """One corpus text as a chat turn: the instruction kind, the text, and its class name."""

    kind: str
    text: str
    label: str

    def message(self, text: str | None = None) -> str:
        return INSTRUCTIONS[self.kind].format(text=self.text if text is None else text)

    def template_response(self) -> str:
        if self.kind == "topic":
            return f"The topic is {self.label}."
        return " ".join(self.text.split()[:12]) + "."


def prompt_ids(tokenizer: Any, message: str) -> list[int]:
    """The chat-templated user turn plus the assistant header, as token ids."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


def fit_text(tokenizer: Any, example: Example, limit: int) -> str:
    """The longest prefix of the example's text (whole words) whose prompt fits in ``limit`` tokens."""
    words = example.text.split()
    while words and len(prompt_ids(tokenizer, example.message(" ".join(words)))) > limit:
        words = words[: max(1, int(len(words) * 0.85))] if len(words) > 1 else []
    return " ".join(words)


def response_ids(tokenizer: Any, response: str, max_new_tokens: int) -> list[int]:
    """The response's tokens (at most ``max_new_tokens``) and the end-of-turn token."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"][:max_new_tokens]
    return [*ids, tokenizer.eos_token_id]


def encode_rows(
    tokenizer: Any, prompts: Sequence[list[int]], responses: Sequence[list[int]], length: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, mask, labels)``: prompt then response, right-padded to ``length``; labels on the response."""
    n = len(prompts)
    ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        both = (prompt + response)[:length]
        ids[row, : len(both)] = torch.tensor(both)
        mask[row, : len(both)] = 1
        labels[row, len(prompt) : len(both)] = torch.tensor(both[len(prompt) :], dtype=torch.long)
    return ids, mask, labels


def paired_set(
    tokenizer: Any,
    prompts: Sequence[list[int]],
    desired: Sequence[list[int]],
    undesired: Sequence[list[int]],
    length: int,
) -> TensorDataset:
    """The six tensors ``CausalLMIO`` reads: each prompt with its desired and its undesired response.

    The undesired labels skip the tokens it shares with the desired response before the two diverge
    ("The topic is …"): unlearning those would fight learning the desired answer.
    """
    other_ids, other_mask, other_labels = encode_rows(tokenizer, prompts, undesired, length)
    for row, (prompt, good, bad) in enumerate(zip(prompts, desired, undesired, strict=True)):
        pairs = zip(good, bad, strict=False)
        shared = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(good), len(bad)))
        if shared < len(bad):
            other_labels[row, len(prompt) : len(prompt) + shared] = IGNORE
    return TensorDataset(
        *encode_rows(tokenizer, prompts, desired, length), other_ids, other_mask, other_labels
    )


def cached_answers(
    identity: str, messages: Sequence[str], max_new_tokens: int, answer: Callable[[], list[str]]
) -> list[str]:
    """The base model's answers to ``messages``, from the disk cache or computed by ``answer()`` once."""
    key = json.dumps([identity, max_new_tokens, list(messages)])
    path = cache_root() / "answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(stored, list) and len(stored) == len(messages):
                return [str(s) for s in stored]
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache file is regenerated
    answers = answer()
    atomic_write_json(path, answers)
    return answers


def model_identity(path: Path) -> str:
    """What the cached answers depend on: the model folder and its weights' sizes and times."""
    stamps = sorted(
        f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in path.glob("*.safetensors")
    )
    return f"{path.resolve()}|{'|'.join(stamps)}"
