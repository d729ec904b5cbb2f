"""The top-activations pass without Ray: its config, the checks before it starts, and the worker.

For one input shard (decoded by `prisma_ray.data.shards.decode_batch`, as extraction does), the
worker runs the hooked model up to the dictionary's input hook point, encodes every token with the
dictionary and folds the latent activations into a `LatentRecord`, which it returns whole; the
driver merges the records of all shards (`prisma_ray.interpret.pipeline`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field

from prisma_ray.errors import InvalidRequest

from .. import storage
from ..data.errors import write_shard_errors
from ..data.shards import InputFormat, ShardData, decode_shard, key_sample_id
from ..data.sources import SHARDED, DatasetSpec, SampleRef, SyntheticSource, with_resolved_storage
from ..data.synthetic import ShapesConfig
from ..models import HookedVisionModel, ModelEntry, TokenKind, TokenLayout
from ..models.hooked import per_token
from ..models.inputs import base_view_layout, model_inputs, model_prompts
from ..models.loading import actor_model, check_hooks, describe_model, resolve_entry
from ..models.spec import ModelAsExtracted, ModelDType, MultimodalLayout
from ..models.token_selection import MAX_TOKENS, TokenSelection, check_selection
from ..models.weights import WeightsRef, checked_weights
from ..runtime.pool import ShardResources
from ..runtime.session import RayOptions
from ..sae import load_dictionary
from ..sae.io import CheckpointInfo, read_checkpoint_info
from ..storage import StorageOptions
from .texttop import PromptTokens, prompt_tokens, token_strings
from .tiles import TileGeometry, llava_next_tiles
from .topk import LatentRecord

log = logging.getLogger(__name__)


def default_dataset() -> SyntheticSource:
    return SyntheticSource(uri="prisma-data/shapes", generator=ShapesConfig(n_images=128))


class InterpretConfig(ModelAsExtracted):
    """`prisma-ray interpret` / `dashboard`: one checkpoint's latents over a dataset.

    The model and hook point come from the checkpoint's `cfg.json` (`model`/`hook` override them);
    `pretrained: false` rebuilds the random weights an extraction with the same `seed` used. For a
    multimodal language model each image is asked one of `prompts` (pass those it was extracted with);
    the latents are read on the base view's image tokens of each image, as a patch grid for heatmaps,
    and on the text tokens of its sequence (the top text tokens, with their contexts).
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory (cfg.json + sae_weights.safetensors), local or s3://")
    dataset: DatasetSpec = Field(
        default_factory=default_dataset,
        description="the inputs whose activations rank the latents, by `type` (default: 128 synthetic shapes images)",
    )
    output: str = Field("prisma-interpret", description="results directory (local or s3://)")
    storage: StorageOptions = Field(StorageOptions(), description="how to reach `checkpoint` and `output`")
    model: str | ModelEntry | None = Field(None, description="default: the model named in the checkpoint")
    hook: str | None = Field(None, description="default: the checkpoint's input hook point")
    head: int | None = Field(
        None,
        ge=0,
        description="per-head hook points (attn.hook_q/k/v/z/result): the one head the checkpoint was trained on, as "
        "extract's `head` (the store manifest's `heads`); default: every head, flattened into the width",
    )
    prompts: list[str] | None = Field(
        None,
        min_length=1,
        description="multimodal models: the prompts images are shown with, one per sample "
        "picked by its id as at extraction (default: ['Describe the image.'])",
    )
    k: int = Field(
        16, ge=1, le=MAX_TOKENS, description="top samples kept per latent and ranking (max, mean; ranks are int16)"
    )
    reservoir: int = Field(256, ge=1, description="random firing samples kept per latent (histogram, quantiles)")
    negatives: int = Field(8, ge=0, description="samples kept per latent on which it never fires")
    reservoir_seed: int = Field(0, description="seed of the random reservoir sample")
    shard_size: int = Field(64, ge=1, description="samples per worker call")
    batch_size: int = Field(32, ge=1, description="samples per forward pass")
    resources: ShardResources = Field(
        ShardResources(), description="where the model actors run and what they and the decode tasks reserve"
    )
    progress: bool = Field(True, description="show a progress bar")
    ray: RayOptions = Field(RayOptions(), description="which Ray cluster to connect to")


