"""``latentguard`` command line: run, train, eval, report, sweep, layers.

User mistakes (config, data, layer names, checkpoints) end with exit code 2 and one line naming the problem;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from latentguard.errors import UserError

if TYPE_CHECKING:
    from latentguard.config import RunConfig

EXIT_USER_ERROR = 2
EXIT_POINTS_FAILED = 1  # some points of a run failed (each reported); the others ran


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", type=Path, help="YAML run config (default: the embedded Fashion-MNIST config)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.steps=100 --set defenses.lat.sites=[block1]",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny subset, few steps: checks an install in minutes"
    )
    parser.add_argument("--out", type=Path, help="run folder to create (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _plugin_arg(parser)


def _plugin_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first: it registers your own tasks, models, triggers, attacks or defenses",
    )


def _parallel_args(parser: argparse.ArgumentParser) -> None:
    """Spreading a run's points (a base model per seed, then each defense) over processes (parallel.py)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="run the points on N local worker processes (each with its share of the cores, or a GPU)",
    )  # fmt: skip
    where.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="run the points as Ray tasks: on a new local Ray instance, or on the cluster at ADDRESS "
        "('auto': the running one); needs latentguard[ray]",
    )  # fmt: skip
    parser.add_argument(
        "--shard", metavar="I/N",
        help="run the I-th of N shares of the points into the --out folder the N shards share (a job array); "
        "the last to finish writes the report (or `latentguard report RUN_DIR`)",
    )  # fmt: skip


def _resume_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a run folder: what its config.yaml no longer matches is redone, the rest kept",
    )
    parser.add_argument(
        "--strict-resume",
        action="store_true",
        help="with --resume: refuse (naming what changed) instead of redoing units made with another config",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentguard",
        description="Latent Adversarial Training: implant trojans, apply defenses (none, clean, AT, LAT, "
        "RLAT), evaluate against held-out attacks and report.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(commands.add_parser, parents=[common])

    run = add("run", help="implant → defenses → held-out evaluation → report")
    _config_args(run)
    _resume_args(run)
    _parallel_args(run)

    train = add("train", help="implant trojans and train the defenses, without evaluation")
    _config_args(train)
    _resume_args(train)

    evaluate = add("eval", help="(re)evaluate the trained models of a run folder and report")
    evaluate.add_argument("run_dir", type=Path)

    report = add(
        "report",
        help="rewrite report.md and plots from a run's results.json (a run of several processes without one: "
        "write it once all its points are done)",
    )
    report.add_argument("run_dir", type=Path)

    sweep = add(
        "sweep",
        help="defenses over layers × epsilons × seeds (the config's sweep: section, or LAT over its stages)",
    )
    _config_args(sweep)
    sweep.add_argument("--layers", help="comma-separated layer names (default: the task's named stages)")
    sweep.add_argument("--epsilons", help="comma-separated epsilons of --kind (default: the config's)")
    sweep.add_argument("--seeds", help="comma-separated seeds (default: the config's)")
    sweep.add_argument(
        "--kind",
        default="lat",
        help="the defense kind --layers/--epsilons set (at, lat, rlat, a plugin's...)",
    )
    sweep.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run folder")
    _parallel_args(sweep)

    layers = add("layers", help="list the sites a config's model offers: aliases and module names")
    _config_args(layers)
    layers.add_argument("--all", action="store_true", help="also every submodule, not only the named stages")
    return parser


def _progress(args: argparse.Namespace) -> list[str]:
    return ["progress=false"] if getattr(args, "no_progress", False) else []


def _csv(text: str | None, kind: type, flag: str) -> list:
    if not text:
        return []
    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"{flag}: expected a comma-separated list of {kind.__name__} values, got {text!r}"
        ) from None


def _resumed(args: argparse.Namespace) -> RunConfig:
    from latentguard import pipeline

    if args.config is not None or args.overrides or args.quick:
        raise UserError("--resume takes its config from the run folder; drop CONFIG, --set and --quick")
    config = pipeline.resume_config(args.resume)
    return config.model_copy(update={"progress": False}) if args.no_progress else config


def _spread(args: argparse.Namespace) -> bool:
    """Whether the run's points go to several processes (--workers, --ray, --shard)."""
    if getattr(args, "workers", 1) < 1:
        raise UserError(f"--workers: expected a number of processes >= 1, got {args.workers}")
    return (
        getattr(args, "workers", 1) > 1
        or getattr(args, "ray", None) is not None
        or bool(getattr(args, "shard", None))
    )


def _run_parallel(
    args: argparse.Namespace, config: RunConfig, run_dir: Path | None, *, resume: bool = False
) -> int:
    from latentguard.parallel import parse_shard, run_parallel

    shard = parse_shard(args.shard) if args.shard else None
    summary = run_parallel(config, run_dir, resume=resume, workers=args.workers, ray=args.ray, shard=shard)
    print(f"run folder: {summary.run_dir}")
    if summary.report is not None:
        print(f"report: {summary.report}")
    elif summary.missing and not summary.failed:
        print(
            f"{len(summary.missing)} points of the run are left to other processes; the last to finish "
            f"writes the report (or: latentguard report {summary.run_dir})"
        )
    if summary.failed:
        print(
            f"latentguard: error: {len(summary.failed)} of {summary.total} points failed (above, and in "
            f"{summary.run_dir / 'failures.json'}); continue with --resume {summary.run_dir}",
            file=sys.stderr,
        )
        return EXIT_POINTS_FAILED
    return 0


