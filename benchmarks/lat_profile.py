"""Where the time of one exact-LAT training step goes, against its analytic limit (issue 22).

    python benchmarks/lat_profile.py --models cnn,smollm2 --threads 2 --repeats 3 --json lat_profile.json
    python benchmarks/lat_profile.py --models cnn --compile cnn           # + torch.compile of the inner loop
    python benchmarks/lat_profile.py --models smollm2 --batch 2 --seq 32 --repeats 1  # a quick smoke run

One ``Trainer.train_step`` of the library (``defense: lat``, exact LAT: k PGD steps through the suffix with
frozen weights, then the update) runs under ``torch.profiler``; the engine marks its phases with
``lat/...`` ranges (``engine.attack.phase``: a no-op unless a profiler records), and the step's wall time
is split over them:

- ``attack/capture``   the clean pass that records the site's activation and the prefix outputs;
- ``attack/start``     the random start of δ;
- ``attack/forward``   per PGD step: the suffix forward and the loss (the prefix is replayed);
- ``attack/backward``  per PGD step: the backward to δ only (weights frozen);
- ``attack/step``      per PGD step: the ascent step on δ, its projection and the finite checks;
- ``train/forward``    the update's forward with the final δ and its loss;
- ``train/backward``   the update's backward (weight gradients);
- ``train/grad_check`` the finite check of the gradients;
- ``train/optimizer``  the optimizer step, schedule and zeroing of the gradients;
- ``other``            the rest: the step's wall time minus the ranges (Python glue, hooks, model modes).

The limit of each phase is scaled from a plain step (``defense: clean``, profiled the same way: forward
``t_f``, backward ``t_b``) by the FLOP split of the forward at the site (``latent_speed.flop_split``: the
prefix does a share ``p`` of the forward FLOPs): the capture needs only the prefix (``p·t_f``), a PGD step's
forward the suffix (``(1-p)·t_f``), its backward the input-gradient half of the suffix's backward
(``(1-p)·t_b/2``), the update what a plain step does (its optimizer step and glue included; the finite
check of the gradients and the steps on δ are left out). Their sum is the limit of the LAT step, i.e.
``p + k·(suffix fwd + bwd) + 1 full fwd + bwd`` in FLOPs. Both steps are also timed without the profiler
(interleaved, median), which gives the profiler's own cost.

``--compile MODELS`` also times the inner loop alone (the engine's ``pgd`` over k steps, with the prefix
cache and the site hook exactly as ``LatentAttack`` sets them up) eager and under ``torch.compile``
(inductor on the CPU) in two forms: the callable that runs the suffix (``run_with``: δ in, objective out;
the engine's replay of the prefix and its hooks are Python that dynamo breaks its graph at), and each
outermost module of the suffix compiled in place (``nn.Module.compile``: later blocks, final norm, head),
the engine left eager. Each is timed after a warm-up call; the compile time (first call minus a warm one),
the graphs, the graph breaks and how far the final δ moved are reported. Nothing is asserted.

Models: the image CNN (``ResNetCNN(width=16)``, batch 128, sites ``stem`` and ``block2``, relative L2
ε=0.5, k=8, Adam) and SmolLM2-135M-Instruct at the input of layer 4 (``model.layers.3``) on issue 22's
step: batch 8 × 128 tokens, loss on every position, L2 ε = 8 per example, k=6, full fine-tuning with AdamW.
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
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in this process, no worker pool

import torch
from free_lat import Case
from latent_speed import Bench, _embedding_site, build_cnn, flop_split
from torch import nn
from torch._dynamo.utils import counters as dynamo_counters
from torch.profiler import ProfilerActivity, profile

from latentguard.engine import attack as attack_module
from latentguard.engine.attack import LatentAttack, PGDConfig, _positions_for
from latentguard.engine.io import ModelIO
from latentguard.engine.site import Intervention, frozen
from latentguard.engine.threat import Threat
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer

LAT_PHASES = {
    "attack/capture": "clean pass: site activation + prefix record",
    "attack/start": "random start of δ",
    "attack/forward": "PGD: suffix forward + loss",
    "attack/backward": "PGD: backward to δ (activation gradient)",
    "attack/step": "PGD: ascent step + projection of δ",
    "train/forward": "update: forward with δ + loss",
    "train/backward": "update: backward",
    "train/grad_check": "update: finite check of the gradients",
    "train/optimizer": "update: optimizer step",
}
PLAIN_FORWARD = "train/clean_forward"  # the plain (``clean``) step's forward
PGD_PHASES = ("attack/forward", "attack/backward", "attack/step")


@dataclass
class StepProfile:
    """One profiled training step: wall time and the ``lat/...`` ranges in it (seconds, in order)."""

    total: float
    ranges: list[tuple[str, float]]

    def seconds(self, name: str) -> float:
        return sum(s for n, s in self.ranges if n == name)

    def each(self, name: str) -> list[float]:
        return [s for n, s in self.ranges if n == name]

    @property
    def other(self) -> float:
        return self.total - sum(s for _, s in self.ranges)


@dataclass
class CaseResult:
    name: str
    note: str
    site: str
    steps: int
    prefix_share: float  # of the forward FLOPs
    forward_gflops: float
    wall: dict[str, list[float]] = field(default_factory=dict)  # kind -> unprofiled step times
    profiled: dict[str, list[StepProfile]] = field(default_factory=dict)  # kind -> profiled steps
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # table rows, filled by analyse
    compile: dict[str, Any] = field(default_factory=dict)


# -- models -------------------------------------------------------------------------------------------------
def cnn_cases(steps: int | None) -> list[Case]:
    bench = build_cnn()
    threat = Threat(norm="l2", epsilon=0.5, epsilon_mode="relative")
    train = TrainConfig(steps=1, lr=1e-3, optimizer="adam")
    k = steps or 8
    return [
        Case(bench, site, threat, k, train, f"CNN, site `{site}`, relative L2 ε=0.5, k={k}, Adam")
        for site in ("stem", "block2")
    ]


def smollm2_cases(steps: int | None, batch: int, seq: int) -> list[Case]:
    from latentguard.domains.text_gen.model import CausalLMIO, load_causal_lm, pretrained_path

    model = load_causal_lm(pretrained_path("smollm2"))  # float32, converted once from the GGUF file
    torch.manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (batch, seq))
    tokens = (ids, torch.ones_like(ids), ids.clone())  # loss on every position
    site = "model.layers.3"  # its output is the input of layer 4 (the paper's default)
    description = f"SmolLM2-135M-Instruct (float32), batch {batch}×{seq} tokens, loss on every position"
    bench = Bench(
        "smollm2", description, model, CausalLMIO(), tokens, {"early": site}, _embedding_site(model)
    )
    k = steps or 6
    train = TrainConfig(steps=1, lr=1e-5, optimizer="adamw")
    note = f"SmolLM2-135M, {batch}×{seq} tokens, input of layer 4, L2 ε=8, k={k}, AdamW"
    return [Case(bench, site, Threat(norm="l2", epsilon=8.0), k, train, note)]


def smollm2_available() -> str | None:
    """Why SmolLM2 cannot be profiled here, or ``None``."""
    try:
        from latentguard.domains.text_gen.model import smollm2_folder

        smollm2_folder()
    except Exception as exc:  # the library's message says what to install
        return str(exc)
    return None


# -- the training step --------------------------------------------------------------------------------------
def trainer_for(case: Case, kind: str) -> Trainer:
    if kind == "plain":
        defense = DefenseConfig(kind="clean")
    else:
        defense = DefenseConfig(
            kind="lat", sites=[case.site], threat=case.threat, pgd=PGDConfig(steps=case.steps)
        )
    trainer = Trainer(case.bench.model, case.bench.io, defense, case.train, progress=False)
    if trainer.attack is not None and case.threat.epsilon_mode == "relative":
        trainer.attack.unit_sizes[case.site] = case.bench.unit_size(case.site)
    return trainer


def profile_step(trainer: Trainer, batch: Any) -> StepProfile:
    """One ``train_step`` under ``torch.profiler`` (CPU): its wall time and its ``lat/...`` ranges."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        trainer.train_step(batch)
        total = time.perf_counter() - start
    marks = sorted(
        (event.time_range.start, event.name[len("lat/") :], event.time_range.elapsed_us() / 1e6)
        for event in prof.events()
        if event.name.startswith("lat/")
    )
    return StepProfile(total, [(name, seconds) for _, name, seconds in marks])


