"""`prisma-ray`: one subcommand per job."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import ConfigError, load_config
from .storage import MissingInputError


def _models_list(args: argparse.Namespace) -> int:
    from .models import list_entries

    entries = list_entries(source=args.source, modality=args.modality, family=args.family)
    if args.json:
        print(json.dumps([e.summary() for e in entries], indent=1))
        return 0
    header = f"{'name':<52} {'source':<9} {'family':<11} {'mod':<5} {'L':>3} {'width':>5} {'heads':>5} {'size':>4} {'patch':>5} {'frames':>6}"
    print(header)
    for e in entries:
        frames = e.frames if e.frames is not None else "-"
        print(
            f"{e.name:<52} {e.source:<9} {e.family:<11} {e.modality:<5} {e.layers:>3} {e.width:>5} "
            f"{e.heads:>5} {e.image_size:>4} {e.patch_size:>5} {frames:>6}"
        )
    print(f"{len(entries)} models")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from .models import get_entry

    print(json.dumps(get_entry(args.name).model_dump(), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_report, run_demo

    cfg = load_config(DemoConfig, args.config, args.set)
    print(format_report(run_demo(cfg)))
    return 0


def _extract(args: argparse.Namespace) -> int:
    from .activations import ExtractConfig
    from .extract import run_extract

    cfg = load_config(ExtractConfig, args.config, args.set)
    summary = run_extract(cfg)
    print(summary.format())
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import run_training
    from .training_config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.set)
    summary = run_training(cfg)
    print(summary.format())
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import SweepConfig, run_sweep

    cfg = load_config(SweepConfig, args.config, args.set)
    summary = run_sweep(cfg)
    print(summary.format())
    return 1 if summary.failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate_checkpoint

    cfg = load_config(EvalConfig, args.config, args.set)
    row = evaluate_checkpoint(args.checkpoint, cfg)
    print(json.dumps(row, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `prisma-ray` command."""
    parser = argparse.ArgumentParser(prog="prisma-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_command", required=True)
    listing = models.add_parser("list", help="list registered models")
    listing.add_argument("--source", choices=["timm", "open_clip", "hf", "prisma"])
    listing.add_argument("--modality", choices=["image", "video"])
    listing.add_argument("--family")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_models_list)
    show = models.add_parser("show", help="show one registry entry")
    show.add_argument("name")
    show.set_defaults(func=_models_show)

    demo = sub.add_parser("demo", help="run the demo job on the embedded default")
    demo.add_argument("config", nargs="?", help="YAML config (optional)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    demo.set_defaults(func=_demo)

    extract = sub.add_parser(
        "extract",
        help="extract activations into Parquet stores (Ray Data)",
        description="Run a dataset through a model on Ray and write the activations of each hook point to its own "
        "Parquet store, <output>/<model>/<hook>/<split>, local or s3://. Rerunning the same config resumes and adds "
        "no duplicate rows; a changed config into the same output is refused. Connects to the Ray at ray.address or "
        "$RAY_ADDRESS, else starts a local one.",
        epilog="example: prisma-ray extract extract.yaml --set output=s3://bucket/acts --set batch_size=64",
    )
    extract.add_argument(
        "config", nargs="?", help="YAML ExtractConfig (optional: the defaults extract 128 synthetic shapes images "
        "through a random-weight ViT-Tiny into ./prisma-activations)"
    )
    extract.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    extract.set_defaults(func=_extract)

    train = sub.add_parser("train", help="train SAEs, transcoders or crosscoders on activation stores (Ray Train)")
    train.add_argument("config", nargs="?", help="YAML config (optional: the defaults train on the default store)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    train.set_defaults(func=_train)

    sweep = sub.add_parser(
        "sweep",
        help="evaluate every checkpoint under some URIs: metrics table, leaderboard, plots (Ray)",
        description="Find every checkpoint (cfg.json + sae_weights.safetensors) under the config's `checkpoints` "
        "URIs, evaluate them against held-out activation stores on a Ray actor pool (each model loaded once per "
        "actor) and write metrics.parquet, leaderboard.html and plots/ to `output`. A rerun skips the checkpoints "
        "already evaluated. Exits 1 when some checkpoint failed (see <output>/errors.json).",
        epilog="example: prisma-ray sweep sweep.yaml --set output=s3://bucket/sweep --set evaluation.split=test",
    )
    sweep.add_argument("config", nargs="?", help="YAML SweepConfig (`checkpoints` is required)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    sweep.set_defaults(func=_sweep)

    evaluate = sub.add_parser("evaluate", help="evaluate one checkpoint (no Ray) and print its metrics as JSON")
    evaluate.add_argument("checkpoint", help="checkpoint directory URI (cfg.json + sae_weights.safetensors)")
    evaluate.add_argument("config", nargs="?", help="YAML EvalConfig (optional: stores, split, ...)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    evaluate.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prisma-ray` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, MissingInputError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
