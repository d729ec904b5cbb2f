"""The Ray extraction pipeline (orchestration only; the work itself is in `extract.worker`).

    pending shards --> read and decode (CPU tasks, or a thread of the actor on CPU) --uint8 crops-->
    ExtractionWorker actors (`runtime.pool`; one GPU each where GPUs exist; one CPU worker on the driver's own
    one-node Ray: in this process, `resources.run_in`) --> one Parquet store per hook point

`extract.plan.plan_extract` checks the request and claims the stores before Ray starts; shards
complete in every store are skipped, so a rerun after a crash (or of a finished run) resumes
without duplicating rows; the manifests are written once every shard of a store is there.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from .. import store
from ..data.errors import errors_uri, read_errors_table
from ..errors import InvalidRequest
from ..models.token_selection import tokens_per_sample
from ..runtime.console import counted
from ..runtime.pool import PoolSize, PoolStats, shard_placement, shard_pool, stream_shards
from .config import ExtractConfig
from .plan import ExtractPlan, dataset_description, plan_extract, stored_heads
from .worker import ExtractionWorker

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """What a run did (`samples`..`bytes` count this run only), where its stores are, and what the actor pool
    lost and retried (`lost`: actors lost with their node, shards sent again)."""

    model: str
    stores: dict[str, str]
    shards_total: int
    shards_run: int
    shards_skipped: int
    samples: int
    errors: int
    tokens: int
    bytes: int
    values: int
    seconds: float
    complete: bool
    lost: PoolStats = field(default_factory=PoolStats)
    startup_seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_value(self) -> float:
        return self.bytes / self.values if self.values else 0.0

    def format(self) -> str:
        """The final summary printed by `prisma-ray extract`."""
        hooks = len(self.stores)
        lines = [
            f"model    {self.model}",
            f"shards   {self.shards_run} written, {self.shards_skipped} already complete, {self.shards_total} in all",
            f"samples  {self.samples}  ({self.errors} bad, see <store>/_errors)",
            f"tokens   {self.tokens} per hook point x {hooks} hook point{'s' if hooks > 1 else ''}",
            f"written  {self.bytes / 2**20:.2f} MiB  ({self.bytes_per_value:.3f} bytes per activation value)",
            f"time     {self.seconds:.1f} s  ({self.samples_per_s:.1f} samples/s, {self.tokens_per_s:.0f} tokens/s per hook; "
            f"{self.startup_seconds:.1f} s of start-up)",
        ]
        lines += [f"store    {uri}" for uri in self.stores.values()]
        if self.lost.format():
            lines.append(f"lost     {self.lost.format('shard')} (each written once)")
        if not self.complete:
            lines.append("status   incomplete: run the same config again to finish")
        return "\n".join(lines)


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract the activations `cfg` asks for (resuming a partial run) and return the run's summary."""
    start = time.perf_counter()
    plan = plan_extract(cfg)
    todo = sorted(plan.pending)[: cfg.max_shards]
    totals = dict.fromkeys(("samples", "errors", "tokens", "values", "bytes"), 0)
    lost = PoolStats()
    startup = 0.0
    if todo:
        for row in _run_pipeline(plan, todo, lost):
            if not startup:  # the first shard back: its own extraction time was not start-up
                startup = max(time.perf_counter() - start - float(row["seconds"]), 0.0)
            for key in totals:
                totals[key] += int(row[key])
    else:
        log.info("all %d shards are complete in every store; nothing to extract", len(plan.shards))
    complete = finalize_stores(plan)
    return ExtractSummary(
        model=plan.entry.name,
        stores={hook: w.uri for hook, w in plan.writers.items()},
        shards_total=len(plan.shards),
        shards_run=len(todo),
        shards_skipped=len(plan.shards) - len(plan.pending),
        seconds=time.perf_counter() - start,
        complete=complete,
        lost=lost,
        startup_seconds=startup,
        **totals,
    )


def _run_pipeline(plan: ExtractPlan, todo: list[int], lost: PoolStats):
    """Run the shards `todo` on the actor pool; yield each shard's summary row as it finishes (`lost` counts
    what the pool lost and retried)."""
    cfg = plan.cfg
    res = cfg.resources
    size, here = shard_pool(res, cfg.ray, len(todo))
    job = plan.job(size.device, size.torch_threads)
    shards = {i: ([asdict(r) for r in plan.shards[i]], plan.pending[i]) for i in todo}
    log.info("%s", start_line(len(todo), size, cfg.model_dtype, here))
    worker = ExtractionWorker
    yield from stream_shards(
        shards, plan.spec, plan.fmt, worker, {"job": job}, size, cfg.progress, "extract", lost, res.decode, here
    )


