"""The only Ray code of `prisma_ray.data`: a dataset spec becomes a `ray.data.Dataset` of decoded rows."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict

import ray

from prisma_ray.data.batches import Batch, RowFormat, decode_refs
from prisma_ray.data.sources import SHARDED, DatasetSpec, SampleRef, list_refs, with_resolved_storage
from prisma_ray.models.spec import PreprocessSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_BYTES = 64 * 2**20
_BLOCKS_PER_CPU = 4
_MAX_REFS_PER_BLOCK = 1024


def build_dataset(
    spec: DatasetSpec,
    preprocess: PreprocessSpec | None = None,
    *,
    batch_size: int = 16,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """A lazy dataset of decoded (and, given `preprocess`, model-ready) rows; columns in `prisma_ray.data.batches`.

    Lists the inputs on the driver first, so a missing bucket or path raises `MissingInputError` before
    any task runs. Decoding runs in CPU `map_batches` tasks (`num_cpus` each) that emit at most
    `batch_size` rows and `max_batch_bytes` of tensors per batch. Bad samples are rows with a non-empty
    `error`: call `split_errors(batch)` in the consuming UDF.
    """
    spec = with_resolved_storage(spec)
    fmt = RowFormat.create(spec, preprocess)
    refs = list_refs(spec)
    max_rows = max(1, min(batch_size, max_batch_bytes // fmt.row_bytes))
    refs_per_task = 1 if isinstance(spec, SHARDED) else max_rows
    log.info("dataset %s: %d refs, %s %s %s", spec.type, len(refs), fmt.column, fmt.shape, fmt.dtype)
    items = ray.data.from_items([asdict(r) for r in refs], override_num_blocks=_num_blocks(len(refs), refs_per_task))
    return items.map_batches(
        _decode_batch,
        batch_size=refs_per_task,
        batch_format="numpy",
        fn_kwargs={"spec": spec, "fmt": fmt, "max_rows": max_rows},
        num_cpus=num_cpus,
    )


def _decode_batch(batch: Batch, spec: DatasetSpec, fmt: RowFormat, max_rows: int) -> Iterator[Batch]:
    refs = [SampleRef(str(u), str(s), int(lab)) for u, s, lab in zip(batch["uri"], batch["sample_id"], batch["label"])]
    yield from decode_refs(refs, spec, fmt, max_rows)


def _num_blocks(n_refs: int, refs_per_task: int) -> int:
    """A few blocks of refs per CPU (one task each; tasks are costly), but no block above `_MAX_REFS_PER_BLOCK`."""
    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count() or 1
    wanted = min(math.ceil(n_refs / refs_per_task), _BLOCKS_PER_CPU * max(1, int(cpus)))
    return max(1, wanted, math.ceil(n_refs / _MAX_REFS_PER_BLOCK))
