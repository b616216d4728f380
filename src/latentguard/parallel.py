"""A run's points on several processes: local workers, a Ray cluster, or the shards of a job array.

A run (or sweep) is a set of points: per seed, the base model (the trojaned model every defense starts
from), then each defense's training and evaluation, which needs its seed's base. A point writes the same
files in the run folder as the sequential pipeline, and seeds its RNG from (seed, defense) as that does
(``pipeline.defense_seed``), so the numbers do not depend on which process runs it, or when.

Any number of processes can share one run folder:
- a **claim** per point, a file created exclusively (``O_CREAT | O_EXCL``) naming its owner's host, pid and
  start time, keeps two processes off one point; a claim whose owner is gone (a dead process on this host,
  or no heartbeat for ``LEASE_SECONDS`` from another host) is taken over, and the point goes on from its
  last checkpoint;
- a base model is trained once: the process that claims it trains it, the others wait for it (a shard
  first takes the points it can start);
- files are written atomically (``runs.py``), so a killed process never leaves a half-written one.

Scheduling is not home-made: local workers are a ``concurrent.futures`` process pool (a defense is
submitted once its base is done), Ray points are Ray tasks with their resources (the base's result is an
argument of its defenses' tasks, so Ray orders them), and shards are what a scheduler's job array starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from latentguard.config import RunConfig
from latentguard.errors import ConfigError, UserError
from latentguard.signals import resume_command

if TYPE_CHECKING:
    from latentguard.domains.base import Task
    from latentguard.pipeline import Pipeline

HEARTBEAT_SECONDS = 30.0  # a claim's owner touches its file this often
LEASE_SECONDS = 600.0  # a claim from another host untouched this long is stale (its owner is gone)
POLL_SECONDS = 0.5  # how often a process waiting for a base model looks again
FAILURES_FILE = "failures.json"
REPORT_CLAIM = "report.claim"
HOST = socket.gethostname()

Status = Literal["done", "failed", "busy"]


# ---------------------------------------------------------------------------------------------- points
@dataclass(frozen=True)
class Point:
    """One unit of a run: a seed's base model (``defense`` None) or one defense trained and evaluated."""

    seed: int
    defense: str | None = None

    @property
    def key(self) -> str:
        """``seed-0`` for the base model, ``seed-0/lat`` for a defense (the folder its files are in)."""
        return f"seed-{self.seed}" + (f"/{self.defense}" if self.defense is not None else "")

    @property
    def base(self) -> Point:
        return Point(self.seed)


def all_points(config: RunConfig) -> list[Point]:
    """Every point of a run in the sequential order: per seed, the base model, then each defense."""
    return [
        point
        for seed in config.seeds
        for point in (Point(seed), *(Point(seed, d.name) for d in config.defenses))
    ]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)`` with ``0 <= I < N``."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise UserError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return i, n


def share(points: Sequence[Point], shard: tuple[int, int] | None) -> list[Point]:
    """Shard ``i/n``'s points: every n-th defense point from the i-th, plus the base models they need
    (each trained by the first shard to claim it; the others take other points meanwhile)."""
    if shard is None:
        return list(points)
    index, count = shard
    defenses = [p for p in points if p.defense is not None]
    mine = {p for k, p in enumerate(defenses) if k % count == index}
    mine |= {p.base for p in mine}
    return [p for p in points if p in mine]


def is_done(run_dir: Path, point: Point, metrics: Collection[str] = ()) -> bool:
    """Whether the point's final file is there (each is written last, atomically), with ``metrics`` in it
    (held-out attacks added to a finished run's config make its defense points undone again)."""
    folder = run_dir / f"seed-{point.seed}"
    if point.defense is None:
        return (folder / "base.json").is_file()
    path = folder / point.defense / "eval.json"
    if not metrics or not path.is_file():
        return path.is_file()
    from latentguard.runs import read_json

    return set(metrics) <= set(read_json(path)["metrics"].get("heldout", {}))


def heldout_metrics(config: RunConfig) -> list[str]:
    """The held-out attacks every evaluation of this run holds a result for."""
    from latentguard.domains import build_task

    task = build_task(config.task, config.evaluation.attacks, config.seeds[0], "cpu")
    return [attack.name for attack in task.heldout_attacks()]


def claim_path(run_dir: Path, point: Point) -> Path:
    folder = run_dir / f"seed-{point.seed}"
    return folder / "base.claim" if point.defense is None else folder / point.defense / "point.claim"


