"""`prisma-ray sweep`: every checkpoint under some URIs, evaluated on a Ray actor pool (orchestration only).

    checkpoint URIs --find_checkpoints + cfg.json--> checkpoints not yet evaluated, grouped by model
    --actor pool of SweepWorker actors (`runtime.pool`; one Evaluator each, one group per call: a model
    is loaded once per actor and all its checkpoints are evaluated against it)--> one result file each
    --> metrics.parquet, leaderboard.html, plots/<model>__<hook>.png

`plan_sweep` checks the config, finds the checkpoints and claims the output before Ray starts. A
rerun skips the checkpoints whose results are already written (resumable); a checkpoint that fails
is recorded in `errors.json` and tried again by the next run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from prisma_ray.errors import InvalidRequest, PrismaRayError

from .. import storage
from ..config import require_distinct
from ..models import get_entry, list_entries
from ..models.registry import Modality, Source
from ..runtime.console import counted
from ..runtime.devices import placement_line
from ..runtime.pool import PoolSize, PoolStats, Resources, cluster_resources, run_pool, size_pool
from ..runtime.session import RayOptions, ensure_ray
from ..sae.io import WEIGHTS_FILE, CheckpointInfo, read_tensors
from . import EvalConfig, Evaluator, find_checkpoints, read_checkpoint_info
from .cross_page import sweep_models, write_cross_model_page
from .report import best_ground_truth, front_plots, ground_truth_line, leaderboard_html, plot_name
from .results import ResultStore, result_key
from .stability import stability_columns

log = logging.getLogger(__name__)

MODEL_PLACEHOLDER = "{model}"


class ModelSelection(BaseModel):
    """Which models' checkpoints to evaluate: registry `names` plus every registry model matching all the
    filters given (`family`, `modality`, `source`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    names: list[str] = Field(default_factory=list, description="registry names of models selected by name")
    family: list[str] | None = Field(
        None, description="select every model of these families (a name or a list, e.g. clip, dinov2)"
    )
    modality: Modality | None = Field(None, description="select every model of this modality: image, video, multimodal")
    source: Source | None = Field(None, description="select every model of this source: timm, open_clip, hf, ...")

    @field_validator("family", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def resolve(self) -> list[str]:
        """The selected model names, sorted; an unknown name or family raises, naming it."""
        chosen = {get_entry(name).name for name in self.names}
        if self.family is not None or self.modality is not None or self.source is not None:
            known = {e.family for e in list_entries()}
            unknown = sorted(set(self.family or []) - known)
            if unknown:
                raise InvalidRequest(f"unknown model families {unknown}; known: {sorted(known)}")
            chosen |= {
                e.name
                for e in list_entries(modality=self.modality, source=self.source)
                if self.family is None or e.family in self.family
            }
        return sorted(chosen)


class SweepConfig(BaseModel):
    """`prisma-ray sweep`: evaluate every checkpoint under `checkpoints` and write a leaderboard to `output`.

    A checkpoint URI may hold `{model}`, expanded once per model of `models` (URIs that do not exist
    for a model are skipped). With `models` set, only checkpoints of the selected models are evaluated.
    """

    model_config = ConfigDict(extra="forbid")

    checkpoints: list[str] = Field(min_length=1, description="URIs searched (recursively) for checkpoints")
    models: ModelSelection | None = Field(
        None, description="evaluate only checkpoints of these models; expands {model} in checkpoint URIs"
    )
    output: str = Field("prisma-sweep", description="where metrics.parquet, leaderboard.html and plots/ go")
    evaluation: EvalConfig = Field(EvalConfig(), description="what to measure on which held-out stores")
    resources: Resources = Field(
        Resources(),
        description="the evaluation actors (on the device of `evaluation.device`; never more than model groups)",
    )
    cross_model: bool = Field(
        True,
        description="write the cross-model page where the rows cover two models or more (it compares every pair of "
        "models: a campaign's per-model sweeps leave it to the campaign's last sweep)",
    )
    progress: bool = Field(True, description="show a progress bar")
    ray: RayOptions = Field(RayOptions(), description="which Ray cluster to connect to")

    @field_validator("checkpoints")
    @classmethod
    def _distinct(cls, uris: list[str]) -> list[str]:
        return require_distinct(uris, "checkpoint URIs")


@dataclass
class Group:
    """Checkpoints that read the same models: one actor evaluates them all after loading the models once."""

    models: tuple[str, ...]
    uris: list[str]


@dataclass(kw_only=True)
class SweepPlan:
    """A checked sweep: the checkpoints found, those still to evaluate grouped by model, the output.

    `unreadable` holds the checkpoints whose cfg.json cannot be evaluated (`{"checkpoint", "error"}`, as a
    failed evaluation is recorded): they are reported as failures while the others are evaluated.
    """

    cfg: SweepConfig
    found: list[CheckpointInfo]
    unreadable: list[dict[str, str]]
    groups: list[Group]
    results: ResultStore

    @property
    def pending(self) -> int:
        return sum(len(g.uris) for g in self.groups)


@dataclass
class SweepSummary:
    """What a run did (`evaluated`, `failed`, `model_loads`: this run only), where its outputs are, and what the
    actor pool lost and retried (`lost`: actors lost with their node, model groups sent again)."""

    found: int
    evaluated: int
    skipped: int
    failed: list[dict[str, str]]
    model_loads: dict[str, int]
    output: str
    table: str
    leaderboard: str
    plots: list[str]
    rows: int
    seconds: float
    lost: PoolStats = field(default_factory=PoolStats)
    ground_truth: str = ""
    cross_model: str = ""

    def format(self) -> str:
        """The final summary printed by `prisma-ray sweep`."""
        loads = ", ".join(f"{m} x{n}" for m, n in sorted(self.model_loads.items())) or "none"
        lines = [
            f"checkpoints  {self.found} found, {self.evaluated} evaluated, {self.skipped} already done, "
            f"{len(self.failed)} failed",
            f"models       loaded {loads}",
            f"table        {self.table}  ({self.rows} rows)",
            f"leaderboard  {self.leaderboard}",
            *([f"cross-model  {self.cross_model}"] if self.cross_model else []),
            f"plots        {len(self.plots)} under {storage.join(self.output, 'plots')}",
            f"time         {self.seconds:.1f} s",
        ]
        if self.ground_truth:
            lines.insert(4, f"ground truth best {self.ground_truth}")
        lines += [f"failed       {f['checkpoint']}: {f['error']}" for f in self.failed]
        if self.lost.format():
            lines.append(f"lost         {self.lost.format('model group')} (each result written once)")
        return "\n".join(lines)


def checkpoint_roots(cfg: SweepConfig) -> list[tuple[str, bool]]:
    """`(URI, required)` to search: URIs with `{model}` expanded per selected model (not required to exist)."""
    models = cfg.models.resolve() if cfg.models is not None else None
    roots = []
    for uri in cfg.checkpoints:
        if MODEL_PLACEHOLDER not in uri:
            roots.append((uri, True))
        elif models is None:
            raise InvalidRequest(f"checkpoint URI {uri!r} holds {MODEL_PLACEHOLDER} but no `models` are selected")
        else:
            roots += [(uri.replace(MODEL_PLACEHOLDER, m), False) for m in models]
    return roots


def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """Find the checkpoints, keep the selected models' ones, claim the output and group what is left (no Ray)."""
    options = cfg.evaluation.storage.resolved()
    selected = set(cfg.models.resolve()) if cfg.models is not None else None
    uris: list[str] = []
    buckets_checked: set[str] = set()
    for root, required in checkpoint_roots(cfg):
        # A missing or unreachable bucket is an error even for a per-model root: otherwise every model would read
        # as "no checkpoints" (each after its own connection retries).
        bucket = root.split("/", 3)[2] if storage.is_s3(root) else ""
        if bucket not in buckets_checked:
            storage.require_bucket(root, options)
            buckets_checked.add(bucket)
        try:
            uris += find_checkpoints(root, options)
        except storage.MissingInputError:
            if required:
                raise
            log.info("no checkpoints at %s", root)
    if not uris:
        raise storage.MissingInputError(f"no checkpoints (cfg.json + sae_weights.safetensors) in {cfg.checkpoints}")
    infos, unreadable = [], []
    for uri in sorted(set(uris)):
        try:
            infos.append(read_checkpoint_info(uri, options))
        except PrismaRayError as exc:  # one bad cfg.json must not stop the others
            log.warning("%s", exc)
            unreadable.append({"checkpoint": uri, "error": f"{type(exc).__name__}: {exc}"})
    if selected is not None:
        infos = [i for i in infos if set(i.models) <= selected]
        if not infos and not unreadable:
            raise storage.MissingInputError(f"no checkpoint in {cfg.checkpoints} is of the selected models")
    results = ResultStore(cfg.output, options)
    results.claim(cfg.evaluation.model_dump(mode="json", exclude={"storage"}))
    done = results.done()
    groups: dict[tuple[str, ...], list[str]] = {}
    for info in infos:
        if result_key(info.uri) not in done:
            groups.setdefault(info.models, []).append(info.uri)
    ordered = sorted((Group(m, u) for m, u in groups.items()), key=lambda g: (-len(g.uris), g.models))
    log.info(
        "%s found, %d unreadable, %d to evaluate in %s",
        counted(len(infos) + len(unreadable), "checkpoint"),
        len(unreadable),
        sum(len(g.uris) for g in ordered),
        counted(len(ordered), "model group"),
    )
    return SweepPlan(cfg=cfg, found=infos, unreadable=unreadable, groups=ordered, results=results)


class SweepWorker:
    """Evaluates groups of checkpoints and writes each result as soon as it is done (a Ray actor in a sweep)."""

    def __init__(self, evaluation: EvalConfig, output: str, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.evaluator = Evaluator(evaluation, "evaluation.device")
        self.results = ResultStore(output, self.evaluator.options)

    def run(self, group: Group) -> dict[str, Any]:
        """Evaluate the group's checkpoints (all reading its models); returns the count done, the failures and
        the model loads."""
        self.evaluator.retain(set(group.models))
        before = dict(self.evaluator.loads)
        failed = []
        for uri in group.uris:
            try:
                self.results.write(self.evaluator.evaluate(uri))
            except Exception as exc:  # one bad checkpoint must not stop the others
                log.warning("%s: %s", uri, exc)
                failed.append({"checkpoint": uri, "error": f"{type(exc).__name__}: {exc}"})
        loads = {m: n - before.get(m, 0) for m, n in self.evaluator.loads.items() if n - before.get(m, 0)}
        return {"evaluated": len(group.uris) - len(failed), "failed": failed, "loads": loads}


def run_sweep(cfg: SweepConfig) -> SweepSummary:
    """Evaluate the checkpoints `cfg` asks for (skipping those already done) and write the report."""
    start = time.perf_counter()
    plan = plan_sweep(cfg)
    evaluated, failed, loads, lost = 0, list(plan.unreadable), {}, PoolStats()
    if plan.groups:
        for report in _run_pool(plan, lost):
            evaluated += report["evaluated"]
            failed += report["failed"]
            for model, n in report["loads"].items():
                loads[model] = loads.get(model, 0) + n
    redraw = {model for group in plan.groups for model in group.models}  # their rows changed: new plots
    summary = write_report(plan.results, cfg.evaluation.detect_auroc, cfg.evaluation, cfg.cross_model, redraw)
    plan.results.write_file("errors.json", json.dumps(failed, indent=1).encode())
    return SweepSummary(
        found=len(plan.found) + len(plan.unreadable),
        evaluated=evaluated,
        skipped=len(plan.found) - plan.pending,
        failed=failed,
        model_loads=loads,
        seconds=time.perf_counter() - start,
        lost=lost,
        **summary,
    )


def _run_pool(plan: SweepPlan, lost: PoolStats):
    """Evaluate the plan's groups on the actor pool, one group per actor at a time; yield each group's report
    as it finishes (`lost` counts what the pool lost and retried)."""
    cfg = plan.cfg
    ensure_ray(cfg.ray)
    size = size_pool(
        cfg.resources,
        cluster_resources(),
        len(plan.groups),
        device=cfg.evaluation.device,
        device_field="evaluation.device",
    )
    output = storage.absolute(cfg.output)
    evaluation = cfg.evaluation.model_copy(  # the actors run on the device the pool was sized for
        update={
            "storage": cfg.evaluation.storage.resolved(),
            "stores": storage.absolute(cfg.evaluation.stores),
            "device": size.device,
        }
    )
    log.info("%s", start_line(plan.pending, size))
    kwargs = {"evaluation": evaluation, "output": output, "torch_threads": size.torch_threads}
    with tqdm(total=plan.pending, unit="ckpt", desc="sweep", disable=not cfg.progress) as bar:
        for report in run_pool(plan.groups, SweepWorker, kwargs, size, method="run", stats=lost):
            bar.update(report["evaluated"] + len(report["failed"]))
            yield report


def start_line(checkpoints: int, size: PoolSize) -> str:
    """The sweep's start line: what the pool got."""
    placement = placement_line(size.actors, "evaluation actor", size.device, size.torch_threads)
    return f"evaluating {checkpoints} checkpoint{'' if checkpoints == 1 else 's'}: {placement}"


def write_report(
    results: ResultStore,
    detect_auroc: float = 0.95,
    evaluation: EvalConfig | None = None,
    cross_model: bool = True,
    redraw: Collection[str] | None = None,
) -> dict[str, Any]:
    """Write `metrics.parquet`, the plots and `leaderboard.html` from every result row, with the stability of
    each checkpoint against those differing from it only in seed (`stability.stability_columns`); `ground_truth`
    is the line on the best ground-truth recovery and its margin over the best baseline ("" without ground truth).
    Where the rows cover two models or more and `cross_model` is set, also the cross-model page (`cross_page.write_cross_model_page`, its
    held-out images read as `evaluation` says: default, the config recorded in the output); `cross_model` is its
    URI ("" for one model). The plots are redrawn for the models of `redraw` (default: all) and wherever a plot is
    missing; the others are kept (a campaign's per-model sweep redrew every model's plots before: quadratic)."""

    def decoder(uri: str) -> np.ndarray | None:
        try:
            return read_tensors(storage.join(uri, WEIGHTS_FILE), results.options)["W_dec"].numpy()
        except (PrismaRayError, OSError) as exc:  # removed or rewritten since it was evaluated: no stability against it
            log.warning("stability: %s", exc)
            return None

    table = stability_columns(results.table(), decoder)
    best = best_ground_truth(table.to_pylist())
    plots = _write_plots(results, table, redraw)
    relative = [f"plots/{p.rsplit('/', 1)[1]}" for p in plots]
    page = leaderboard_html(table, relative, title=f"prisma-ray sweep: {results.uri}")
    written = results.write_table(table)
    several = cross_model and len(sweep_models(table)) >= 2
    cross = write_cross_model_page(results.uri, evaluation=evaluation) if several else ""
    return {
        "output": results.uri,
        "table": written,
        "cross_model": cross,
        "leaderboard": results.write_file("leaderboard.html", page.encode()),
        "plots": plots,
        "rows": table.num_rows,
        "ground_truth": "" if best is None else ground_truth_line(best, detect_auroc),
    }


def _write_plots(results: ResultStore, table: pa.Table, redraw: Collection[str] | None) -> list[str]:
    """The URIs of every (model, hook) plot of `table`, drawing those of the models in `redraw` (None: all) and
    any not written yet."""
    if "l0" not in table.column_names:
        return []
    pairs = sorted(set(zip(table.column("model").to_pylist(), table.column("hook").to_pylist())))
    folder = storage.join(results.uri, "plots")
    try:
        kept = set(storage.list_files(folder, results.options))
    except FileNotFoundError:  # no plot written yet (MissingInputError is one too)
        kept = set()
    todo = [p for p in pairs if redraw is None or p[0] in redraw or plot_name(*p) not in kept]
    for name, png in front_plots(table, todo).items():
        results.write_file(f"plots/{name}", png)
    return [storage.join(folder, plot_name(*p)) for p in pairs]
