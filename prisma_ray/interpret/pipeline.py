"""The top-activations pass on Ray (orchestration only; the work is in `collect` and `topk`).

dataset shards --> read and decode (CPU tasks, as extraction) --uint8 crops--> LatentWorker actors
(`runtime.pool`, <= 1 CPU each by default; one GPU each where GPUs exist) --one LatentRecord per shard-->
merged on the driver (exact) --> results under `output` (`prisma_ray.interpret.results`)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from .. import storage
from ..data.shards import plan_shards
from ..data.sources import SampleRef, list_refs
from ..errors import InvalidRequest
from ..runtime.console import counted
from ..runtime.pool import PoolSize, PoolStats, shard_placement, shard_pool, stream_shards
from .collect import InterpretConfig, InterpretPlan, LatentWorker, fetch_crops, plan_interpret
from .results import needed_samples, read_summary, results_exist, write_results
from .topk import LatentRecord

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class InterpretSummary:
    """What a pass did and where its results are (`lost`: actors lost with their node, shards sent again)."""

    output: str
    samples: int
    errors: int
    latents: int
    alive: int
    seconds: float
    lost: PoolStats = field(default_factory=PoolStats)

    def format(self) -> str:
        lines = [
            f"samples  {self.samples}  ({self.errors} bad this run, see {self.output}/_errors)",
            f"latents  {self.latents}" + (f", {self.alive} fired at least once" if self.alive >= 0 else ""),
            f"time     {self.seconds:.1f} s",
            f"results  {self.output}",
        ]
        if self.lost.format():
            lines.append(f"lost     {self.lost.format('shard')} (each counted once)")
        return "\n".join(lines)


def refuse_another_site(output: str, options: storage.StorageOptions) -> None:
    """Refuse an `output` without results that holds a dashboard's `index.html`: another run's site whose results
    are elsewhere (a campaign's `dashboard/<model>`), which a new site would overwrite page by page."""
    if not storage.exists(storage.join(output, "index.html"), options):
        return
    raise InvalidRequest(
        f"{output} holds a dashboard (index.html) with no results of its own: another run's site, which this one "
        "would overwrite; write to a new output, or delete the old site first"
    )


def changed_from_results(plan: InterpretPlan, output: str) -> tuple[list[str], dict] | None:
    """`(changed, summary)`: the fields of `plan.description()` (checkpoint, model, dataset, k, ...) that differ
    from the pass whose results are under `output` ([] for the same pass), and those results' summary; None where
    `output` holds no results."""
    if not results_exist(output, plan.options):
        return None
    summary = read_summary(output, plan.options)
    wanted = json.loads(json.dumps(plan.description()))
    return [k for k in wanted if summary.get(k) != wanted[k]], summary


def run_interpret(cfg: InterpretConfig, replace: bool = True) -> InterpretSummary:
    """Run the pass `cfg` asks for on Ray and write its results; results of the same pass already
    under `output` are kept (no Ray is started). Results of another pass there (another checkpoint, dataset,
    `k`, ...) are replaced, or with `replace=False` (the `interpret` and `dashboard` commands) refused with
    `InvalidRequest` naming what changed, before any work."""
    start = time.perf_counter()
    plan = plan_interpret(cfg)
    output = storage.absolute(cfg.output)
    storage.require_bucket(output, plan.options)
    earlier = changed_from_results(plan, output)
    if earlier is not None:
        changed, summary = earlier
        if changed and not replace:
            raise InvalidRequest(
                f"{output} holds the results of another interpretation pass (changed: {', '.join(changed)}; "
                f"there: {summary.get('checkpoint')}); write to a new output, or delete the old results first"
            )
        if not changed:
            log.info("%s already holds the results of this pass; reusing them", output)
            return InterpretSummary(
                output=output,
                samples=summary["n_samples"],
                errors=0,
                latents=summary["n_latents"],
                alive=-1,
                seconds=0.0,
            )
    elif not replace:
        refuse_another_site(output, plan.options)
    refs = list_refs(plan.spec)
    if not refs:
        raise storage.MissingInputError(f"the {plan.spec.type} dataset lists no inputs; nothing to interpret.")
    shards = plan_shards(refs, plan.spec, cfg.shard_size)
    record, where, errors, lost = None, {}, 0, PoolStats()
    for row in _run_pipeline(plan, shards, lost):
        part = LatentRecord.from_bytes(row["record"])
        record = part if record is None else record.merge(part)
        where.update(dict.fromkeys(json.loads(row["sample_ids"]), int(row["shard"])))
        errors += int(row["errors"])
    crops = fetch_crops(plan, shards, where, needed_samples(record))
    write_results(output, record, plan.layout, plan.description(), crops, plan.options)
    return InterpretSummary(
        output=output,
        samples=record.n_samples,
        errors=errors,
        latents=record.n_latents,
        alive=int((record.fire_tokens > 0).sum()),
        seconds=time.perf_counter() - start,
        lost=lost,
    )


def start_line(shards: int, size: PoolSize, model_dtype: str, here: bool = False) -> str:
    """The pass's start line: what the pool got (or, `here`, that this process runs the model) and the model's
    dtype."""
    placement = shard_placement(size, here, "interpretation actor")
    return f"interpreting {counted(shards, 'shard')}: {placement}, model in {model_dtype}"


def _run_pipeline(plan: InterpretPlan, shards: list[list[SampleRef]], lost: PoolStats) -> Iterator[dict]:
    """Yield each shard's worker row (`shard`, `record`, `sample_ids`, `errors`) as it finishes (`lost` counts
    what the pool lost and retried)."""
    cfg = plan.cfg
    res = cfg.resources
    size, here = shard_pool(res, cfg.ray, len(shards))
    items = {i: ([asdict(r) for r in s], []) for i, s in enumerate(shards)}
    log.info("%s", start_line(len(shards), size, cfg.model_dtype, here))
    job = plan.job(size.device, size.torch_threads)
    yield from stream_shards(
        items, plan.spec, plan.fmt, LatentWorker, {"job": job}, size, cfg.progress, "interpret", lost, res.decode, here
    )