@contextmanager
def collection_paused() -> Iterator[None]:
    """As timeit does: a garbage collection must not land inside a timed step."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measure(case: Case, repeats: int, log: Callable[[str], None]) -> CaseResult:
    prefix, whole = flop_split(case.bench, case.site)
    result = CaseResult(
        case.bench.name, case.note, case.site, case.steps, prefix / whole, whole / 1e9,
        {"plain": [], "lat": []}, {"plain": [], "lat": []},
    )  # fmt: skip
    trainers = {kind: trainer_for(case, kind) for kind in ("plain", "lat")}
    batch = case.bench.batch
    for kind, trainer in trainers.items():  # warm-up: first-call allocations, optimizer state
        start = time.perf_counter()
        trainer.train_step(batch)
        log(f"  {case.note}: {kind} warm-up {time.perf_counter() - start:.3f} s")
    with collection_paused():
        for repeat in range(repeats):
            for kind, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_step(batch)
                result.wall[kind].append(time.perf_counter() - start)
                log(f"  {case.note}: {kind} run {repeat + 1}: {result.wall[kind][-1]:.3f} s")
    for repeat in range(repeats):
        for kind, trainer in trainers.items():
            with collection_paused():
                step = profile_step(trainer, batch)
            result.profiled[kind].append(step)
            log(f"  {case.note}: {kind} profiled run {repeat + 1}: {step.total:.3f} s")
    analyse(result)
    return result


def median_run(steps: list[StepProfile]) -> StepProfile:
    """The profiled run whose wall time is the median (one consistent run, not a mix of runs)."""
    return sorted(steps, key=lambda s: s.total)[(len(steps) - 1) // 2]


def analyse(result: CaseResult) -> None:
    """Seconds and limit per phase, from the median profiled LAT and plain steps."""
    lat, plain = median_run(result.profiled["lat"]), median_run(result.profiled["plain"])
    p, k = result.prefix_share, result.steps
    t_f, t_b = plain.seconds(PLAIN_FORWARD), plain.seconds("train/backward")
    limits = {
        "attack/capture": p * t_f,
        "attack/start": 0.0,
        "attack/forward": k * (1 - p) * t_f,
        "attack/backward": k * (1 - p) * t_b / 2,
        "attack/step": 0.0,
        "train/forward": t_f,
        "train/backward": t_b,
        "train/grad_check": 0.0,  # a safety check, no part of the algorithm
        "train/optimizer": plain.seconds("train/optimizer"),
        "other": plain.other,
    }
    rows: dict[str, dict[str, float]] = {}
    for name in (*LAT_PHASES, "other"):
        seconds = lat.other if name == "other" else lat.seconds(name)
        rows[name] = {"seconds": seconds, "share": seconds / lat.total, "limit": limits[name]}
    rows["total"] = {"seconds": lat.total, "share": 1.0, "limit": sum(limits.values())}
    result.phases = rows


# -- torch.compile of the inner loop ---------------------------------------------------------------------
COMPILE_MODES = ("callable", "regional")


def suffix_modules(model: nn.Module, io: ModelIO, batch: Any, site: str) -> list[str]:
    """The outermost modules whose first call starts after ``site``'s first call has ended: what the suffix
    runs (CNN at ``block2``: ``block3``, ``head``; a decoder: the later blocks, the final norm, the head)."""
    clock, starts, ends = [0], {}, {}
    names = {module: name for name, module in model.named_modules() if name}

    def before(module: nn.Module, args: Any) -> None:
        clock[0] += 1
        starts.setdefault(names[module], clock[0])

    def after(module: nn.Module, args: Any, output: Any) -> None:
        clock[0] += 1
        ends.setdefault(names[module], clock[0])

    handles = [m.register_forward_pre_hook(before) for m in names]
    handles += [m.register_forward_hook(after) for m in names]
    try:
        with frozen(model), torch.no_grad():  # eval mode: batch norms keep their statistics
            io.forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    later = [name for name, start in starts.items() if start > ends[site]]
    return [name for name in later if not any(name.startswith(other + ".") for other in later)]


def inner_loop(case: Case, mode: str, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The engine's ``pgd`` over k steps as ``LatentAttack.__call__`` runs it (prefix cache active, hook on
    the site, weights frozen), seconds per call. ``mode``: ``eager``; ``callable``: the callable that runs
    the suffix (``run_with``: δ in, objective out) wrapped in ``torch.compile``; ``regional``: every
    outermost module of the suffix compiled in place (``nn.Module.compile``, undone afterwards)."""
    bench = case.bench
    model, io, batch = bench.model, bench.io, bench.batch
    attack = LatentAttack([case.site], case.threat, PGDConfig(steps=case.steps))
    if case.threat.epsilon_mode == "relative":
        attack.unit_sizes[case.site] = bench.unit_size(case.site)
    regional = suffix_modules(model, io, batch, case.site) if mode == "regional" else []
    cache = attack.prefix_cache(model)
    references = attack.capture(model, io, batch, cache)
    positions = io.positions(batch)
    masks = {site: _positions_for(ref, positions) for site, ref in references.items()}
    times: list[float] = []
    torch._dynamo.reset()
    dynamo_counters.clear()
    with ExitStack() as stack:
        stack.enter_context(frozen(model, train=attack.config.model_mode == "train"))
        hooks = stack.enter_context(Intervention(model, attack.sites))
        if cache is not None:
            stack.enter_context(cache.active())
        for name in regional:
            module = model.get_submodule(name)
            module.compile()
            stack.callback(setattr, module, "_compiled_call_impl", None)

        def run_with(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
            hooks.deltas = deltas
            return attack.objective(lambda b: io.forward(model, b), io, batch)

        objective = torch.compile(run_with) if mode == "callable" else run_with

        def one() -> Any:
            torch.manual_seed(1)
            return attack_module.pgd(
                objective, references, attack.radii(), attack.threats(), attack.config, masks
            )

        start = time.perf_counter()
        one()  # compiles, where anything is compiled
        first_seconds = time.perf_counter() - start
        log(f"  {case.note}: inner loop {mode}, first call {first_seconds:.2f} s")
        with collection_paused():
            for _ in range(repeats):
                start = time.perf_counter()
                last = one()
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "runs": times,
        "first_call": first_seconds,
        "compile_seconds": first_seconds - seconds,
        "compiled_modules": regional,
        "graphs": int(dynamo_counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(dynamo_counters["resumes"].values())),  # code resumed after a break
        "delta": last.deltas[case.site],
    }