@dataclass(frozen=True, kw_only=True)
class InterpretJob:
    """What a worker needs (small and picklable)."""

    checkpoint: str
    output: str
    model: ModelEntry
    pretrained: bool
    seed: int
    hook: str
    storage: StorageOptions
    k: int
    reservoir: int
    negatives: int
    reservoir_seed: int
    batch_size: int
    device: str = "cpu"
    torch_threads: int | None = None
    model_dtype: ModelDType = "float32"
    weights: WeightsRef | None = None
    prompts: tuple[str, ...] | None = None
    layout: TokenLayout | None = None  # the tokens read (default: the model's token layout)
    tiles: TileGeometry | None = None  # LLaVA-NeXT: the crop view's tiles (its maps are kept beside the top ones)
    head: int | None = None  # per-head hook points: this head only (None: heads flattened)


@dataclass(frozen=True, kw_only=True)
class InterpretPlan:
    """A checked pass: the checkpoint, the model and hook point it reads, the dataset and its input format.

    `layout` is the token layout the latents are read on (a multimodal model's base-view image
    tokens as a patch grid); `prompts` those of a multimodal model, None for vision models.
    """

    cfg: InterpretConfig
    info: CheckpointInfo
    entry: ModelEntry
    hook: str
    layout: TokenLayout
    spec: DatasetSpec
    fmt: InputFormat
    options: StorageOptions
    prompts: tuple[str, ...] | None = None
    weights: WeightsRef | None = None
    tiles: TileGeometry | None = None

    def job(self, device: str = "cpu", torch_threads: int | None = None) -> InterpretJob:
        c = self.cfg
        return InterpretJob(
            checkpoint=self.info.uri,
            output=storage.absolute(c.output),
            model=self.entry,
            pretrained=c.pretrained,
            seed=c.seed,
            hook=self.hook,
            storage=self.options,
            k=c.k,
            reservoir=c.reservoir,
            negatives=c.negatives,
            reservoir_seed=c.reservoir_seed,
            batch_size=c.batch_size,
            device=device,
            torch_threads=torch_threads,
            model_dtype=c.model_dtype,
            weights=self.weights,
            prompts=self.prompts,
            layout=self.layout,
            head=c.head,
            tiles=self.tiles,
        )

    def description(self) -> dict[str, Any]:
        """What determines the results (written to `summary.json`; `model_dtype` only when not float32, so results
        written before it existed are still reused)."""
        return {
            "checkpoint": self.info.uri,
            "model": self.entry.name,
            "pretrained": self.cfg.pretrained,
            "seed": self.cfg.seed,
            "hook": self.hook,
            "d_sae": self.info.d_sae,
            "token_layout": self.layout.model_dump(mode="json"),
            "dataset": self.spec.model_dump(mode="json", exclude={"storage"}),
            "modality": self.fmt.preprocess.modality,
            "k": self.cfg.k,
            "reservoir": self.cfg.reservoir,
            **({"model_dtype": self.cfg.model_dtype} if self.cfg.model_dtype != "float32" else {}),
            **({"weights": self.weights.record()} if self.weights else {}),
            **({"prompts": list(self.prompts), "text_tokens": True} if self.prompts else {}),
            **({"tiles": self.tiles.model_dump(mode="json")} if self.tiles else {}),
            **({"head": self.cfg.head} if self.cfg.head is not None else {}),
        }


def plan_interpret(cfg: InterpretConfig) -> InterpretPlan:
    """Check the checkpoint against the model and the dataset before any work starts (no Ray)."""
    options = cfg.storage.resolved()
    info = read_checkpoint_info(cfg.checkpoint, options)
    if len(info.sites.inputs) != 1:
        raise InvalidRequest(
            f"{cfg.checkpoint}: reads {len(info.sites.inputs)} sites; interpretation needs a dictionary "
            "over one hook point (an SAE or a transcoder)"
        )
    site = info.sites.inputs[0]
    name = cfg.model or site.model
    if not name:
        raise InvalidRequest(f"{cfg.checkpoint}: cfg.json names no model; set `model`")
    entry = resolve_entry(name)
    hook = cfg.hook or site.name
    model = describe_model(entry)
    check_hooks(model, [hook], cfg.head)
    width = model.hook_width(hook, cfg.head)
    if width != site.width:
        held = "" if cfg.head is None else f" (head {cfg.head})"
        raise InvalidRequest(
            f"{cfg.checkpoint} reads {site.width}-wide activations but {entry.name} {hook}{held} is "
            f"{width} wide; pick the checkpoint's model, hook point and `head` (as its store was extracted)"
        )
    prompts = model_prompts(model, cfg.prompts)
    weights = checked_weights(cfg.weights, options, model.model, entry.name)
    spec = with_resolved_storage(cfg.dataset)
    try:
        fmt = InputFormat.create(spec, model.preprocess)
        if prompts is not None and fmt.sampling is not None:
            raise InvalidRequest("interpreting a multimodal model's dictionary takes images, not videos")
    except ValueError as e:
        raise InvalidRequest(f"{entry.name} cannot take the {spec.type} dataset: {e}") from None
    layout = model.token_layout if prompts is None else base_view_layout(model, fmt.shape, prompts[0])
    tiles = crop_tiles(model, entry, fmt.shape, prompts[0]) if prompts is not None else None
    check_selection(layout, TokenSelection(mode="all"), entry.name)  # the results' int16 token columns hold it
    return InterpretPlan(
        cfg=cfg,
        info=info,
        entry=entry,
        hook=hook,
        layout=layout,
        spec=spec,
        fmt=fmt,
        options=options,
        prompts=None if prompts is None else tuple(prompts),
        weights=weights,
        tiles=tiles,
    )


