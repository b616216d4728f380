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

from latentguard.errors import UserError

EXIT_USER_ERROR = 2


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

    train = add("train", help="implant trojans and train the defenses, without evaluation")
    _config_args(train)
    _resume_args(train)

    evaluate = add("eval", help="(re)evaluate the trained models of a run folder and report")
    evaluate.add_argument("run_dir", type=Path)

    report = add("report", help="rewrite report.md and plots from a run's results.json")
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
        "--kind", choices=("at", "lat", "rlat"), default="lat", help="the defense --layers/--epsilons set"
    )

    layers = add("layers", help="list the layer names a config's model offers")
    layers.add_argument("config", nargs="?", type=Path)
    layers.add_argument("--all", action="store_true", help="every submodule, not only the named stages")
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


def _command(args: argparse.Namespace) -> int:
    from latentguard import pipeline
    from latentguard.config import load_config

    if args.command in ("run", "train"):
        if args.resume is not None:
            if args.config is not None or args.overrides or args.quick:
                raise UserError(
                    "--resume takes its config from the run folder; drop CONFIG, --set and --quick"
                )
            config = pipeline.resume_config(args.resume)
            if args.no_progress:
                config = config.model_copy(update={"progress": False})
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
            config = load_config(args.config, [*args.overrides, *_progress(args)], quick=args.quick)
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
        from latentguard.results_check import check_results

        check_results(args.run_dir)  # an unfinished run, or results that lack what the report needs
        for path in render_run(args.run_dir):
            print(path)
        return 0
    if args.command == "sweep":
        from latentguard.sweep import expand, load_sweep, with_flags

        base, spec = load_sweep(args.config, [*args.overrides, *_progress(args)], quick=args.quick)
        layers, epsilons = _csv(args.layers, str, "--layers"), _csv(args.epsilons, float, "--epsilons")
        config = expand(base, with_flags(spec, args.kind, layers, epsilons), _csv(args.seeds, int, "--seeds"))
        run_dir = pipeline.run(config, args.out)
        print(f"run folder: {run_dir}\nreport: {run_dir / 'report.md'}")
        return 0
    if args.command == "layers":
        from latentguard.domains import build_task
        from latentguard.engine.site import module_names

        config = load_config(args.config)
        task = build_task(config.task, config.evaluation.attacks, config.seeds[0], "cpu")
        names = module_names(task.build_model()) if args.all else list(task.layers)
        print("\n".join(names))
        return 0
    raise AssertionError(args.command)


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
