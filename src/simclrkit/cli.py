"""Command line: subcommands -> validated config -> train/evaluate. No logic of its own.

Exit codes: 0 success; 1 an unexpected internal error; 2 a user error (bad config, missing
data, unreadable checkpoint), printed as one line without a traceback; 3 the loss or gradients
stopped being finite; 143 stopped by SIGTERM/SIGINT after writing a checkpoint (resume with
``--resume``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3


def _add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"a recipe name (see `simclrkit recipes`) or a YAML file (default: {default_config})",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.epochs=20 loss.temperature=0.2",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simclrkit",
        description="SimCLR pretraining and evaluation (Chen et al. 2020; SimCLRv2).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pretrain = sub.add_parser("pretrain", help="pretrain an encoder, then evaluate it")
    _add_config_arguments(pretrain, "mnist5k")
    pretrain.add_argument("--run-dir", default="runs/latest", help="output folder")
    pretrain.add_argument("--quiet", action="store_true", help="no progress output")
    pretrain.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    pretrain.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept settings that differ from the checkpoint's",
    )

    sub.add_parser("recipes", help="list the bundled recipes")
    return parser


def _print_results(summary: dict) -> None:
    evaluation = summary.get("eval", {})
    print(
        f"pretrained {summary['steps']} steps ({summary['epochs']:.1f} epochs) in "
        f"{summary['train_seconds']:.0f}s at {summary['images_per_second']:.0f} images/s; "
        f"final loss {summary['final_loss']:.4f}"
    )
    if "linear_top1" in evaluation:
        line = f"linear evaluation on frozen features: top-1 {evaluation['linear_top1']:.4f}"
        if "random_init_linear_top1" in evaluation:
            gain = evaluation["linear_top1"] - evaluation["random_init_linear_top1"]
            line += (
                f" (same encoder at random initialisation: "
                f"{evaluation['random_init_linear_top1']:.4f}, {gain * 100:+.1f} points)"
            )
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imports stay inside main so `simclrkit --help` is instant.
    from simclrkit.checkpoint import CheckpointError
    from simclrkit.config import ConfigError, list_recipes, load_config

    try:
        if args.command == "recipes":
            for name, source in list_recipes().items():
                print(f"{name:24s} {source}")
            return 0
        if args.command == "pretrain":
            from simclrkit.train import (
                EXIT_PREEMPTED,
                NonFiniteLossError,
                Preempted,
                pretrain,
            )

            config = load_config(args.config, args.overrides)
            try:
                summary = pretrain(
                    config, Path(args.run_dir), resume=args.resume, force=args.force,
                    quiet=args.quiet,
                )
            except Preempted as stop:
                print(
                    f"simclrkit: {stop}; continue with: simclrkit pretrain --run-dir "
                    f"{args.run_dir} --resume",
                    file=sys.stderr,
                )
                return EXIT_PREEMPTED
            except NonFiniteLossError as error:
                print(f"simclrkit: error: {error}", file=sys.stderr)
                return EXIT_NONFINITE
            _print_results(summary)
            print(f"run folder: {args.run_dir} (report.md, summary.json, checkpoints/last.pt)")
            return 0
    except (ConfigError, CheckpointError) as error:
        print(f"simclrkit: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 1


def entry() -> None:  # pragma: no cover - thin wrapper for python -m
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
