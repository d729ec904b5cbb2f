"""Activation extraction without Ray: the job config, shard planning, decoding, the worker.

`prisma_ray.extract` wires these into a Ray Data pipeline; every piece here also runs in a plain
process. The flow for one input shard (a fixed, sorted slice of the dataset's refs):

1. `decoding.decode_shard` (a CPU task): read, decode, resize and crop every sample to the model's
   input geometry as `uint8` (4x smaller than float pixels to ship); bad samples become `ErrorRecord`s.
2. `ExtractionWorker.process` (an actor): the model's input per minibatch (`model_inputs`: pixels
   normalised on the model's device, or, for multimodal language models, each image with its
   prompt through the model's processor), one forward pass with every hook point cached, token
   selection, then one store shard per hook point (written under a temporary name and renamed)
   plus the shard's bad samples in the errors table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import storage, store
from .decoding import ShardData
from .data.errors import ERROR_SCHEMA, ErrorRecord, errors_uri, format_counts
from .data.sources import SHARDED, DatasetSpec, SampleRef, SyntheticSource
from .data.synthetic import ShapesConfig
from .models import HookedVisionModel, ModelEntry, build_sites, get_entry
from .model_inputs import KeptTokens, model_inputs
from .ray_session import RayOptions
from .store import RunningStats, StoreDType
from .storage import StorageOptions
from .token_selection import TokenSelection

log = logging.getLogger(__name__)

DEFAULT_MODEL = "timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k"
FORMAT_VERSION = 1
SUMMARY_FIELDS = ("shard", "samples", "errors", "tokens", "values", "bytes", "seconds")


def _default_dataset() -> SyntheticSource:
    return SyntheticSource(uri="prisma-data/shapes", generator=ShapesConfig(n_images=128))


class ExtractConfig(BaseModel):
    """`prisma-ray extract`: a dataset through one model into one activation store per hook point.

    Stores live at `<output>/<model>/<hook>/<split>`, each with its bad samples under `_errors/`.
    `model` is a registry name or an inline registry entry (any architecture an adapter can build).
    Multimodal language models (LLaVA, Qwen-VL) see each image with a prompt from `prompts` and
    store tokens of their sequence at `lm.*` hook points (`tokens.mode`: all, text, image, ...).
    Fields that change the stored rows (model, pretrained, seed, hooks, tokens, dtype, dataset,
    shard_size, prompts and the listed inputs) are hashed per store: rerunning the same config resumes,
    a changed one is refused. The others (batch size, actors, resources) may change between runs.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | ModelEntry = DEFAULT_MODEL
    pretrained: bool = Field(False, description="False: random weights drawn from `seed` (no download)")
    seed: int = 0
    hooks: list[str] = Field(default_factory=lambda: ["blocks.6.hook_resid_post"], min_length=1)
    tokens: TokenSelection = TokenSelection()
    dtype: StoreDType = "float16"
    prompts: list[str] | None = Field(
        None, min_length=1,
        description="multimodal models: the user's text after the image, one per sample picked by its id "
        "(default: ['Describe the image.'])",
    )
    dataset: DatasetSpec = Field(default_factory=_default_dataset)
    split: str = "train"
    output: str = "prisma-activations"
    storage: StorageOptions = Field(StorageOptions(), description="how to reach `output`")
    shard_size: int = Field(64, ge=1, description="samples per shard (Parquet/WebDataset sources: one shard per file)")
    batch_size: int = Field(32, ge=1, description="samples per forward pass")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    actors: int | None = Field(None, ge=1, description="model actors (default: one per GPU; on CPU one per CPU, at most 8)")
    actor_num_cpus: float | None = Field(None, gt=0, description="CPUs reserved per actor (default: up to 1)")
    decode_num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per decode task")
    torch_threads: int | None = Field(None, ge=1, description="CPU actors' torch threads (default: CPUs / actors)")
    max_shards: int | None = Field(None, ge=1, description="stop after this many shards; a rerun goes on")
    progress: bool = True
    ray: RayOptions = RayOptions()

    @field_validator("hooks")
    @classmethod
    def _unique(cls, hooks: list[str]) -> list[str]:
        if len(set(hooks)) != len(hooks):
            raise ValueError(f"hooks must be distinct; got {hooks}")
        return hooks

    @field_validator("split")
    @classmethod
    def _plain_name(cls, split: str) -> str:
        if not split or "/" in split or split.startswith((".", "_")):
            raise ValueError(f"split must be a plain name (no '/', not starting with '.' or '_'); got {split!r}")
        return split