# ---------------------------------------------------------------------------------------------- claims
def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), which tells a reused pid from the old."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, run by someone else
    now = _start_ticks(pid)
    return started is None or now is None or now == started


def _read_claim(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # gone, or created and not yet written
    return record if isinstance(record, dict) else None


def _stale(path: Path, record: dict[str, Any] | None) -> bool:
    """A claim whose owner is gone: a dead process on this host, or no heartbeat for ``LEASE_SECONDS``."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: try again to create it
    if record is None or record.get("host") != HOST or not isinstance(record.get("pid"), int):
        return age > LEASE_SECONDS
    return not _alive(record["pid"], record.get("started"))


class Claim:
    """An exclusive claim on one point, held while this process works on it (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owner = {
            "host": HOST,
            "pid": os.getpid(),
            "started": _start_ticks(os.getpid()),
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self._stop: threading.Event | None = None

    def acquire(self) -> bool:
        """Take the claim, or take it over from an owner that is gone; ``False`` when another holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                record = _read_claim(self.path)
                if not _stale(self.path, record):
                    return False
                _break_claim(self.path, record)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.owner, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True).start()
            return True
        return False

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if _read_claim(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def _break_claim(path: Path, judged: dict[str, Any] | None) -> None:
    """Remove a stale claim. It is renamed aside first (only one process can), then checked: if another
    process re-took the point between our look and our rename, its fresh claim is put back."""
    aside = path.with_name(f"{path.name}.stale-{HOST}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_claim(aside) != judged:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[bool]:
    """``with claimed(path) as mine:`` holds the claim for the block when ``mine``."""
    claim = Claim(path)
    mine = claim.acquire()
    try:
        yield mine
    finally:
        if mine:
            claim.release()


# ---------------------------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process needs besides the run folder (whose config.yaml it reads)."""

    threads: int | None = None  # torch CPU threads per worker; None: the config's
    gpus: tuple[str, ...] = ()  # local workers: worker k computes on GPU gpus[k % len(gpus)]
    tasks: dict[str, str] = field(default_factory=dict)  # task kinds registered in the parent process


@dataclass(frozen=True)
class Outcome:
    """What became of one point in one process."""

    point: Point
    status: Status  # busy: another live process holds its claim
    error: str = ""
    details: str = ""  # the traceback of a failure
    seconds: float = 0.0


def _task_registry() -> dict[str, str]:
    """The task kinds registered here by import path, importable in another process: a kind registered by a
    script (``__main__``) is named by the script's file. (A plugin's kinds need nothing: a worker reads the
    run's config, whose ``plugins`` it imports.)"""
    from latentguard.registry import TASKS

    portable = {}
    for kind, target in TASKS.entries().items():
        if not isinstance(target, str):
            continue
        module, _, name = target.partition(":")
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if module == "__main__" and main_file:
            target = f"{Path(main_file).resolve()}:{name}"
        portable[kind] = target
    return portable


def _register_tasks(tasks: dict[str, str]) -> None:
    from latentguard.registry import TASKS

    for kind, target in tasks.items():
        where, _, name = target.rpartition(":")
        if where.endswith(".py"):
            where = _import_file(Path(where))
        TASKS.register(kind, f"{where}:{name}", replace=True)


def _import_file(path: Path) -> str:
    """Import a script by path under a module name of its own (its ``__main__`` block does not run)."""
    name = f"_latentguard_script_{abs(hash(str(path)))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{path}: cannot import the script that registered a task kind")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return name


def _apply(settings: WorkerSettings) -> None:
    """Set up a worker process: its threads and the task kinds of the parent."""
    if settings.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(settings.threads)
        torch.set_num_threads(settings.threads)
    _register_tasks(settings.tasks)


def _init_local_worker(settings: WorkerSettings, counter: Any) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if settings.gpus:  # before anything touches CUDA in this fresh (spawned) process
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpus[index % len(settings.gpus)]
    _apply(settings)


_CACHE: dict[str, Any] = {}


def _pipeline(run_dir: Path, threads: int | None) -> Pipeline:
    """This process's pipeline over ``run_dir`` (kept between points): the folder's config, no progress
    bars (the whole run has one), the worker's threads."""
    from latentguard.pipeline import Pipeline, resume_config

    key = (str(run_dir), threads)
    if _CACHE.get("key") != key:
        config = resume_config(run_dir)
        update: dict[str, Any] = {"progress": False}
        if threads:
            update["threads"] = threads
        _CACHE.clear()
        _CACHE.update(key=key, pipeline=Pipeline(config.model_copy(update=update), run_dir))
    return _CACHE["pipeline"]


def _task(pipeline: Pipeline, seed: int) -> Task:
    """The seed's task, kept while this process works on that seed (as the sequential run keeps it)."""
    if _CACHE.get("seed") != seed:
        _CACHE.pop("task", None)
        _CACHE.update(seed=seed, task=pipeline.task(seed))
    return _CACHE["task"]


def ensure_base(pipeline: Pipeline, seed: int, *, wait: bool = True) -> bool:
    """Make sure the seed's base model exists: train it under its claim, or wait for whoever holds that
    (``wait=False``: return ``False`` at once instead)."""
    point = Point(seed)
    while not is_done(pipeline.run_dir, point):
        with claimed(claim_path(pipeline.run_dir, point)) as mine:
            if mine:
                if not is_done(pipeline.run_dir, point):
                    pipeline.base_model(_task(pipeline, seed), seed)
                return True
        if not wait:
            return False
        time.sleep(POLL_SECONDS)
    return True


def _claim_free(path: Path) -> bool:
    return not path.exists() or _stale(path, _read_claim(path))


def run_point(run_dir: Path, point: Point, threads: int | None = None, *, wait: bool = True) -> Outcome:
    """Run one point in this process under its claim; a failure is returned, not raised. A base model
    another process is training is waited for (``wait=False``: the outcome is ``busy``)."""
    start = time.perf_counter()
    pipeline = None
    try:
        pipeline = _pipeline(run_dir, threads)
        status: Status = "done"
        if point.defense is None:
            status = "done" if ensure_base(pipeline, point.seed, wait=wait) else "busy"
        else:
            defense = next(d for d in pipeline.config.defenses if d.name == point.defense)
            with claimed(claim_path(run_dir, point)) as mine:
                if not mine:
                    status = "busy"
                else:  # a finished evaluation only gets the held-out attacks it lacks
                    ensure_base(pipeline, point.seed)
                    pipeline.evaluate_defense(_task(pipeline, point.seed), point.seed, defense)
        return Outcome(point, status, seconds=time.perf_counter() - start)
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return Outcome(point, "failed", error, traceback.format_exc(), time.perf_counter() - start)
    finally:
        if pipeline is not None:
            pipeline.log.close()  # flushes TensorBoard files: a pool worker exits without atexit handlers


def _local_point(run_dir: str, point: Point, threads: int | None) -> Outcome:
    return run_point(Path(run_dir), point, threads)


def _ray_point(run_dir: str, point: Point, settings: WorkerSettings, base: Outcome | None) -> Outcome:
    """A Ray task: ``base`` is the result of the seed's base task (Ray runs this once that is there)."""
    if base is not None and base.status != "done":
        return _not_run(point, base)
    _apply(settings)
    return run_point(Path(run_dir), point, settings.threads)


# ---------------------------------------------------------------------------------------------- executors
Record = Callable[[Outcome], None]


def _not_run(point: Point, base: Outcome) -> Outcome:
    return Outcome(point, "failed", f"not run: its base model ({base.point.key}) {base.status}")


def _run_here(run_dir: Path, todo: list[Point], threads: int | None, record: Record) -> None:
    """The points in this process, one after another, always one that can start now: a defense whose base
    is there, else a base model no other process is training; else it waits for those."""
    remaining, bases_failed = list(todo), {}
    while remaining:
        point = _next_point(run_dir, remaining, bases_failed)
        if point is None:
            time.sleep(POLL_SECONDS)
            continue
        if point.defense is not None and point.seed in bases_failed:
            remaining.remove(point)
            record(_not_run(point, bases_failed[point.seed]))
            continue
        outcome = run_point(run_dir, point, threads, wait=False)
        if outcome.status == "busy" and point.defense is None:
            continue  # another process claimed this base model first: take another point meanwhile
        remaining.remove(point)
        if point.defense is None and outcome.status == "failed":
            bases_failed[point.seed] = outcome
        record(outcome)


def _next_point(run_dir: Path, remaining: list[Point], bases_failed: dict[int, Outcome]) -> Point | None:
    bases = [p for p in remaining if p.defense is None]
    defenses = [p for p in remaining if p.defense is not None]
    done = (p for p in bases if is_done(run_dir, p))
    ready = (p for p in defenses if p.seed in bases_failed or is_done(run_dir, p.base))
    free = (p for p in bases if _claim_free(claim_path(run_dir, p)))
    return next(done, None) or next(ready, None) or next(free, None)


def _run_local(
    run_dir: Path, todo: list[Point], workers: int, settings: WorkerSettings, record: Record
) -> None:
    """The points on ``workers`` spawned processes; a seed's defenses are submitted once its base is done."""
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    waiting: dict[int, list[Point]] = {}
    for point in todo:
        if point.defense is not None and point.base in todo:
            waiting.setdefault(point.seed, []).append(point)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_local_worker, initargs=(settings, counter)
    ) as pool:
        futures: dict[Future[Outcome], Point] = {}

        def submit(point: Point) -> None:
            try:
                futures[pool.submit(_local_point, str(run_dir), point, settings.threads)] = point
            except BrokenProcessPool:
                record(Outcome(point, "failed", "not run: a worker process died"))

        for point in todo:
            if point.defense is None or point.base not in todo:
                submit(point)
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                point = futures.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    outcome = Outcome(point, "failed", "a worker process died (killed?) while running it")
                record(outcome)
                for defense in waiting.pop(point.seed, []) if point.defense is None else []:
                    if outcome.status == "done":
                        submit(defense)
                    else:
                        record(_not_run(defense, outcome))


def _run_ray(
    run_dir: Path,
    todo: list[Point],
    address: str,
    config: RunConfig,
    settings: WorkerSettings,
    record: Record,
) -> None:
    """The points as Ray tasks, each with its resources: ``threads`` CPUs (1 when unset), one GPU on cuda."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'latentguard[ray]'") from None
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address)
        else:  # a new Ray instance on this machine (--ray auto joins the running one)
            ray.init(address="local", include_dashboard=False)
    cpus = config.threads or 1
    task = ray.remote(_ray_point).options(
        num_cpus=cpus, num_gpus=1 if config.device.startswith("cuda") else 0
    )
    settings = WorkerSettings(threads=cpus, tasks=settings.tasks)
    try:
        refs, bases = {}, {}
        for point in todo:
            if point.defense is None:
                bases[point.seed] = ref = task.remote(str(run_dir), point, settings, None)
                refs[ref] = point
        for point in todo:
            if point.defense is not None:
                refs[task.remote(str(run_dir), point, settings, bases.get(point.seed))] = point
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            point = refs.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                outcome = Outcome(point, "failed", f"Ray: {str(exc).strip().splitlines()[0]}", str(exc))
            record(outcome)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- a run
@dataclass
class Summary:
    """What a parallel run did: its folder, the points of its share, and what is still missing overall."""

    run_dir: Path
    total: int
    failed: list[Outcome]
    busy: list[Outcome]
    missing: list[Point]  # points of the whole run not done (other shards' or failed)
    report: Path | None  # report.md, when this process wrote it


def worker_threads(config: RunConfig, workers: int) -> int:
    """Each of ``workers`` processes gets its share of the cores (at most the config's ``threads``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share_ = max(1, cores // workers)
    return min(config.threads, share_) if config.threads else share_


def _gpus(config: RunConfig) -> tuple[str, ...]:
    """The GPUs local workers spread over when the config asks for plain ``cuda``."""
    if config.device != "cuda":
        return ()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return tuple(v.strip() for v in visible.split(",") if v.strip())
    import torch

    return tuple(str(i) for i in range(torch.cuda.device_count()))


def join_run(config: RunConfig, run_dir: Path) -> Path:
    """Start ``run_dir``, or join it when another shard has started it with the same config."""
    from latentguard.pipeline import CONFIG_FILE, resume_config, start_run

    try:
        return start_run(config, run_dir)
    except ConfigError:
        if not (run_dir / CONFIG_FILE).is_file():
            raise
    ignore = {"progress", "threads", "output_dir"}  # may differ between the machines of one array
    if resume_config(run_dir).model_dump(exclude=ignore) != config.model_dump(exclude=ignore):
        raise ConfigError(
            f"{run_dir}: holds a different run (its {CONFIG_FILE} differs); give this one its own --out"
        )
    return run_dir


def _describe(config: RunConfig, point: Point) -> str:
    if point.defense is None:
        return f"base model of seed {point.seed}, task {config.task['kind']}"
    defense = next(d for d in config.defenses if d.name == point.defense)
    return f"seed {point.seed}, defense " + json.dumps(defense.model_dump(mode="json", exclude_unset=True))


def run_parallel(
    config: RunConfig,
    run_dir: Path | None,
    *,
    resume: bool = False,
    workers: int = 1,
    ray: str | None = None,
    shard: tuple[int, int] | None = None,
) -> Summary:
    """Run ``config``'s points (shard ``shard``'s share) on ``workers`` local processes, on Ray (``ray``: an
    address, or ``""`` for a new local instance) or here; write the report when every point is done."""
    from tqdm.auto import tqdm

    from latentguard.engine.distributed import num_processes
    from latentguard.pipeline import preflight, start_run

    start = time.perf_counter()
    if num_processes() > 1:
        raise ConfigError(
            "--workers/--ray/--shard spread a run's points; accelerate launch spreads one training: use one"
        )
    if shard is not None and run_dir is None:
        raise ConfigError("--shard: give every shard the same --out RUN_DIR (or --resume RUN_DIR)")
    preflight(config)
    if not resume:
        run_dir = join_run(config, run_dir) if shard else start_run(config, run_dir)
    assert run_dir is not None
    points = share(all_points(config), shard)
    expected = heldout_metrics(config) if resume else []
    todo = [p for p in points if not is_done(run_dir, p, expected)]
    threads = worker_threads(config, workers) if workers > 1 else config.threads
    settings = WorkerSettings(threads=threads, gpus=_gpus(config), tasks=_task_registry())
    outcomes: list[Outcome] = []
    bar = tqdm(
        total=len(points), initial=len(points) - len(todo), desc="points", unit="point",
        disable=not config.progress, file=sys.stderr,
    )  # fmt: skip

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if outcome.status == "failed":
            tqdm.write(
                f"latentguard: point {outcome.point.key} failed ({_describe(config, outcome.point)}): "
                f"{outcome.error}",
                file=sys.stderr,
            )
        if outcome.status != "busy":
            bar.update(1)
        bar.set_postfix(failed=sum(o.status == "failed" for o in outcomes), refresh=False)

    try:
        if ray is not None:
            _run_ray(run_dir, todo, ray, config, settings, record)
        elif workers > 1:
            _run_local(run_dir, todo, workers, settings, record)
        else:
            _run_here(run_dir, todo, threads, record)
    finally:
        bar.close()
    order = {point.key: index for index, point in enumerate(points)}  # the sweep's order, not finishing order
    failed = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: order[o.point.key])
    _write_failures(run_dir, config, failed)
    missing = [p for p in all_points(config) if not is_done(run_dir, p, expected)]
    report = None
    if not missing:
        with claimed(run_dir / REPORT_CLAIM) as mine:  # two shards finishing together: one writes it
            if mine:
                report = _report(config, run_dir, time.perf_counter() - start)
    return Summary(run_dir, len(points), failed, [o for o in outcomes if o.status == "busy"], missing, report)


def _write_failures(run_dir: Path, config: RunConfig, failed: list[Outcome]) -> None:
    from latentguard.runs import atomic_write_json

    path = run_dir / FAILURES_FILE
    if not failed:
        path.unlink(missing_ok=True)
        return
    atomic_write_json(
        path,
        [
            {
                "point": o.point.key,
                "config": _describe(config, o.point),
                "error": o.error,
                "traceback": o.details,
                "host": HOST,
                "pid": os.getpid(),
            }
            for o in failed
        ],
    )


def _report(config: RunConfig, run_dir: Path, wall_seconds: float | None = None) -> Path:
    from latentguard.pipeline import Pipeline

    pipeline = Pipeline(config.model_copy(update={"progress": False}), run_dir)
    try:
        paths = pipeline.report()
        if wall_seconds is not None:
            pipeline.log.write({"phase": "run", "wall_seconds": wall_seconds})
    finally:
        pipeline.log.close()
    return paths[1]


def report_run(run_dir: Path) -> Path:
    """Write the report of a run whose points were run by several processes, once all are done."""
    from latentguard.pipeline import resume_config

    config = resume_config(run_dir)
    points = all_points(config)
    missing = [p.key for p in points if not is_done(run_dir, p)]
    if missing:
        shown = ", ".join(missing[:6]) + (", …" if len(missing) > 6 else "")
        raise UserError(
            f"{run_dir}: this run is unfinished: {len(missing)} of {len(points)} points are not done "
            f"({shown}); finish it with: {resume_command(run_dir)} (or the missing shards)"
        )
    return _report(config, run_dir)
