"""`prisma-ray`: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from typing import get_args

from .config import ConfigError, load_config
from .models.registry import Modality, Source
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


def _job(module: str, config: str, run: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand that validates the YAML config (+ `--set`) into `module.config`, runs `module.run` on it
    and prints the summary's `format()`; the exit status is 1 when the summary lists failures."""

    def handler(args: argparse.Namespace) -> int:
        mod = importlib.import_module(module, __package__)
        summary = getattr(mod, run)(load_config(getattr(mod, config), args.config, args.set))
        print(summary.format())
        return 1 if getattr(summary, "failed", None) else 0

    return handler


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_report, run_demo

    cfg = load_config(DemoConfig, args.config, args.set)
    print(format_report(run_demo(cfg)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate_checkpoint

    cfg = load_config(EvalConfig, args.config, args.set)
    row = evaluate_checkpoint(args.checkpoint, cfg)
    print(json.dumps(row, indent=1))
    return 0


def _data_override(data: str | None) -> list[str]:
    """`--data`: a YAML/JSON file holding a dataset spec, or a folder/URI of images -> a `dataset=` override."""
    if data is None:
        return []
    if data.endswith((".yaml", ".yml", ".json")):
        from pathlib import Path

        import yaml

        if not Path(data).is_file():
            raise ConfigError(f"--data {data!r}: no such dataset spec file")
        spec = yaml.safe_load(Path(data).read_text())
    else:
        spec = {"type": "images", "uri": data}
    return [f"dataset={json.dumps(spec)}"]


def _interpret_config(args: argparse.Namespace):
    from .interpret.collect import InterpretConfig

    first = [f"checkpoint={json.dumps(args.checkpoint)}"] if getattr(args, "checkpoint", None) else []
    output = [f"output={json.dumps(args.output)}"] if getattr(args, "output", None) else []
    return load_config(InterpretConfig, args.config, first + _data_override(args.data) + output + args.set)


def _interpret(args: argparse.Namespace) -> int:
    from .interpret.pipeline import run_interpret

    summary = run_interpret(_interpret_config(args))
    print(summary.format())
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from .interpret.dashboard import write_dashboard
    from .interpret.pipeline import run_interpret
    from .interpret.results import read_results

    cfg = _interpret_config(args)
    summary = run_interpret(cfg)
    results = read_results(summary.output, cfg.storage.resolved())
    if args.explain:
        from .interpret.autointerp.run import ExplainConfig, run_explain

        vocabulary = {"vocabulary": args.vocabulary.split(",")} if args.vocabulary else {}
        run_explain(
            ExplainConfig(evidence=results.uri, explainer=args.explain, storage=cfg.storage, ray=cfg.ray, **vocabulary)
        )
    index = write_dashboard(results, per_latent=args.per_latent, max_latents=args.max_latents)
    print(summary.format())
    print(f"dashboard {index}")
    return 0


def _steer(args: argparse.Namespace) -> int:
    from .interpret.steer import SteerConfig, run_steer

    rule = [f"steer.value={args.value}"] if args.value is not None else []
    rule += [f"steer.scale={args.scale}"] if args.scale is not None else []
    rule += [f"steer.latents={json.dumps(args.latent)}"] if args.latent else []
    rule += ["steer.keep_error=false"] if args.no_error else []
    rule += [f"text_embeddings={json.dumps(args.text_embeddings)}"] if args.text_embeddings else []
    overrides = [f"checkpoint={json.dumps(args.checkpoint)}", *_data_override(args.data), *rule, *args.set]
    cfg = load_config(SteerConfig, args.config, overrides)
    report = run_steer(cfg)
    print(json.dumps(report, indent=1))
    return 0


def _import_sae(args: argparse.Namespace) -> int:
    from .sae.importers import ImportConfig, import_dictionary

    cfg = ImportConfig(source=args.source, output=args.output, format=args.format, model=args.model)
    print(json.dumps(import_dictionary(cfg).model_dump(), indent=1))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis.job import AnalyzeConfig, run_analysis

    cfg = load_config(AnalyzeConfig, args.config, args.set)
    print(json.dumps(run_analysis(args.analysis, cfg), indent=1))
    return 0


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `prisma-ray` command."""
    parser = argparse.ArgumentParser(prog="prisma-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_command", required=True)
    listing = models.add_parser("list", help="list registered models")
    listing.add_argument("--source", choices=get_args(Source))
    listing.add_argument("--modality", choices=get_args(Modality))
    listing.add_argument("--family")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_models_list)
    show = models.add_parser("show", help="show one registry entry")
    show.add_argument("name")
    show.set_defaults(func=_models_show)

    demo = sub.add_parser("demo", help="run the demo job on the embedded default")
    demo.add_argument("config", nargs="?", help="YAML config (optional)")
    _add_overrides(demo)
    demo.set_defaults(func=_demo)

    quickstart = sub.add_parser(
        "quickstart",
        help="the whole loop on the embedded models: data, extract, train, sweep, dashboard (Ray)",
        description="Generate shapes and moving-shapes, extract activations of the shipped toy models, train "
        "TopK SAEs, sweep them (held-out metrics, ground-truth recovery, leaderboard) and write a dashboard of the "
        "best one, all under `output` (local or s3://). Every stage resumes on a rerun.",
        epilog="example: prisma-ray quickstart --set output=s3://bucket/quickstart",
    )
    quickstart.add_argument("config", nargs="?", help="YAML QuickstartConfig (optional)")
    _add_overrides(quickstart)
    quickstart.set_defaults(func=_job(".quickstart", "QuickstartConfig", "run_quickstart"))

    extract = sub.add_parser(
        "extract",
        help="extract activations into Parquet stores (Ray Data)",
        description="Run a dataset through a model on Ray and write the activations of each hook point to its own "
        "Parquet store, <output>/<model>/<hook>/<split>, local or s3://. Rerunning the same config resumes and adds "
        "no duplicate rows; a changed config into the same output is refused. Multimodal language models (LLaVA, "
        "Qwen-VL) see each image with one of `prompts` and store the tokens of their sequence at lm.* hook points "
        "(tokens.mode all, text, image, patches or random). Connects to the Ray at ray.address or $RAY_ADDRESS, else "
        "starts a local one.",
        epilog="example: prisma-ray extract extract.yaml --set output=s3://bucket/acts --set batch_size=64; "
        "an LMM layer: --set model=hf-llava-onevision-qwen2-0.5b-ov --set hooks='[lm.blocks.12.hook_resid_post]' "
        "--set prompts='[Describe the image.]'",
    )
    extract.add_argument(
        "config",
        nargs="?",
        help="YAML ExtractConfig (optional: the defaults extract 128 synthetic shapes images "
        "through a random-weight ViT-Tiny into ./prisma-activations)",
    )
    _add_overrides(extract)
    extract.set_defaults(func=_job(".extract.pipeline", "ExtractConfig", "run_extract"))

    train = sub.add_parser("train", help="train SAEs, transcoders or crosscoders on activation stores (Ray Train)")
    train.add_argument("config", nargs="?", help="YAML config (optional: the defaults train on the default store)")
    _add_overrides(train)
    train.set_defaults(func=_job(".train.job", "TrainConfig", "run_training"))

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
    _add_overrides(sweep)
    sweep.set_defaults(func=_job(".evaluate.sweep", "SweepConfig", "run_sweep"))

    evaluate = sub.add_parser("evaluate", help="evaluate one checkpoint (no Ray) and print its metrics as JSON")
    evaluate.add_argument("checkpoint", help="checkpoint directory URI (cfg.json + sae_weights.safetensors)")
    evaluate.add_argument("config", nargs="?", help="YAML EvalConfig (optional: stores, split, ...)")
    _add_overrides(evaluate)
    evaluate.set_defaults(func=_evaluate)

    analyze = sub.add_parser(
        "analyze",
        help="classic analysis (logit lens, attention, patching, attribution) written as PNG + HTML",
        description="Run one analysis on a model over images/videos (inputs.uris) or rendered synthetic samples and "
        "write <output>/<analysis>/figure-NN.png, index.html and summary.json.",
        epilog="example: prisma-ray analyze patching --set patching.site=hook_resid_post --set output=/tmp/analysis",
    )
    analyze.add_argument("analysis", choices=["logit-lens", "attention", "patching", "attribution"])
    analyze.add_argument(
        "config", nargs="?", help="YAML AnalyzeConfig (optional: the defaults analyse the embedded ViT)"
    )
    _add_overrides(analyze)
    analyze.set_defaults(func=_analyze)

    data_help = "dataset: a YAML/JSON dataset spec file, or a folder or s3:// prefix of images"
    interpret = sub.add_parser(
        "interpret",
        help="top-activating samples and statistics of every latent of a checkpoint over a dataset (Ray Data)",
        description="Run a dataset through the checkpoint's model and dictionary on a Ray actor pool and keep, per "
        "latent, the top-k samples by max and by mean activation (with per-patch maps), a random sample of its "
        "activations and its firing statistics; write them to `output` (local or s3://). A multimodal language "
        "model's dictionary is read on each image's base-view image tokens, the image shown with one of `prompts`.",
        epilog="example: prisma-ray interpret --set checkpoint=runs/sae/topk-k-32 --data data.yaml --set output=/tmp/i",
    )
    interpret.add_argument("config", nargs="?", help="YAML InterpretConfig (optional)")
    interpret.add_argument("--data", help=data_help)
    interpret.add_argument("--output", help="results directory (local or s3://)")
    _add_overrides(interpret)
    interpret.set_defaults(func=_interpret)

    dashboard = sub.add_parser(
        "dashboard",
        help="static HTML feature dashboards of a checkpoint's latents (runs `interpret` first when needed)",
        description="Run the top-activations pass (unless `output` already holds its results) and write a static "
        "site: <output>/index.html (searchable, sortable index of latents) and one page per latent with its top "
        "images, heatmaps, masks, activation histogram and, from <output>/explanations.jsonl, explanations and scores.",
        epilog="example: prisma-ray dashboard runs/sae/topk-k-32 --data /data/val --output /tmp/dash --set pretrained=false",
    )
    dashboard.add_argument("checkpoint", help="checkpoint directory URI (cfg.json + sae_weights.safetensors)")
    dashboard.add_argument("config", nargs="?", help="YAML InterpretConfig (optional)")
    dashboard.add_argument("--data", help=data_help)
    dashboard.add_argument("--output", help="results and site directory (local or s3://)")
    dashboard.add_argument("--per-latent", type=int, default=8, help="top samples shown per latent and ranking")
    dashboard.add_argument("--max-latents", type=int, help="render at most this many latents (in index order)")
    dashboard.add_argument("--explain", choices=["vocabulary"], help="explain the latents offline first")
    dashboard.add_argument(
        "--vocabulary",
        help="comma-separated labels for --explain vocabulary (default: the synthetic dataset's shapes and colours)",
    )
    _add_overrides(dashboard)
    dashboard.set_defaults(func=_dashboard)

    steer = sub.add_parser(
        "steer",
        help="clamp or scale latents of an SAE spliced into its model and report the change in output (no Ray)",
        description="Splice the checkpoint in at its hook point, set the chosen latents to --value (or multiply them "
        "by --scale) on the dataset's first inputs, keeping the SAE's error term, and print as JSON the change in "
        "predicted class and class probabilities (or, with --text-embeddings, in cosine similarity to each prompt).",
        epilog="example: prisma-ray steer runs/sae/topk-k-32 --latent 11 --value 8 --data shapes.yaml",
    )
    steer.add_argument("checkpoint", help="checkpoint directory URI")
    steer.add_argument("config", nargs="?", help="YAML SteerConfig (optional)")
    steer.add_argument("--latent", type=int, action="append", default=[], help="a latent to steer (repeatable)")
    rule = steer.add_mutually_exclusive_group()
    rule.add_argument("--value", type=float, help="clamp the latents to this activation")
    rule.add_argument("--scale", type=float, help="multiply the latents by this factor")
    steer.add_argument("--no-error", action="store_true", help="drop the SAE's error term (reconstruction only)")
    steer.add_argument("--data", help=data_help)
    steer.add_argument("--text-embeddings", help=".npy [prompts, width] text embeddings (embedding towers)")
    _add_overrides(steer)
    steer.set_defaults(func=_steer)

    explain = sub.add_parser(
        "explain",
        help="explain and score latents from their top-activating images (auto-interpretation, Ray)",
        description="Read the top-activation output at `evidence` (as `prisma-ray interpret` writes it), explain every "
        "latent not yet in <output>/explanations.jsonl (offline vocabulary explainer, or a served multimodal model "
        "behind an OpenAI-compatible API) and score each explanation (detection, IoU, similarity) against a random "
        "baseline. A rerun does only the latents missing.",
        epilog="example: prisma-ray explain --set evidence=s3://bucket/interp --set explainer=chat "
        "--set chat.base_url=http://vllm:8000/v1 --set chat.model=Qwen/Qwen2.5-VL-7B-Instruct",
    )
    explain.add_argument("config", nargs="?", help="YAML ExplainConfig (`evidence` is required)")
    _add_overrides(explain)
    explain.set_defaults(func=_job(".interpret.autointerp.run", "ExplainConfig", "run_explain"))

    import_sae = sub.add_parser(
        "import-sae",
        help="import a published SAE or transcoder (ViT-Prisma, SAELens, sparsify) as our checkpoint",
        description="Convert another tool's published dictionary in SOURCE_DIR into our checkpoint (cfg.json + "
        "sae_weights.safetensors, SAELens 6 layout) at OUTPUT_URI, mapping its hook and model names onto ours. "
        "Pickled weights are read with a restricted unpickler (tensors and plain containers only); a file that "
        "names anything else is refused and nothing in it runs. Prints what was imported as JSON.",
        epilog="example: prisma-ray import-sae ./sae-clip-b32-layer9 s3://bucket/imported/clip-b32-l9 --format vit-prisma",
    )
    import_sae.add_argument("source", metavar="SOURCE_DIR", help="directory of the published files (local or s3://)")
    import_sae.add_argument("output", metavar="OUTPUT_URI", help="checkpoint directory to write (local or s3://)")
    import_sae.add_argument(
        "--format",
        default="auto",
        choices=["auto", "vit-prisma", "saelens", "sparsify"],
        help="layout of SOURCE_DIR (default: detected from its files)",
    )
    import_sae.add_argument(
        "--model", help="model the dictionary reads (registry name; default: as the source names it)"
    )
    import_sae.set_defaults(func=_import_sae)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prisma-ray` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, MissingInputError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