# ---------------------------------------------------------------------------------------------
# Models, hook points, token selection


def resolve_entry(model: str | ModelEntry) -> ModelEntry:
    """The registry entry named `model` (an unknown name raises `UnknownModel`), or the inline entry."""
    return model if isinstance(model, ModelEntry) else get_entry(model)


def build_model(entry: ModelEntry, pretrained: bool, seed: int, device: str | torch.device = "cpu") -> HookedVisionModel:
    """The entry's hooked model in eval mode; with `pretrained=False` its random weights depend on `seed` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HookedVisionModel(build_sites(entry, pretrained), entry.name).eval()
    model.model.to(device)  # HookedVisionModel.to() is shadowed by its own `_apply` helper
    return model


def actor_model(entry: ModelEntry, pretrained: bool, seed: int, device: torch.device,
                torch_threads: int | None) -> HookedVisionModel:  # fmt: skip
    """`build_model` in a model actor: on CPU it first takes `torch_threads` threads (when given)."""
    if device.type == "cpu" and torch_threads:
        torch.set_num_threads(torch_threads)
    return build_model(entry, pretrained, seed, device)


def describe_model(entry: ModelEntry) -> HookedVisionModel:
    """The entry's hooked model on the `meta` device: hook names, layout and input spec, no weights."""
    with torch.device("meta"):
        return HookedVisionModel(build_sites(entry, False), entry.name)


def check_hooks(model: HookedVisionModel, hooks: Sequence[str]) -> None:
    """Raise unless every hook point exists and holds one activation vector per token of the sequence."""
    multimodal = model.preprocess.modality == "multimodal"
    for name in hooks:
        point = model.hook_point(name)
        if point.site == "attn.hook_pattern":
            raise ValueError(
                f"{name} holds attention probabilities [batch, heads, tokens, tokens], not one vector per token; "
                "extract a residual, attention-output or MLP hook point instead."
            )
        if multimodal and not point.lm:
            raise ValueError(
                f"{name} is on {model.name}'s vision tower, whose tokens are image crops or packed patches, not the "
                "sequence's tokens; extract lm.* hook points (the language model) from a multimodal model."
            )


# ---------------------------------------------------------------------------------------------
# Shards, config hash


def plan_shards(refs: Sequence[SampleRef], spec: DatasetSpec, shard_size: int) -> list[list[SampleRef]]:
    """Cut the refs, sorted by sample id, into shards of `shard_size` (one per file for Parquet/WebDataset)."""
    ordered = sorted(refs, key=lambda r: (r.sample_id, r.uri))
    size = 1 if isinstance(spec, SHARDED) else shard_size
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


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
    cfg: ExtractConfig, entry: ModelEntry, hook: str, spec: DatasetSpec, digest: str, prompts: list[str] | None
) -> dict[str, Any]:
    """Everything that determines the rows of one store (JSON-normalised; `prompts`: multimodal models only)."""
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
    if prompts is not None:
        description["prompts"] = prompts
    return json.loads(json.dumps(description))


