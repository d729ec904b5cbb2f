"""The extraction worker, without Ray: one input shard in, one store shard per hook point out.

`prisma_ray.extract.pipeline` runs it on the actor pool of `runtime.pool`; tests call it in a plain process. The
flow for one input shard (a fixed, sorted slice of the dataset's refs):

1. `data.shards.decode_shard` (a CPU task): read, decode, resize and crop every sample to the model's
   input geometry as `uint8` (4x smaller than float pixels to ship); bad samples become `ErrorRecord`s. An
   image model reading videos gets one sample per sampled frame: the store rows keep the clip's sample id
   and the frame's index in the video (`frame` column).
2. `ExtractionWorker.process` (an actor): the model (eval mode, at the job's `model_dtype`, forward passes
   under `torch.inference_mode()`), its input per minibatch (`models.inputs`: the `uint8` crops moved to
   the model's device once, normalised there and cast to the model's dtype, or, for multimodal language
   models, each image with its prompt through the model's processor), one forward pass with every hook
   point cached, token selection and the statistics on the device; on CUDA each hook point's kept rows
   are copied into pinned host memory without blocking and the minibatch is synchronised once before
   the rows are encoded; then one store shard per hook point (written under a temporary name and renamed)
   plus the shard's bad samples in the errors table. Every hook point's shard is encoded before any is
   written: values the storage dtype cannot hold (or NaN/inf from the model) fail the shard with
   `store.ActivationRangeError` and nothing of it is written. The statistics are those of the stored
   values (rounded to the storage dtype), so the manifest describes what the store holds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from prisma_ray.errors import InvalidRequest

from .. import store
from ..data.errors import write_shard_errors
from ..data.shards import ShardData
from ..models import ModelEntry
from ..models.hooked import per_token
from ..models.inputs import KeptTokens, model_inputs
from ..models.loading import TORCH_DTYPES, actor_model
from ..models.spec import ModelDType
from ..models.token_selection import TokenSelection
from ..models.weights import WeightsRef
from ..storage import StorageOptions
from ..store import RunningStats, StoreDType

log = logging.getLogger(__name__)

SUMMARY_FIELDS = ("shard", "samples", "errors", "tokens", "values", "bytes", "seconds")


class WorkerJob(BaseModel):
    """What an `ExtractionWorker` needs (small and picklable: Ray ships it to every actor)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelEntry
    pretrained: bool
    seed: int
    model_dtype: ModelDType = "float32"
    weights: WeightsRef | None = Field(None, description="the checkpoint the weights come from (its SHA-256 checked)")
    tokens: TokenSelection
    head: int | None = Field(None, description="per-head hook points: this head only (None: heads flattened)")
    dtype: StoreDType
    stores: dict[str, str] = Field(description="hook point -> store URI (bad samples: `<store>/_errors`)")
    storage: StorageOptions
    batch_size: int
    prompts: list[str] | None = None
    device: str = "cpu"
    torch_threads: int | None = None


def stored_values(rows: torch.Tensor, dtype: StoreDType) -> torch.Tensor:
    """`float32` `rows` as a store of `dtype` holds them: rounded to nearest even, as `store.encode_acts` does
    (values beyond the dtype's range become inf here; `encode_acts` refuses them)."""
    return rows.to(TORCH_DTYPES[dtype]).to(torch.float32)


def stats_vector(x: torch.Tensor) -> torch.Tensor:
    """`float64[2 + 2 * width]` on `x`'s device for the rows `x [N, width]`: whether every value is finite (1/0),
    the sum of the row norms, the per-dimension mean and sum of squared deviations (`unpack_stats` reads it)."""
    x = x.to(torch.float64)
    finite = torch.isfinite(x).all().to(torch.float64)
    mean = x.mean(0) if len(x) else torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    m2 = ((x - mean) ** 2).sum(0)
    return torch.cat([finite[None], torch.linalg.vector_norm(x, dim=1).sum()[None], mean, m2])


def unpack_stats(vector: np.ndarray, count: int) -> tuple[bool, RunningStats]:
    """Whether the rows were finite, and their `RunningStats`, from a `stats_vector` of `count` rows."""
    width = (len(vector) - 2) // 2
    return bool(vector[0]), RunningStats(
        count, vector[2 : 2 + width].copy(), vector[2 + width :].copy(), float(vector[1])
    )


