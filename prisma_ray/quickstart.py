"""The quickstart: the whole loop on the embedded default models and synthetic data, in one job.

    shapes / moving-shapes (generated)  -> extract (train + held-out test split, per toy model)
    -> train TopK SAEs (one Ray Train run per model, all sizes on the same batches)
    -> sweep (metrics, ground-truth recovery, leaderboard, plots) -> dashboard of the best SAE

Each stage is the library's own job (`run_extract`, `run_training`, `run_sweep`, `build_dashboard`)
with its outputs under `output` (local or `s3://`). Every stage resumes, so a rerun after a failure
picks up where it stopped.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from . import storage
from .data.sources import SyntheticSource
from .evaluate import EvalConfig
from .evaluate.sweep import SweepConfig, run_sweep
from .extract.config import ExtractConfig
from .extract.pipeline import run_extract
from .interpret.autointerp.run import ExplainConfig, run_explain
from .interpret.collect import InterpretConfig
from .interpret.dashboard import write_dashboard
from .interpret.pipeline import run_interpret
from .interpret.results import read_results
from .models import get_entry, toy
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
            epochs=6,
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
    return [DictionaryConfig(architecture="topk", k=k, expansion_factor=8, lr=1e-3) for k in (4, 8, 16)]


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
        description="dictionaries trained per model (default: TopK SAEs with k 4, 8, 16)",
    )
    batch_size: int = Field(1024, ge=1, description="training tokens per step")
    train_workers: int = Field(1, ge=0, description="Ray Train workers per run (0: in the driver)")
    dashboard_latents: int = Field(32, ge=1, description="latents with a page in the dashboard")
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

    def format(self) -> str:
        header = f"{'model':<32} {'dictionary':<12} {'L0':>6} {'expl.var':>8} {'loss rec.':>9} {'GT detected':>11}"
        lines = ["leaderboard (held-out test split):", header]
        for r in self.rows:
            lines.append(
                f"{r['model']:<32} {r['name']:<12} {r['l0']:>6.2f} {r['explained_variance']:>8.3f} "
                f"{_fmt(r.get('loss_recovered')):>9} {_fmt(r.get('gt_fraction_detected')):>11}"
            )
        best = max(self.rows, key=lambda r: r.get("gt_fraction_detected") or 0.0)
        lines += [
            f"ground-truth recovery: best {best['model']} {best['name']} detects "
            f"{_fmt(best.get('gt_fraction_detected'))} of the factor values (AUROC >= 0.95), "
            f"mean best AUROC {_fmt(best.get('gt_mean_best_auroc'))}",
            f"leaderboard  {self.leaderboard}",
            f"dashboard    {self.dashboard}",
            "time         " + ", ".join(f"{stage} {s:.0f} s" for stage, s in self.seconds.items()),
        ]
        lines += [f"lost         {line}" for line in self.lost]
        return "\n".join(lines)


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
        ExtractConfig(
            model=m.name,
            pretrained=True,
            hooks=[m.hook],
            tokens=TokenSelection(mode="all"),
            dtype="float16",
            dataset=SyntheticSource(uri=cfg.uri("data", f"{m.name}-{split}"), generator=generator),
            split=split,
            output=cfg.uri("activations"),
            storage=cfg.storage,
            shard_size=128,
            progress=False,
            ray=cfg.ray,
        )
        for split, generator in splits.items()
    ]


def train_config(cfg: QuickstartConfig, m: QuickstartModel) -> TrainConfig:
    """One run per model: every dictionary of `cfg` on the same batches of its train store."""
    return TrainConfig(
        name=m.hook,
        runs=cfg.uri("runs", m.name),
        output=cfg.uri("dictionaries", m.name, m.hook),
        storage=cfg.storage,
        data=TrainData(inputs=[storage.join(cfg.uri("activations"), m.name, m.hook, "train")]),
        dictionaries=cfg.dictionaries,
        batch_size=cfg.batch_size,
        epochs=m.epochs,
        log_every=50,
        checkpoint_every=500,
        workers=cfg.train_workers,
        ray=cfg.ray,
    )


def sweep_config(cfg: QuickstartConfig) -> SweepConfig:
    """Every trained dictionary of the quickstart against the test stores, ground truth included."""
    evaluation = EvalConfig(
        stores=cfg.uri("activations"), split="test", max_tokens=4096, splice_samples=32, storage=cfg.storage
    )
    return SweepConfig(
        checkpoints=[cfg.uri("dictionaries")],
        output=cfg.uri("sweep"),
        evaluation=evaluation,
        progress=False,
        ray=cfg.ray,
    )


def leaderboard_rows(table: pa.Table) -> list[dict]:
    """The sweep's rows, best explained variance first within each model."""
    return sorted(table.to_pylist(), key=lambda r: (r["model"], -(r["explained_variance"] or 0.0)))


def dashboard_of(cfg: QuickstartConfig, checkpoint: str) -> str:
    """Top images of `checkpoint`'s latents on the first model's test images, explained and scored offline
    (vocabulary explainer over shapes and colours); return the dashboard's index URI."""
    m = cfg.models[0]
    interpret = InterpretConfig(
        checkpoint=checkpoint,
        dataset=extract_configs(cfg, m)[1].dataset,
        output=cfg.uri("interpret"),
        storage=cfg.storage,
        k=8,
        progress=False,
        ray=cfg.ray,
    )
    results = read_results(run_interpret(interpret).output, cfg.storage.resolved())
    run_explain(ExplainConfig(evidence=results.uri, storage=cfg.storage, ray=cfg.ray))
    return write_dashboard(results, cfg.uri("dashboard"), results.options, max_latents=cfg.dashboard_latents)


def run_quickstart(cfg: QuickstartConfig) -> QuickstartSummary:
    """Run every stage (each resumes) and return the summary."""
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
    swept = run_sweep(sweep_config(cfg))
    lost += [f"sweep: {swept.lost.format('model group')}"] if swept.lost.format() else []
    rows = leaderboard_rows(pq.read_table(io.BytesIO(storage.read_bytes(swept.table, cfg.storage))))
    seconds["sweep"] = time.perf_counter() - start
    start = time.perf_counter()
    best = max((r for r in rows if r["model"] == cfg.models[0].name), key=lambda r: r["explained_variance"] or 0.0)
    dashboard = dashboard_of(cfg, best["checkpoint"])
    seconds["dashboard"] = time.perf_counter() - start
    return QuickstartSummary(
        output=storage.absolute(cfg.output),
        leaderboard=swept.leaderboard,
        dashboard=dashboard,
        rows=rows,
        seconds=seconds,
        lost=lost,
    )
