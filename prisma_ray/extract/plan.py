"""Planning an extraction without Ray: check the config, list and shard the inputs, claim the stores.

`plan_extract` checks everything and claims the stores before Ray starts: a missing input or
output bucket, an unknown model or hook point, a model/dataset mismatch or a changed config fails
there. Shards complete in every store are skipped, so a rerun resumes without duplicating rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prisma_ray.errors import InvalidRequest

from .. import storage, store
from ..data.shards import InputFormat, plan_shards
from ..data.sources import SHARDED, DatasetSpec, SampleRef, list_refs, with_resolved_storage
from ..models import ModelEntry, TokenLayout
from ..models.hook_points import HEAD_SITES, LM_PREFIX
from ..models.inputs import model_prompts
from ..models.loading import check_hooks, describe_model, resolve_entry
from ..models.token_selection import check_selection
from ..models.weights import WeightsRef, checked_weights
from ..runtime.console import counted
from .config import ExtractConfig
from .worker import WorkerJob

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAX_SHARD_BYTES = 1 << 30


@dataclass(kw_only=True)
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
    weights: WeightsRef | None = None

    def job(self, device: str = "cpu", torch_threads: int | None = None) -> WorkerJob:
        """What every `ExtractionWorker` of this extraction needs, for actors on `device`."""
        c = self.cfg
        return WorkerJob(
            model=self.entry,
            pretrained=c.pretrained,
            seed=c.seed,
            model_dtype=c.model_dtype,
            weights=self.weights,
            tokens=c.tokens,
            head=c.head,
            dtype=c.dtype,
            stores={hook: w.uri for hook, w in self.writers.items()},
            storage=self.options,
            batch_size=c.batch_size,
            prompts=self.prompts,
            device=device,
            torch_threads=torch_threads,
        )


def pending_shards(n_shards: int, completed: dict[str, set[int]]) -> dict[int, list[str]]:
    """`{shard: hooks whose store lacks it}` for every shard that some store still lacks."""
    pending = {}
    for shard in range(n_shards):
        todo = [hook for hook, done in completed.items() if shard not in done]
        if todo:
            pending[shard] = todo
    return pending


def inputs_digest(refs: Sequence[SampleRef]) -> str:
    """A digest of the listed inputs: adding, removing or relabelling a file changes it."""
    h = hashlib.sha256()
    for ref in sorted(refs, key=lambda r: (r.sample_id, r.uri)):
        h.update(f"{ref.sample_id}\t{ref.uri}\t{ref.label}\n".encode())
    return h.hexdigest()[:16]


def dataset_description(spec: DatasetSpec) -> dict[str, Any]:
    """The dataset spec as recorded in configs and manifests (storage options and credentials left out)."""
    return spec.model_dump(mode="json", exclude={"storage"})


def store_description(
    cfg: ExtractConfig,
    entry: ModelEntry,
    hook: str,
    spec: DatasetSpec,
    digest: str,
    prompts: list[str] | None,
    weights: WeightsRef | None = None,
) -> dict[str, Any]:
    """Everything that determines the rows of one store (JSON-normalised; `prompts`: multimodal models only;
    `weights`: the checkpoint's URI and SHA-256, when the model's weights came from one; `model_dtype` only
    when not float32, and `heads` only for per-head hook points, so stores written before these existed keep
    their hash and read as float32)."""
    description = {
        "format": FORMAT_VERSION,
        "model": entry.model_dump(mode="json"),
        "pretrained": cfg.pretrained,
        "seed": cfg.seed,
        "hook": hook,
        "tokens": cfg.tokens.model_dump(mode="json"),
        "dtype": cfg.dtype,
        "dataset": dataset_description(spec),
        "shard_size": 1 if isinstance(spec, SHARDED) else cfg.shard_size,
        "inputs": digest,
    }
    if cfg.model_dtype != "float32":
        description["model_dtype"] = cfg.model_dtype
    if weights is not None:
        description["weights"] = weights.record()
    if prompts is not None:
        description["prompts"] = prompts
    heads = stored_heads(hook, cfg.head)
    if heads is not None:
        description["heads"] = heads
    return json.loads(json.dumps(description))


def stored_heads(hook: str, head: int | None) -> int | str | None:
    """What a store of `hook` holds of the heads: `"flattened"` (every head, head-major in the width), one head's
    index, or None for a hook point without heads."""
    local = hook.removeprefix(LM_PREFIX)
    if not any(local.endswith(f".{site}") for site in HEAD_SITES):
        return None
    return "flattened" if head is None else head


def config_hash(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def plan_extract(cfg: ExtractConfig) -> ExtractPlan:
    """Check the config against the model, the dataset and the output, then claim the stores (no Ray)."""
    entry = resolve_entry(cfg.model)
    model = describe_model(entry)
    check_hooks(model, cfg.hooks, cfg.head)
    multimodal = model.preprocess.modality == "multimodal"
    check_selection(model.token_layout, cfg.tokens, entry.name, multimodal)
    prompts = model_prompts(model, cfg.prompts)
    options = cfg.storage.resolved()
    weights = checked_weights(cfg.weights, options, model.model, entry.name)
    spec = with_resolved_storage(cfg.dataset)
    try:
        fmt = InputFormat.create(spec, model.preprocess)
        if prompts is not None:  # the processor takes one blank input of this dataset's geometry
            model.encode([np.zeros(fmt.shape, np.uint8)], prompts[:1])
    except ValueError as e:
        raise InvalidRequest(f"{entry.name} cannot take the {spec.type} dataset: {e}") from None
    output = storage.absolute(cfg.output)
    storage.require_bucket(output, options)
    refs = list_refs(spec)
    if not refs:
        raise storage.MissingInputError(f"the {spec.type} dataset lists no inputs; nothing to extract.")
    shards = plan_shards(refs, spec, cfg.shard_size)
    shard_bytes = math.prod(fmt.shape) * len(shards[0]) * fmt.samples_per_ref
    if shard_bytes > _MAX_SHARD_BYTES:
        raise InvalidRequest(
            f"one shard of {len(shards[0]) * fmt.samples_per_ref} samples is {shard_bytes / 2**20:.0f} MiB of pixels; "
            "lower shard_size."
        )
    digest = inputs_digest(refs)
    writers, hashes, descriptions = {}, {}, {}
    for hook in cfg.hooks:
        writers[hook] = store.StoreWriter(store.store_uri(output, entry.name, hook, cfg.split), options)
        descriptions[hook] = store_description(cfg, entry, hook, spec, digest, prompts, weights)
        hashes[hook] = config_hash(descriptions[hook])
    claimed = {hook for hook, writer in writers.items() if writer.claimed() is not None}
    for hook in sorted(claimed) + [h for h in cfg.hooks if h not in claimed]:
        writers[hook].claim(hashes[hook], descriptions[hook])
    pending = pending_shards(len(shards), {hook: w.completed() for hook, w in writers.items()})
    log.info(
        "%s: %s in %s, %d pending", entry.name, inputs_line(len(refs), fmt), counted(len(shards), "shard"), len(pending)
    )
    widths = {hook: model.hook_width(hook, cfg.head) for hook in cfg.hooks}
    layout = None if multimodal else model.token_layout
    return ExtractPlan(
        cfg=cfg,
        entry=entry,
        layout=layout,
        widths=widths,
        prompts=prompts,
        spec=spec,
        fmt=fmt,
        shards=shards,
        digest=digest,
        writers=writers,
        hashes=hashes,
        pending=pending,
        options=options,
        weights=weights,
    )


def inputs_line(refs: int, fmt: InputFormat) -> str:
    """What the plan reads, in the samples the summary counts: `12 samples`, or for an image model reading
    video (`InputFormat.per_frame`) `3 clips (24 samples: 8 frames each)`."""
    if not fmt.per_frame:
        return counted(refs, "sample")
    per = fmt.samples_per_ref
    return f"{counted(refs, 'clip')} ({counted(refs * per, 'sample')}: {per} frames each)"
