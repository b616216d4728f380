"""One training step of the LAT paper's own trainer (LATSFTTrainer, Casper et al. 2024), timed.

Runs in the scratch venv (transformers 4.36.2, trl 0.7.6, accelerate 0.25.0, the peer's pins; torch 2.13.0
because the pinned 2.1.2 is not installable here). Builds the model and trainer the way the peer's lat.py
does for Llama (LATLlamaForCausalLM + LATSFTTrainer, perturb_target 'residuals', random_init True,
std_normalization False, keep_in_eval True, L2), on SmolLM2-135M-Instruct (a Llama) in float32 with eager
attention, and times one optimizer step: ``trainer.training_step`` (the peer's compute_loss: adv_attack's
PGD, then the perturbed forward and backward) followed by what Trainer's loop does at an accumulation
boundary (optional grad clipping, optimizer.step, lr_scheduler.step, model.zero_grad).

Lives in latentguard's benchmarks/peer/ (it holds none of the peer's code: it imports it from $PAPER/peer)
and runs with the scratch venv's python; benchmarks/paper_trainer_side_by_side.py says how to set that up.

    python time_paper.py --layer 4 --repeats 3 --threads 1      # δ at the input of layer 4 (0-based)
    python time_paper.py --layer none --repeats 3 --threads 1   # plain step (epsilon 0: no adversary)

Prints one JSON line: cell, seconds (timed runs after one untimed warm-up), median, peak RSS, clean loss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: peak_rss
from peak_rss import status_kib, timed_steps

PAPER = Path(os.environ.get("PAPER", "/work/scratch/paper-lat"))  # the scratch folder (see the docstring)


def legacy_tokenizer(folder: Path) -> Any:
    """The saved tokenizer.json (written by tokenizers >= 0.20) made readable by tokenizers 0.15.

    Newer files store BPE merges as pairs; 0.15 wants "a b" strings. The tokenizer only satisfies the
    trainer's constructor here: the batch is random token ids.
    """
    import transformers
    from tokenizers import Tokenizer

    spec = json.loads((folder / "tokenizer.json").read_text())
    merges = spec["model"].get("merges", [])
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    spec["model"].pop("ignore_merges", None)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    tok.pad_token = tok.eos_token  # as lat.py does
    tok.padding_side = "right"
    return tok


def load_model(folder: Path, attn: str = "eager") -> Any:
    """LATLlamaForCausalLM from the float32 safetensors folder, config fixed up for transformers 4.36.

    ``attn="eager"`` forces eager attention. 4.36.2 ignores ``attn_implementation="eager"`` when a config
    object is passed (its getter already reads "eager"), so it is set on the config. ``attn="lat.py"``
    loads as lat.py does (no attn_implementation): 4.36.2 then picks "sdpa" on torch >= 2.1.1.
    """
    import torch
    import transformers
    from lat_model import LATLlamaForCausalLM

    config = transformers.LlamaConfig.from_pretrained(str(folder))
    rope = getattr(config, "rope_parameters", None)  # transformers 5 nests rope_theta here
    if isinstance(rope, dict):
        assert rope.get("rope_type", "default") == "default", rope
        config.rope_theta = float(rope["rope_theta"])
        del config.rope_parameters
    for key in ("dtype",):  # 5.x name of torch_dtype; unknown to 4.36
        if hasattr(config, key):
            delattr(config, key)
    if attn == "eager":
        config._attn_implementation = "eager"
    model, info = LATLlamaForCausalLM.from_pretrained(
        str(folder), config=config, torch_dtype=torch.float32, output_loading_info=True
    )
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]
    assert not missing and not info["unexpected_keys"], info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    if attn == "eager":
        assert model.config._attn_implementation == "eager", model.config._attn_implementation
        assert not model.model._use_sdpa
    assert model.config.rope_theta == 100000.0, model.config.rope_theta
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layer",
        choices=("none", "4", "15"),
        default="4",
        help="perturb_layer (δ added to the input of this 0-based decoder layer); none: plain",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="Trainer's gradient clipping (lat.py uses 0.25; 0 = off, as latentguard's default)",
    )
    parser.add_argument("--model", type=Path, default=PAPER / "smollm2")
    parser.add_argument("--peer", type=Path, default=PAPER / "peer")
    parser.add_argument("--clean-loss-only", action="store_true", help="only the clean forward's loss")
    parser.add_argument(
        "--attn",
        choices=("eager", "lat.py"),
        default="eager",
        help="lat.py: load as lat.py does (4.36.2 then picks sdpa; see load_model)",
    )
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    sys.path.insert(0, str(args.peer))
    from lat_trainer import LATSFTTrainer  # seeds torch with the clock on import, as in the peer's code

    model = load_model(args.model, args.attn)
    torch.manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.eval()
    with torch.no_grad():
        clean_loss = float(model(**inputs).loss)
    layer = None if args.layer == "none" else int(args.layer)
    cell = "plain" if layer is None else f"lat-layer{layer}"
    result: dict[str, Any] = {
        "side": "paper",
        "cell": cell,
        "clean_loss": clean_loss,
        "batch": [args.batch, args.seq],
        "threads": args.threads,
        "attn_implementation": model.config._attn_implementation,
    }
    if args.clean_loss_only:
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as out:
        training_args = transformers.TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            learning_rate=args.lr,
            weight_decay=0.0,
            max_grad_norm=args.max_grad_norm,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
            max_steps=1000,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            evaluation_strategy="no",
            disable_tqdm=True,
        )
        trainer = LATSFTTrainer(
            model=model,
            args=training_args,
            tokenizer=legacy_tokenizer(args.model),
            dataset_text_field="text",
            max_seq_length=args.seq,
            packing=False,
            perturb_layer=layer,
            epsilon=0.0 if layer is None else args.epsilon,
            steps=args.steps,
            norm_type="l2",
            random_init=True,
            std_normalization=False,
            keep_in_eval=True,
            perturb_target="residuals",
        )
        # what Trainer.train sets up before its loop (4.36: _inner_training_loop)
        trainer.create_optimizer_and_scheduler(num_training_steps=training_args.max_steps)
        wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.model_wrapped = wrapped
        trainer.is_in_train = True
        optimizer_name = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__
        losses: list[float] = []

        def step() -> None:
            loss = trainer.training_step(wrapped, inputs)
            if args.max_grad_norm > 0:
                trainer.accelerator.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            wrapped.zero_grad()
            losses.append(float(loss))

        seconds, reset, rss_before = timed_steps(step, args.repeats)
        peak = status_kib("VmHWM") if reset else None
    result.update(
        seconds=seconds,
        median=statistics.median(seconds),
        peak_rss_gb=(peak or 0) / 2**20 if reset else None,
        rss_before_steps_gb=(rss_before or 0) / 2**20,
        peak_rss_process_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        step_losses=losses,
        optimizer=optimizer_name,
        epsilon=0.0 if layer is None else args.epsilon,
        pgd_steps=0 if layer is None else args.steps,
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