def measure_compile(case: Case, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Eager against each compiled form of the inner loop on one case; ``error`` where compiling failed."""
    eager = inner_loop(case, "eager", repeats, log)
    found: dict[str, Any] = {"eager": _public(eager)}
    for mode in COMPILE_MODES:
        try:
            compiled = inner_loop(case, mode, repeats, log)
        except Exception as exc:  # report, do not hide: what failed to compile
            found[mode] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            continue
        gain = eager["seconds"] - compiled["seconds"]
        found[mode] = {
            **_public(compiled),
            "speedup": eager["seconds"] / compiled["seconds"],
            "delta_relative_difference": float(
                (compiled["delta"] - eager["delta"]).norm() / eager["delta"].norm().clamp_min(1e-12)
            ),
            "break_even_attacks": compiled["compile_seconds"] / gain if gain > 0 else None,
        }
    return found


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in run.items() if key != "delta"}


# -- report --------------------------------------------------------------------------------------------------
def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


def table(result: CaseResult) -> str:
    lat, plain = median_run(result.profiled["lat"]), median_run(result.profiled["plain"])
    wall_lat, wall_plain = statistics.median(result.wall["lat"]), statistics.median(result.wall["plain"])
    p, k = result.prefix_share, result.steps
    flop_ratio = (p + 2 * k * (1 - p) + 3) / 3
    lines = [
        f"### {result.note}",
        "",
        f"Site `{result.site}`: the prefix does {p:.1%} of the {result.forward_gflops:.2f} GFLOP forward. "
        f"Unprofiled (median of {len(result.wall['lat'])}): LAT step {_fmt(wall_lat)}, plain step "
        f"{_fmt(wall_plain)}, LAT / plain {wall_lat / wall_plain:.2f}×; FLOP model "
        f"(p + 2k(1-p) + 3) / 3 = {flop_ratio:.2f}×. Profiled: LAT {_fmt(lat.total)} (profiler cost "
        f"{lat.total / wall_lat - 1:+.0%}), plain {_fmt(plain.total)} (forward "
        f"{_fmt(plain.seconds(PLAIN_FORWARD))}, backward {_fmt(plain.seconds('train/backward'))}).",
        "",
        "| phase | seconds | share of the step | limit | measured / limit |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, row in result.phases.items():
        label = "total" if name == "total" else f"`{name}` {LAT_PHASES.get(name, 'the rest (glue)')}"
        if name in PGD_PHASES:
            label += f" (×{k})"
        ratio = f"{row['seconds'] / row['limit']:.2f}" if row["limit"] > 0 else "–"
        limit = _fmt(row["limit"]) if row["limit"] > 0 else "–"
        bold = "**" if name == "total" else ""
        lines.append(
            f"| {bold}{label}{bold} | {bold}{_fmt(row['seconds'])}{bold} | {row['share']:.1%} | {limit} "
            f"| {ratio} |"
        )
    lines += ["", "Per PGD step (ms): " + "; ".join(
        f"{i + 1}: " + " + ".join(f"{s * 1000:.1f}" for s in step)
        for i, step in enumerate(zip(*(lat.each(n) for n in PGD_PHASES), strict=True))
    ) + " (forward + backward + step)"]  # fmt: skip
    if result.compile:
        lines += ["", compile_line(result.compile)]
    return "\n".join(lines)


def compile_line(found: dict[str, Any]) -> str:
    eager = found["eager"]
    lines = [
        f"torch.compile of the inner loop (k PGD steps, median of {len(eager['runs'])} after a warm-up): "
        f"eager {_fmt(eager['seconds'])}",
        "",
        "| compiled | seconds | speed-up | compile time | pays off after | graphs | breaks | δ differs |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for mode in COMPILE_MODES:
        run = found.get(mode)
        if run is None:
            continue
        what = "`run_with` (δ → loss)" if mode == "callable" else "suffix modules in place"
        if "error" in run:
            lines.append(f"| {what} | failed: {run['error']} | | | | | | |")
            continue
        even = run["break_even_attacks"]
        pays = "never" if even is None else f"{even:.0f} attacks"
        lines.append(
            f"| {what} | {_fmt(run['seconds'])} | **{run['speedup']:.2f}×** | {_fmt(run['compile_seconds'])} "
            f"| {pays} | {run['graphs']} | {run['graph_breaks']} | {run['delta_relative_difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="cnn,smollm2", help="comma-separated: cnn, smollm2")
    parser.add_argument("--repeats", type=int, default=3, help="timed and profiled steps per kind")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, help="PGD steps k (default: CNN 8, SmolLM2 6)")
    parser.add_argument("--batch", type=int, default=8, help="SmolLM2 batch size")
    parser.add_argument("--seq", type=int, default=128, help="SmolLM2 sequence length")
    parser.add_argument(
        "--compile",
        default="",
        help="models whose inner loop is also timed under torch.compile (cnn,smollm2)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    to_compile = {n.strip() for n in args.compile.split(",") if n.strip()}

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load = os.getloadavg()
    print(f"# lat_profile, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU cores; load average at "
        f"start {', '.join(f'{x:.2f}' for x in load)}; command: "
        f"`python benchmarks/lat_profile.py {' '.join(sys.argv[1:])}`\n"
    )
    results: list[CaseResult] = []
    for name in names:
        if name == "smollm2" and (reason := smollm2_available()):
            print(f"skipped smollm2: {reason}\n")
            continue
        if name not in ("cnn", "smollm2"):
            parser.error(f"unknown model {name!r}: choose cnn, smollm2")
        cases = cnn_cases(args.steps) if name == "cnn" else smollm2_cases(args.steps, args.batch, args.seq)
        for case in cases:
            result = measure(case, args.repeats, log)
            if name in to_compile:
                result.compile = measure_compile(case, args.repeats, log)
            results.append(result)
            print(table(result) + "\n", flush=True)
    print(f"load average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        payload = {
            "load_average_at_start": load,
            "threads": args.threads,
            "torch": torch.__version__,
            "results": [
                {**asdict(r), "profiled": {k: [asdict(s) for s in v] for k, v in r.profiled.items()}}
                for r in results
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
