"""The Ray Data extraction pipeline (orchestration only; the work itself is in `prisma_ray.activations`).

    pending shards --from_items--> decode (CPU tasks) --uint8 crops--> ExtractionWorker actors
    (ActorPoolStrategy; one GPU each where GPUs exist) --> one Parquet store per hook point

`plan_extract` checks everything and claims the stores before Ray starts: a missing input or
output bucket, an unknown model or hook point, a model/dataset mismatch or a changed config fails
there. Shards complete in every store are skipped, so a rerun after a crash (or of a finished run)
resumes without duplicating rows; the manifests are written once every shard of a store is there.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import storage, store
from .activations import (
    ExtractConfig,
    ExtractionWorker,
    WorkerJob,
    check_hooks,
    config_hash,
    dataset_description,
    describe_model,
    inputs_digest,
    pending_shards,
    plan_shards,
    resolve_entry,
    store_description,
)
from .data.errors import read_errors_table
from .data.sources import DatasetSpec, SampleRef, list_refs, with_resolved_storage
from .decoding import InputFormat
from .model_inputs import model_prompts
from .models import ModelEntry, TokenLayout
from .ray_session import ensure_ray
from .shard_stream import actor_resources, stream_shards
from .token_selection import check_selection, tokens_per_sample

log = logging.getLogger(__name__)

_MAX_SHARD_BYTES = 1 << 30


@dataclass
class ExtractPlan:
    """A checked extraction: the model, the dataset, its shards and the claimed stores.

    `layout` is the token layout of vision models, None for multimodal models (whose sequences
    vary); `widths` the activation width of each hook point; `prompts` those of multimodal models.
    """

    cfg: ExtractConfig
    entry: ModelEntry
    layout: TokenLayout | None
    widths: dict[str, int]
    prompts: list[str] | None
    spec: DatasetSpec
    fmt: InputFormat
    shards: list[list[SampleRef]]
    digest: str
    writers: dict[str, store.StoreWriter]
    hashes: dict[str, str]
    pending: dict[int, list[str]]
    options: storage.StorageOptions


@dataclass
class ExtractSummary:
    """What a run did (`samples`..`bytes` count this run only) and where its stores are."""

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
            f"time     {self.seconds:.1f} s  ({self.samples_per_s:.1f} samples/s, {self.tokens_per_s:.0f} tokens/s per hook)",
        ]
        lines += [f"store    {uri}" for uri in self.stores.values()]
        if not self.complete:
            lines.append("status   incomplete: run the same config again to finish")
        return "\n".join(lines)


def plan_extract(cfg: ExtractConfig) -> ExtractPlan:
    """Check the config against the model, the dataset and the output, then claim the stores (no Ray)."""
    entry = resolve_entry(cfg.model)
    model = describe_model(entry)
    check_hooks(model, cfg.hooks)
    multimodal = model.preprocess.modality == "multimodal"
    check_selection(model.token_layout, cfg.tokens, entry.name, multimodal)
    prompts = model_prompts(model, cfg.prompts)
    spec = with_resolved_storage(cfg.dataset)
    try:
        fmt = InputFormat.create(spec, model.preprocess)
        if prompts is not None:  # the processor takes one blank input of this dataset's geometry
            model.encode([np.zeros(fmt.shape, np.uint8)], prompts[:1])
    except ValueError as e:
        raise ValueError(f"{entry.name} cannot take the {spec.type} dataset: {e}") from None
    output = storage.absolute(cfg.output)
    options = cfg.storage.resolved()
    storage.require_bucket(output, options)
    refs = list_refs(spec)
    if not refs:
        raise storage.MissingInputError(f"the {spec.type} dataset lists no inputs; nothing to extract.")
    shards = plan_shards(refs, spec, cfg.shard_size)
    shard_bytes = math.prod(fmt.shape) * len(shards[0])
    if shard_bytes > _MAX_SHARD_BYTES:
        raise ValueError(
            f"one shard of {len(shards[0])} samples is {shard_bytes / 2**20:.0f} MiB of pixels; lower shard_size."
        )
    digest = inputs_digest(refs)
    writers, hashes, descriptions = {}, {}, {}
    for hook in cfg.hooks:
        writers[hook] = store.StoreWriter(store.store_uri(output, entry.name, hook, cfg.split), options)
        descriptions[hook] = store_description(cfg, entry, hook, spec, digest, prompts)
        hashes[hook] = config_hash(descriptions[hook])
    claimed = {hook for hook, writer in writers.items() if writer.claimed() is not None}
    for hook in sorted(claimed) + [h for h in cfg.hooks if h not in claimed]:
        writers[hook].claim(hashes[hook], descriptions[hook])
    pending = pending_shards(len(shards), {hook: w.completed() for hook, w in writers.items()})
    log.info("%s: %d samples in %d shards, %d pending", entry.name, len(refs), len(shards), len(pending))
    widths = {hook: model.hook_width(hook) for hook in cfg.hooks}
    layout = None if multimodal else model.token_layout
    return ExtractPlan(cfg, entry, layout, widths, prompts, spec, fmt, shards, digest, writers, hashes, pending,
                       options)  # fmt: skip


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract the activations `cfg` asks for (resuming a partial run) and return the run's summary."""
    start = time.perf_counter()
    plan = plan_extract(cfg)
    todo = sorted(plan.pending)[: cfg.max_shards]
    totals = dict.fromkeys(("samples", "errors", "tokens", "values", "bytes"), 0)
    if todo:
        for row in _run_pipeline(plan, todo):
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
        **totals,
    )


def _run_pipeline(plan: ExtractPlan, todo: list[int]):
    """Run the Ray Data pipeline over the shards `todo`; yield each shard's summary row as it finishes."""
    cfg = plan.cfg
    ensure_ray(cfg.ray)
    resources = actor_resources(cfg, len(todo))
    device, actors, actor_cpus, threads = resources
    job = WorkerJob(
        model=plan.entry,
        pretrained=cfg.pretrained,
        seed=cfg.seed,
        tokens=cfg.tokens,
        dtype=cfg.dtype,
        stores={hook: w.uri for hook, w in plan.writers.items()},
        storage=plan.options,
        batch_size=cfg.batch_size,
        prompts=plan.prompts,
        device=device,
        torch_threads=threads,
    )
    items = [
        {"shard": i, "refs": json.dumps([asdict(r) for r in plan.shards[i]]), "hooks": json.dumps(plan.pending[i])}
        for i in todo
    ]
    log.info("extracting %d shards with %d %s actor(s) (%.2g CPUs, %s torch threads each)", len(todo), actors, device,
             actor_cpus, threads or "default")  # fmt: skip
    yield from stream_shards(items, plan.spec, plan.fmt, ExtractionWorker, {"job": job}, resources,
                             cfg.decode_num_cpus, cfg.progress, "extract")  # fmt: skip


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
        writer.write_manifest(
            store.Manifest(
                model=plan.entry.name,
                hook=hook,
                split=cfg.split,
                dtype=cfg.dtype,
                d_model=plan.widths[hook],
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
                n_errors=read_errors_table(writer.uri, plan.options).num_rows,
                shards=[store.shard_name(i) for i in sorted(done)],
                mean=stats.mean.tolist(),
                std=np.sqrt(stats.var).tolist(),
                mean_norm=stats.mean_norm,
            )
        )
    return complete


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