def _command(args: argparse.Namespace) -> int:
    from latentguard import pipeline
    from latentguard.config import load_config

    if args.command in ("run", "train"):
        if args.resume is not None:
            config = _resumed(args)
            if _spread(args):
                return _run_parallel(args, config, args.resume, resume=True)
            run_dir = pipeline.run(
                config,
                args.resume,
                resume=True,
                train_only=args.command == "train",
                strict_resume=args.strict_resume,
            )
        else:
            if args.strict_resume:
                raise UserError("--strict-resume goes with --resume RUN_DIR")
            overrides = [*args.overrides, *_progress(args)]
            config = load_config(args.config, overrides, quick=args.quick, plugins=args.plugins)
            if _spread(args):
                return _run_parallel(args, config, args.out)
            run_dir = pipeline.run(config, args.out, train_only=args.command == "train")
        print(f"run folder: {run_dir}")
        if args.command == "run":
            print(f"report: {run_dir / 'report.md'}")
        return 0
    if args.command == "eval":
        run_dir = pipeline.reevaluate(args.run_dir)
        print(f"report: {run_dir / 'report.md'}")
        return 0
    if args.command == "report":
        from latentguard.report import render_run

        if not (args.run_dir / "results.json").exists() and (args.run_dir / pipeline.CONFIG_FILE).exists():
            from latentguard.parallel import report_run

            print(report_run(args.run_dir))  # all points done (shards): the report; else what is missing
            return 0
        for path in render_run(args.run_dir):
            print(path)
        return 0
    if args.command == "sweep":
        from latentguard.sweep import expand, load_sweep, with_flags

        if args.resume is not None:
            if args.layers or args.epsilons or args.seeds:
                raise UserError(
                    "--resume takes its sweep from the run folder; drop --layers, --epsilons, --seeds"
                )
            config = _resumed(args)
            if _spread(args):
                return _run_parallel(args, config, args.resume, resume=True)
            run_dir = pipeline.run(config, args.resume, resume=True)
            print(f"run folder: {run_dir}\nreport: {run_dir / 'report.md'}")
            return 0
        base, spec = load_sweep(
            args.config, [*args.overrides, *_progress(args)], quick=args.quick, plugins=args.plugins
        )
        layers, epsilons = _csv(args.layers, str, "--layers"), _csv(args.epsilons, float, "--epsilons")
        config = expand(base, with_flags(spec, args.kind, layers, epsilons), _csv(args.seeds, int, "--seeds"))
        if _spread(args):
            return _run_parallel(args, config, args.out)
        run_dir = pipeline.run(config, args.out)
        print(f"run folder: {run_dir}\nreport: {run_dir / 'report.md'}")
        return 0
    if args.command == "layers":
        config = load_config(args.config, args.overrides, quick=args.quick, plugins=args.plugins)
        print("\n".join(_layers(config, every=args.all)))
        return 0
    raise AssertionError(args.command)


def _layers(config: RunConfig, *, every: bool) -> list[str]:
    """The sites a config's model offers: its input site, aliases with their modules, named stages."""
    from latentguard.domains import build_task
    from latentguard.engine.aliases import alias_table
    from latentguard.engine.site import INPUT, module_names

    task = build_task(config.task, config.evaluation.attacks, config.seeds[0], "cpu")
    model = task.build_model()
    table = alias_table(model)
    lines = ["SITE            MODULE"]
    if task.input_site == INPUT:
        lines.append(f"{INPUT:<15} (the model's input; AT's default site)")
    for alias, name in table:
        note = "  (AT's default site: sites: [] for kind at)" if name == task.input_site else ""
        lines.append(f"{alias:<15} {name}{note}")
    aliased = {name for _, name in table}
    lines += [f"{name:<15} {name}" for name in task.layers if name not in aliased]
    blocks = sum(alias.startswith("block:") for alias, _ in table)
    if blocks:
        lines.append(
            f"block:-K counts from the end; block:P% is block floor(P × {blocks} / 100), capped at "
            f"block:{blocks - 1}. Any module name also works as a site."
        )
    if every:
        lines += ["", "every submodule:", *module_names(model)]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from latentguard.signals import Interrupted, sigterm_interrupts
    from latentguard.storage import describe, storage_errno

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_interrupts():
            return _command(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"latentguard: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a full disk or a read-only folder outside a run (a run names its folder itself)
        if args.debug or storage_errno(exc) is None:
            raise
        print(f"latentguard: error: {describe(exc, None)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        stopped = exc if isinstance(exc, Interrupted) else Interrupted()
        print(stopped.message(), file=sys.stderr)
        return stopped.exit_code


if __name__ == "__main__":
    sys.exit(main())