def store_frames(source: np.ndarray, model: np.ndarray) -> np.ndarray:
    """The store's `int16` frame column of kept rows: the source video frame (`source`, `int64[N]`, >= 0) where a
    video frame was read as an image sample (`ShardData.frames`), else the model-input frame the token covers
    (`model`, `KeptTokens.frame`: -1 for images and prefix tokens)."""
    return np.where(source >= 0, source, model).astype(np.int16)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` in host memory: a CUDA tensor is copied into pinned memory without blocking (read it only after
    `synchronize`); a CPU tensor is returned as it is."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # host: the pinned staging buffer
    return host.copy_(t, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (the copies `to_host` started); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class ExtractionWorker:
    """Runs the model over whole shards and writes one store shard per hook point.

    The actor pool calls it with one-row batches (`shard`, `payload`: `ShardData.to_bytes()`, `hooks`: JSON
    list of the hook points still missing for that shard); tests call `process` directly.
    """

    def __init__(self, job: WorkerJob):
        self.job = job
        self.device = torch.device(job.device)
        self.model = actor_model(job)
        self.inputs = model_inputs(self.model, job.tokens, job.prompts, self.device)
        self.writers = {hook: store.StoreWriter(uri, job.storage) for hook, uri in job.stores.items()}
        log.info(
            "worker ready: %s in %s on %s, %d torch threads",
            job.model.name,
            job.model_dtype,
            self.device,
            torch.get_num_threads(),
        )

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
        acts, stats, kept = self.extract(data.pixels, data.keys(), hooks, shard)
        ids = data.sample_ids[kept.sample].tolist()
        token = kept.position.astype(np.int16)
        frame = store_frames(data.frames[kept.sample], kept.frame)
        tables = {  # every hook point encoded (and range-checked) before anything of the shard is written
            hook: store.token_table(ids, token, frame, kept.kind, acts[hook], self.job.dtype, self._where(hook, shard))
            for hook in hooks
        }
        nbytes = 0
        for hook in hooks:
            write_shard_errors(data.errors, self.job.stores[hook], shard, self.job.storage)
            nbytes += self.writers[hook].write_shard(shard, tables[hook], stats[hook])
        return {
            "shard": shard,
            "samples": len(data.sample_ids),
            "errors": len(data.errors),
            "tokens": len(token),
            "values": sum(acts[hook].size for hook in hooks),
            "bytes": nbytes,
            "seconds": time.perf_counter() - start,
        }

    def _where(self, hook: str, shard: int | None) -> str:
        return f"store {self.job.stores[hook]} (hook point {hook} of {self.job.model.name}, input shard {shard})"

    @torch.inference_mode()
    def extract(
        self, pixels: np.ndarray, sample_ids: np.ndarray, hooks: Sequence[str], shard: int | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, RunningStats], KeptTokens]:
        """`float32[N, width]` kept activations and their statistics per hook point, and which tokens they are
        (`KeptTokens.sample` indexes `sample_ids`). The statistics are those of the values as stored in the
        job's dtype (`stored_values`), computed on the model's device; the activations are returned as the model
        gave them, in float32. A minibatch with values the dtype cannot hold (or NaN/inf) raises
        `store.ActivationRangeError` naming input `shard`. On CUDA one synchronisation per minibatch: each hook
        point's rows and statistics are copied to host memory without blocking, then read together."""
        widths = {h: self.model.hook_width(h, self.job.head) for h in hooks}
        chunks: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
        stats = {h: RunningStats.empty(widths[h]) for h in hooks}
        parts: list[KeptTokens] = []
        bs = self.job.batch_size
        for i in range(0, len(pixels), bs):
            x, kept = self.inputs(pixels[i : i + bs], sample_ids[i : i + bs])
            _, cache = self.model.run_with_cache(x, hooks, stop_early=True)
            host: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for hook in hooks:
                acts = per_token(cache[hook], self.job.head)
                self._check_shape(acts, kept.shape, widths[hook], hook)
                rows = kept.take(acts).to(torch.float32)
                host[hook] = to_host(rows), to_host(stats_vector(stored_values(rows, self.job.dtype)))
            synchronize(self.device)
            for hook in hooks:
                rows, vector = (t.numpy() for t in host[hook])
                finite, batch_stats = unpack_stats(vector, len(rows))
                if not finite:  # fail at the first such minibatch, naming its samples
                    ids = sample_ids[i : i + bs][kept.sample].tolist()
                    raise store.range_error(rows, self.job.dtype, self._where(hook, shard), ids)
                stats[hook] = stats[hook].merge(batch_stats)
                chunks[hook].append(rows)
            parts.append(kept)
        acts = {h: np.concatenate(c) if c else np.zeros((0, widths[h]), np.float32) for h, c in chunks.items()}
        return acts, stats, KeptTokens.concat(parts)

    def _check_shape(self, acts: torch.Tensor, shape: tuple[int, int], width: int, hook: str) -> None:
        if acts.dim() != 3 or tuple(acts.shape) != (*shape, width):
            raise InvalidRequest(
                f"{self.job.model.name} {hook}: got activations {list(acts.shape)}, expected {[*shape, width]} "
                "[batch, tokens, width] from its token layout; this hook point cannot be stored per token."
            )