def config_hash(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The worker (actors)


class WorkerJob(BaseModel):
    """What an `ExtractionWorker` needs (small and picklable: Ray ships it to every actor)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelEntry
    pretrained: bool
    seed: int
    tokens: TokenSelection
    dtype: StoreDType
    stores: dict[str, str] = Field(description="hook point -> store URI (bad samples: `<store>/_errors`)")
    storage: StorageOptions
    batch_size: int
    prompts: list[str] | None = None
    device: str = "cpu"
    torch_threads: int | None = None


def tensor_stats(x: torch.Tensor) -> RunningStats:
    """Running statistics of the rows of `x` (computed in float64 on `x`'s device)."""
    x = x.to(torch.float64)
    mean = x.mean(0)
    m2 = ((x - mean) ** 2).sum(0)
    norm_sum = torch.linalg.vector_norm(x, dim=1).sum()
    return RunningStats(len(x), mean.cpu().numpy(), m2.cpu().numpy(), float(norm_sum))


def write_shard_errors(records: Sequence[ErrorRecord], owner: str, shard: int, options: StorageOptions | None) -> None:
    """Write a shard's bad samples as `<owner>/_errors/part-<shard>.parquet` (a rerun overwrites, never duplicates).

    `read_errors_table(owner)` reads them back.
    """
    if not records:
        return
    now = datetime.now(timezone.utc)
    table = pa.Table.from_pylist([{**asdict(r), "time": now} for r in records], schema=ERROR_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    uri = storage.join(errors_uri(owner), f"part-{shard:05d}.parquet")
    fs, path = storage.resolve(uri, options)
    store.write_atomic(fs, path, buf.getvalue().to_pybytes())
    log.warning("shard %d: %d bad samples skipped (%s); recorded in %s", shard, len(records), format_counts(records), uri)


class ExtractionWorker:
    """Runs the model over whole shards and writes one store shard per hook point.

    Ray Data calls it with one-row batches (`shard`, `payload`: `ShardData.to_bytes()`, `hooks`: JSON
    list of the hook points still missing for that shard); tests call `process` directly.
    """

    def __init__(self, job: WorkerJob):
        self.job = job
        self.device = torch.device(job.device)
        self.model = actor_model(job.model, job.pretrained, job.seed, self.device, job.torch_threads)
        self.inputs = model_inputs(self.model, job.tokens, job.prompts, self.device)
        self.writers = {hook: store.StoreWriter(uri, job.storage) for hook, uri in job.stores.items()}
        log.info("worker ready: %s on %s, %d torch threads", job.model.name, self.device, torch.get_num_threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [
            self.process(int(shard), ShardData.from_bytes(payload), json.loads(hooks))
            for shard, payload, hooks in zip(batch["shard"], batch["payload"], batch["hooks"])
        ]
        return {k: np.array([row[k] for row in rows]) for k in SUMMARY_FIELDS}

    def process(self, shard: int, data: ShardData, hooks: Sequence[str] | None = None) -> dict[str, Any]:
        """Extract and write shard `shard` for `hooks` (default: all); return its summary row."""
        start = time.perf_counter()
        hooks = list(self.job.stores) if hooks is None else list(hooks)
        acts, stats, kept = self.extract(data.pixels, data.sample_ids, hooks)
        ids = data.sample_ids[kept.sample].tolist()
        token = kept.position.astype(np.int16)
        nbytes = 0
        for hook in hooks:
            write_shard_errors(data.errors, self.job.stores[hook], shard, self.job.storage)
            table = store.token_table(ids, token, kept.frame, kept.kind, acts[hook], self.job.dtype)
            nbytes += self.writers[hook].write_shard(shard, table, stats[hook])
        return {
            "shard": shard,
            "samples": len(data.sample_ids),
            "errors": len(data.errors),
            "tokens": len(token),
            "values": sum(acts[hook].size for hook in hooks),
            "bytes": nbytes,
            "seconds": time.perf_counter() - start,
        }

    @torch.inference_mode()
    def extract(
        self, pixels: np.ndarray, sample_ids: np.ndarray, hooks: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, RunningStats], KeptTokens]:
        """`float32[N, width]` kept activations and their statistics per hook point, and which tokens they are
        (`KeptTokens.sample` indexes `sample_ids`)."""
        widths = {h: self.model.hook_width(h) for h in hooks}
        chunks: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
        stats = {h: RunningStats.empty(widths[h]) for h in hooks}
        parts: list[KeptTokens] = []
        bs = self.job.batch_size
        for i in range(0, len(pixels), bs):
            x, kept = self.inputs(pixels[i : i + bs], sample_ids[i : i + bs])
            _, cache = self.model.run_with_cache(x, hooks, stop_early=True)
            for hook in hooks:
                self._check_shape(cache[hook], kept.shape, widths[hook], hook)
                rows = kept.take(cache[hook]).to(torch.float32)
                stats[hook] = stats[hook].merge(tensor_stats(rows))
                chunks[hook].append(rows.cpu().numpy())
            parts.append(kept)
        acts = {h: np.concatenate(c) if c else np.zeros((0, widths[h]), np.float32) for h, c in chunks.items()}
        return acts, stats, KeptTokens.concat(parts)

    def _check_shape(self, acts: torch.Tensor, shape: tuple[int, int], width: int, hook: str) -> None:
        if acts.dim() != 3 or tuple(acts.shape) != (*shape, width):
            raise ValueError(
                f"{self.job.model.name} {hook}: got activations {list(acts.shape)}, expected {[*shape, width]} "
                "[batch, tokens, width] from its token layout; this hook point cannot be stored per token."
            )