def crop_tiles(model: HookedVisionModel, entry: ModelEntry, shape: tuple[int, ...], prompt: str) -> TileGeometry | None:
    """LLaVA-NeXT: the tiles of the high-resolution crop view of an image of `shape` (`tiles.llava_next_tiles`),
    checked against the model's own layout of one such image; None for other models."""
    if entry.family != "llava-next":
        return None
    config = model.model.config
    vision = config.vision_config
    tiles = llava_next_tiles(shape[:2], config.image_grid_pinpoints, vision.image_size, vision.patch_size)
    views = model.multimodal_layout(model.encode([np.zeros(shape, np.uint8)], [prompt])).views
    crop = [v.grid for v in views if v.view == 1]
    if crop != [tiles.grid]:
        raise InvalidRequest(
            f"{entry.name}: the crop view of a {shape[0]}x{shape[1]} image is {crop} in the model's layout but "
            f"{tiles.grid} from its image_grid_pinpoints; this model's high-resolution crops cannot be drawn as tiles"
        )
    return tiles


class LatentWorker:
    """Runs model and dictionary over whole shards and returns each shard's `LatentRecord`.

    The actor pool calls it with one-row batches (`shard`, `payload`: `ShardData.to_bytes()`); tests call `process`.
    """

    def __init__(self, job: InterpretJob):
        self.job = job
        self.device = torch.device(job.device)
        self.model = actor_model(job)
        self.inputs = model_inputs(self.model, TokenSelection(mode="all"), job.prompts, self.device)
        self.dictionary = load_dictionary(job.checkpoint, job.storage).to(self.device).eval()
        self.layout = job.layout or self.model.token_layout
        self.crop_tokens = 0 if job.tiles is None else job.tiles.grid[0] * job.tiles.grid[1]
        self.kinds = self.layout.kinds()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [
            self.process(ShardData.from_bytes(payload), int(shard))
            for shard, payload in zip(batch["shard"], batch["payload"])
        ]
        return {
            "shard": batch["shard"],
            "record": np.array([r.to_bytes() for r, _ in rows], dtype=object),
            "sample_ids": np.array([json.dumps(d.keys().tolist()) for _, d in rows], dtype=object),
            "errors": np.array([len(d.errors) for _, d in rows]),
        }

    def empty(self) -> LatentRecord:
        j = self.job
        return LatentRecord.empty(
            self.dictionary.n_latents,
            self.layout.n_tokens,
            j.k,
            j.reservoir,
            j.negatives,
            j.reservoir_seed,
            text=j.prompts is not None,
            crop_tokens=self.crop_tokens,
        )

    def process(self, data: ShardData, shard: int = 0) -> tuple[LatentRecord, ShardData]:
        """The record of one decoded shard; its bad samples go to `<output>/_errors`."""
        write_shard_errors(data.errors, self.job.output, shard, self.job.storage)
        record = self.empty()
        keys = data.keys()  # a video frame read by an image model: `<clip>#frame=<index>`
        for i in range(0, len(keys), self.job.batch_size):
            ids = keys[i : i + self.job.batch_size]
            pixels = data.pixels[i : i + self.job.batch_size]
            try:
                if self.job.prompts is None:
                    record = record.update(ids, self.latents(pixels, ids), self.kinds)
                else:
                    latents, texts, prompts, crops = self.prompt_latents(pixels, ids)
                    record = record.update(ids, latents, self.kinds, crops).update_text(ids, texts, prompts)
            except InvalidRequest as e:  # NaN/inf or values beyond the float16 maps: name the dictionary and shard
                raise InvalidRequest(f"{self.job.checkpoint} on {self.job.hook}, input shard {shard}: {e}") from e
        return record, data

    @torch.inference_mode()
    def latents(self, pixels: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
        """`float32[B, tokens, latents]` for `uint8` crops `pixels` (multimodal models: on each image's base view,
        see `prompt_latents`)."""
        if self.job.prompts is not None:
            return self.prompt_latents(pixels, sample_ids)[0]
        x, _ = self.inputs(pixels, sample_ids)
        _, cache = self.model.run_with_cache(x, [self.job.hook], stop_early=True)
        acts = per_token(cache[self.job.hook], self.job.head)  # per-head points: as extraction stored them
        return self._encode(acts)

    def _encode(self, acts: torch.Tensor) -> np.ndarray:
        return self.dictionary.encode(acts.to(self.dictionary.W_enc.dtype)).float().cpu().numpy()

    @torch.inference_mode()
    def prompt_latents(
        self, pixels: np.ndarray, sample_ids: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray], list[PromptTokens], np.ndarray | None]:
        """A multimodal model's latents for each image asked its sample's prompt: `float32[B, grid tokens, L]` at
        each image's base-view tokens (row-major), per sample `float32[n_b, L]` at its text tokens (the prompt's
        and chat template's, `PromptTokens` in sequence order), and for LLaVA-NeXT (`job.tiles`)
        `float32[B, crop tokens, L]` at the crop view's tokens (row-major, newlines left out; else None)."""
        x, layout = self.inputs.encode(pixels, sample_ids)
        base = self._view_mask(layout, 0, self.layout.n_tokens, "base")
        crop = self._view_mask(layout, 1, self.crop_tokens, "crop") if self.crop_tokens else None
        _, cache = self.model.run_with_cache(x, [self.job.hook], stop_early=True)
        acts = per_token(cache[self.job.hook], self.job.head)

        def at(mask: np.ndarray) -> np.ndarray:  # [B, tokens of the view, L], row-major
            return self._encode(acts[torch.from_numpy(mask).to(self.device)].reshape(len(pixels), -1, acts.shape[-1]))

        ids, mask = x["input_ids"].cpu().numpy(), x["attention_mask"].cpu().numpy().astype(bool)
        prompts = [
            prompt_tokens(token_strings(self.model.tokenizer, ids[b]), layout.kind[b], mask[b])
            for b in range(len(pixels))
        ]
        rows = torch.cat([acts[b, torch.from_numpy(p.positions).to(self.device)] for b, p in enumerate(prompts)])
        text = np.split(self._encode(rows), np.cumsum([len(p.positions) for p in prompts])[:-1])
        return at(base), text, prompts, None if crop is None else at(crop)

    def _view_mask(self, layout: MultimodalLayout, view: int, tokens: int, name: str) -> np.ndarray:
        """`bool[B, seq]`: the patch tokens of view `view` of each sample's image, refused unless `tokens` each."""
        mask = (layout.kind == TokenKind.PATCH) & (layout.view == view) & (layout.image == 0)
        if (mask.sum(1) != tokens).any():
            raise InvalidRequest(
                f"{self.job.model.name}: {name} views of {sorted(set(mask.sum(1).tolist()))} tokens, expected "
                f"{tokens}; the images must have the tower's size"
            )
        return mask


def fetch_crops(
    plan: InterpretPlan, shards: list[list[SampleRef]], where: dict[str, int], wanted: set[str]
) -> dict[str, np.ndarray]:
    """The model-geometry `uint8` crops of the samples `wanted` (`frame_key`s), decoded again from their shards
    (`where[key]` = shard index); for file sources only the wanted files are read."""
    by_shard: dict[int, set[str]] = {}
    for key in wanted:
        by_shard.setdefault(where[key], set()).add(key)
    crops = {}
    for shard, keys in sorted(by_shard.items()):
        files = {key_sample_id(k) for k in keys}
        refs = shards[shard] if isinstance(plan.spec, SHARDED) else [r for r in shards[shard] if r.sample_id in files]
        data = decode_shard(refs, plan.spec, plan.fmt)
        crops.update({k: p for k, p in zip(data.keys().tolist(), data.pixels) if k in keys})
    return crops