def start_line(shards: int, size: PoolSize, model_dtype: str, here: bool = False) -> str:
    """The extraction's start line: what the pool got (or, `here`, that this process runs the model) and the
    model's dtype."""
    placement = shard_placement(size, here, "extraction actor")
    cpus = "" if here else f", {size.cpus_per_actor:.2g} CPU{'' if size.cpus_per_actor == 1 else 's'} each"
    return f"extracting {counted(shards, 'shard')}: {placement}{cpus}, model in {model_dtype}"


def finalize_stores(plan: ExtractPlan) -> bool:
    """Merge the per-shard statistics of every complete store into its `manifest.json`; True if all are."""
    cfg, n_shards = plan.cfg, len(plan.shards)
    complete = True
    for hook, writer in plan.writers.items():
        done = writer.completed() & set(range(n_shards))
        if len(done) < n_shards:
            log.info("%s: %d of %d shards complete; rerun to finish", writer.uri, len(done), n_shards)
            complete = False
            continue
        if writer.remove_temporaries():
            log.info("%s: removed temporary files left by an interrupted run", writer.uri)
        stats = writer.merged_stats(done, plan.widths[hook])
        errors = read_errors_table(writer.uri, plan.options)
        if not stats.count:
            raise InvalidRequest(no_tokens_message(writer.uri, plan.spec.uri, errors))
        writer.write_manifest(
            store.Manifest(
                model=plan.entry.name,
                hook=hook,
                split=cfg.split,
                dtype=cfg.dtype,
                model_dtype=cfg.model_dtype,
                d_model=plan.widths[hook],
                heads=stored_heads(hook, cfg.head),
                token_selection=cfg.tokens.model_dump(mode="json"),
                token_layout=_layout_description(plan),
                dataset={
                    **dataset_description(plan.spec),
                    "frame_sampling": plan.fmt.sampling.model_dump(mode="json") if plan.fmt.sampling else None,
                    "inputs": plan.digest,
                },
                config_hash=plan.hashes[hook],
                n_samples=_count_samples(plan, writer, stats.count),
                n_tokens=stats.count,
                n_errors=errors.num_rows,
                shards=[store.shard_name(i) for i in sorted(done)],
                mean=stats.mean.tolist(),
                std=np.sqrt(stats.var).tolist(),
                mean_norm=stats.mean_norm,
            )
        )
    return complete


def no_tokens_message(store_uri: str, dataset_uri: str, errors: pa.Table) -> str:
    """Why a complete store holds no token: every sample rejected (the commonest reasons, one example each, from
    its `_errors` table) or an empty dataset. No manifest is written for it, so nothing downstream reads it."""
    if not errors.num_rows:
        return f"{store_uri}: no token extracted: the dataset {dataset_uri} gave no sample"
    reasons = Counter(errors.column("reason").to_pylist())
    example = dict(zip(errors.column("reason").to_pylist(), errors.column("detail").to_pylist()))
    why = "; ".join(f"{n} {reason} (e.g. {example[reason]})" for reason, n in reasons.most_common(3))
    return (
        f"{store_uri}: every sample of {dataset_uri} was rejected ({errors.num_rows}: {why}); "
        f"the rejections are in {errors_uri(store_uri)}"
    )


def _layout_description(plan: ExtractPlan) -> dict:
    """The manifest's `token_layout`: the fixed layout, or for multimodal models the prompts their sequences hold."""
    if plan.layout is None:
        return {"multimodal": True, "prompts": plan.prompts}
    return plan.layout.model_dump(mode="json")


def _count_samples(plan: ExtractPlan, writer: store.StoreWriter, n_tokens: int) -> int:
    """Samples with rows in a complete store (multimodal sequences vary in length: their ids are counted)."""
    if plan.layout is not None:
        return n_tokens // tokens_per_sample(plan.layout, plan.cfg.tokens)
    ids = store.read_table(writer.uri, plan.options, columns=["sample_id"]).column("sample_id")
    return len(ids.unique())
