"""Evaluating checkpoints: `EvalConfig` (what to measure, where the held-out stores are) and `Evaluator`.

The evaluator keeps what checkpoints of the same model share: the model itself (loaded once and
counted in `loads`), the held-out rows of each store, the decoded inputs and clean runs of the
spliced-in evaluation, the zero-ablation runs, the ground-truth labels of the tokens and the baselines
scored on them. Evaluate every checkpoint of a model with one evaluator and each of these is paid for once.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load as load_safetensors

from prisma_ray.errors import InvalidRequest

from .. import storage, store
from ..config import require_distinct
from ..data.shards import InputFormat, decode_first
from ..data.synthetic import read_table
from ..models import HookedVisionModel, TokenKind
from ..models.inputs import PixelInputs, PromptInputs
from ..models.loading import TORCH_DTYPES, describe_model, load_model
from ..runtime.devices import Device, local_device
from ..sae import Dictionary, load_dictionary
from ..sae.dictionary import Site
from ..sae.io import CheckpointInfo, read_checkpoint_info
from ..storage import StorageOptions
from ..store import KIND_CODES
from .baselines import BASELINES, Baseline, baseline_recovery, margin_columns
from .ground_truth import (
    detector_column,
    factor_recovery,
    recovery_columns,
    source_frames,
    token_factors,
)
from .heldout import HeldOut, StoreSource, read_held_out, store_selection
from .metrics import Reconstruction, Sparsity, decoder_norm_shares, share_summary
from .pooled_truth import PooledLabels, patch_tokens_per_sample, pooled_columns, pooled_labels
from .splice import (
    Head,
    SpliceBatch,
    TaskTotals,
    ZeroShotHead,
    classifier_head,
    clean_totals,
    next_token_readout,
    outputs_logits,
    resume_point,
    run_mode,
    summarize,
)

log = logging.getLogger(__name__)


class HeadConfig(BaseModel):
    """A CLIP-style zero-shot head for a model whose output is an image embedding."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text_embeddings: str = Field(
        description="URI of a .npy or .safetensors `[classes, width]` matrix: the text "
        "embedding of each class name, in dataset label order"
    )
    logit_scale: float = Field(100.0, gt=0, description="multiplies the cosine similarities into logits (CLIP: 100)")


class EvalConfig(BaseModel):
    """What to measure, on which held-out stores (`<stores>/<model>/<hook>/<split>`, as `prisma-ray extract` writes)."""

    model_config = ConfigDict(extra="forbid")

    stores: str = Field(
        "prisma-activations", description="root of the held-out stores, as `output` of `prisma-ray extract`"
    )
    split: str = Field("test", description="split of the held-out stores")
    max_tokens: int = Field(8192, ge=1, description="held-out tokens per store")
    batch_size: int = Field(2048, ge=1, description="tokens per dictionary forward pass")
    dense_threshold: float = Field(0.1, gt=0, le=1, description="a latent firing on more tokens than this is dense")
    splice_samples: int = Field(64, ge=0, description="inputs run with the dictionary spliced in (0: skip)")
    splice_batch_size: int = Field(16, ge=1, description="inputs per forward pass of the spliced-in evaluation")
    heads: dict[str, HeadConfig] = Field(default_factory=dict, description="zero-shot heads by model name")
    ground_truth: bool = Field(True, description="factor recovery on stores of synthetic datasets")
    ground_truth_tokens: int = Field(4096, ge=1, description="held-out tokens scored for factor recovery")
    factors: list[str] | None = Field(None, description="default: shape, colour (and direction for moving-shapes)")
    gt_min_coverage: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a patch is a positive or negative of a factor value when its dominant object covers at least "
        "this fraction of it (or it is background); edge patches below it are ambiguous and not scored",
    )
    baselines: list[Baseline] = Field(
        list(BASELINES), description="ground-truth baselines scored on the same tokens: raw, pca, kmeans, random"
    )
    baseline_clusters: int | None = Field(
        None, ge=2, description="k-means baseline centroids (default: 4 x the activation width, at most 1024)"
    )
    baseline_directions: int | None = Field(
        None, ge=1, description="random baseline unit directions (default: the activation width)"
    )
    baseline_seed: int = Field(0, description="seed of the k-means and random baselines")
    baseline_fit_split: str | None = Field(
        "train",
        description="PCA and k-means are fitted on up to max_tokens patch tokens of this split of the same model and "
        "hook (the split dictionaries train on), as a dictionary is, never on the scored rows; where it does not exist "
        "(or null): on the held-out patch tokens after the scored rows",
    )
    detect_auroc: float = Field(
        0.95,
        gt=0.5,
        le=1,
        description="a factor value counts as detected when its best single-latent AUROC reaches this",
    )
    device: Device = Field(
        "auto", description="where models and dictionaries run: cpu, cuda, or auto (cuda when this process sees a GPU)"
    )
    storage: StorageOptions = Field(StorageOptions(), description="how to reach s3:// checkpoints and stores")

    @field_validator("baselines")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        return require_distinct(names, "baselines")

    def store_uri(self, site: Site) -> str:
        return store.store_uri(storage.absolute(self.stores), site.model, site.name, self.split)


@dataclass
class SpliceData:
    """A model's inputs for spliced-in evaluation, with their clean runs."""

    head: Head | None
    batches: list[SpliceBatch]
    label_source: str
    note: str = ""


@dataclass
class StoreTruth:
    """Ground truth of a store's first held-out rows: which are `scored` (`bool[N]`), their `factors` (values of the
    scored rows only), the baselines' `factor_recovery` results on those rows and what the baselines were fitted on."""

    scored: np.ndarray
    factors: dict[str, np.ndarray]
    baselines: dict[str, dict[str, Any]]
    baseline_fit: str


HeldKey = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...] | None]


class Evaluator:
    """Evaluates checkpoints against held-out stores, caching what checkpoints of one model share.

    `device_field` names `cfg.device` in errors (`evaluation.device` in a sweep): `cuda` where torch sees no GPU
    raises `InvalidRequest`.
    """

    def __init__(self, cfg: EvalConfig, device_field: str = "device"):
        self.cfg = cfg
        self.options = cfg.storage.resolved()
        self.device = local_device(cfg.device, device_field)
        self.loads: Counter[str] = Counter()
        self._models: dict[str, HookedVisionModel] = {}
        self._built: dict[str, dict[str, Any]] = {}  # how each cached model was built (see `StoreSource.build`)
        self._sources: dict[str, StoreSource] = {}
        self._held: dict[HeldKey, HeldOut] = {}
        self._splice: dict[str, SpliceData] = {}
        self._zero: dict[tuple, TaskTotals] = {}
        self._truth: dict[HeldKey, StoreTruth] = {}  # by held-out rows: the dictionary's token kinds pick them
        self._pooled: dict[HeldKey, PooledLabels] = {}

    def retain(self, models: set[str]) -> None:
        """Drop the cached models and data of every model not in `models` (bounds memory between groups)."""

        def keep(key: str) -> bool:
            return any(f"/{m}/" in key for m in models)

        def keep_rows(key: HeldKey) -> bool:
            return all(keep(u) for u in (*key[0], *key[1]))

        self._models = {k: v for k, v in self._models.items() if k in models}
        self._built = {k: v for k, v in self._built.items() if k in models}
        self._splice = {k: v for k, v in self._splice.items() if k in models}
        self._zero = {k: v for k, v in self._zero.items() if k[0] in models}
        self._held = {k: v for k, v in self._held.items() if keep_rows(k)}
        self._truth = {k: v for k, v in self._truth.items() if keep_rows(k)}
        self._pooled = {k: v for k, v in self._pooled.items() if keep_rows(k)}
        self._sources = {k: v for k, v in self._sources.items() if keep(k)}

    @torch.inference_mode()
    def evaluate(self, uri: str) -> dict[str, Any]:
        """The metrics row of the checkpoint at `uri`."""
        start = time.perf_counter()
        info = read_checkpoint_info(uri, self.options)
        unnamed = [s.name for s in (*info.sites.inputs, *info.sites.targets) if not s.model]
        if unnamed:
            raise InvalidRequest(f"{uri}: cfg.json names no model for {unnamed}; its held-out store cannot be found")
        d = load_dictionary(info, self.options).to(self.device).eval()
        inputs = [self.cfg.store_uri(s) for s in info.sites.inputs]
        targets = [self.cfg.store_uri(s) for s in info.sites.outputs]
        for s in (*info.sites.inputs, *info.sites.outputs):
            self._source(self.cfg.store_uri(s)).check_width(s.width, f"{uri} at {s.name}")
        key = (tuple(inputs), tuple(targets), info.token_kinds)
        held = self._held_out(key)
        source = self._source(inputs[0])
        truth = self.cfg.ground_truth and source.synthetic and source.description is not None and not source.multimodal
        metrics, latents = self._store_metrics(d, info, held, self.cfg.ground_truth_tokens if truth else 0)
        row = {**info.row(), **metrics}
        if self.cfg.splice_samples:
            row.update(self._spliced(d, info, inputs[0]))
        if truth:
            row.update(self._ground_truth(latents, held, source, key))
            row.update(self._pooled_truth(latents, held, source, key))
        row["seconds"] = time.perf_counter() - start
        return row

    def _source(self, uri: str) -> StoreSource:
        if uri not in self._sources:
            self._sources[uri] = StoreSource.open(uri, self.options)
        return self._sources[uri]

    def _held_out(self, key: HeldKey) -> HeldOut:
        """The held-out rows of `key` (input stores, target stores, token kinds)."""
        inputs, targets, kinds = key
        if key not in self._held:
            for uri in (*inputs, *targets):  # a missing store fails here, naming its manifest
                self._source(uri)
            self._held[key] = read_held_out(list(inputs), list(targets), self.cfg.max_tokens, self.options, kinds)
        return self._held[key]

    def _model(self, name: str, source: StoreSource) -> HookedVisionModel:
        """The model that wrote `source` (same registry entry, weights, seed and dtype), loaded once; a weights file
        whose SHA-256 is no longer the one recorded, or a store of the same model built otherwise than the one
        loaded, raises `InvalidRequest` naming both."""
        if name in self._models and self._built[name] != source.build:
            raise InvalidRequest(
                f"{source.uri}: its model {name} was built with {source.build}, unlike the one already loaded for "
                f"another store of this evaluation ({self._built[name]}); evaluate them separately"
            )
        if name not in self._models:
            entry = source.entry
            if entry is None or entry.name != name:
                raise InvalidRequest(f"{source.uri}: its _config.json does not describe model {name!r}")
            log.info("loading %s in %s for evaluation on %s", name, source.model_dtype, self.device)
            self._models[name] = load_model(
                entry,
                source.description["pretrained"],
                weights=source.weights,
                storage=self.options,
                seed=source.description["seed"],
                device=self.device,
                dtype=TORCH_DTYPES[source.model_dtype],
            )
            self._built[name] = source.build
            self.loads[name] += 1
        return self._models[name]

    def _store_metrics(
        self, d: Dictionary, info: CheckpointInfo, held: HeldOut, keep: int
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Reconstruction and sparsity metrics over the held-out rows, and the latents of the first `keep` rows."""
        targets = info.sites.targets
        bounds = info.sites.out_bounds()
        total, sparsity = Reconstruction(), Sparsity(d.n_latents)
        per_site = [Reconstruction() for _ in targets] if len(targets) > 1 else []
        reference = held.x if held.y is None else held.y
        kept: list[torch.Tensor] = []
        for i in range(0, len(held), self.cfg.batch_size):
            x = held.x[i : i + self.cfg.batch_size].to(self.device)
            y = reference[i : i + self.cfg.batch_size].to(self.device)
            z = d.encode(x)
            pred = d.decode(z)
            if d.cfg.skip_connection:
                pred = pred + d.skip(x) / d.out_scale
            total.update(y, pred)
            sparsity.update(z)
            if i < keep:
                kept.append(z[: keep - i].float().cpu())
            for acc, (a, b) in zip(per_site, bounds):
                acc.update(y[..., a:b], pred[..., a:b])
        row: dict[str, Any] = {"eval_tokens": len(held), **total.summary()}
        row.update(sparsity.summary(self.cfg.dense_threshold))
        if per_site:
            labels = [f"{s.model}/{s.name}" if len(info.models) > 1 else s.name for s in targets]
            shares = share_summary(decoder_norm_shares(d.W_dec, bounds), labels)
            row["shared_fraction"] = shares["shared"]
            row["per_site"] = json.dumps(
                {
                    label: {
                        **acc.summary(),
                        "specific_fraction": shares["specific"][label],
                        "mean_share": shares["mean_share"][label],
                        "share_hist": shares["hist"][label],
                    }
                    for label, acc in zip(labels, per_site)
                }
            )
        return row, torch.cat(kept).numpy() if kept else np.zeros((0, d.n_latents), np.float32)

    def _spliced(self, d: Dictionary, info: CheckpointInfo, source_uri: str) -> dict[str, Any]:
        if len(info.models) > 1:
            return {"splice_note": "crosscoder across models: spliced-in evaluation needs one model"}
        source = self._source(source_uri)
        if source.description is None:
            return {"splice_note": f"{source_uri} has no _config.json, so its model and inputs are unknown"}
        name = info.models[0]
        model = self._model(name, source)
        hooks = {s.name for s in (*info.sites.inputs, *info.sites.targets)}
        if source.multimodal:  # where the spliced runs resume (`SpliceBatch.run`)
            hooks |= {resume} if (resume := resume_point(model, hooks)) else set()
        data = self._splice_data(name, source, sorted(hooks))
        if data.head is None:
            return {"splice_note": data.note}
        self._ensure_clean(model, data, hooks)
        if source.multimodal:
            codes = torch.tensor([KIND_CODES[k] for k in info.token_kinds or KIND_CODES], device=self.device)
            where, at = (lambda batch: torch.isin(batch.kinds, codes)), tuple(codes.tolist())
        else:
            positions = torch.as_tensor(source.positions(), device=self.device)
            where, at = (lambda _batch: positions), tuple(positions.tolist())
        sites = (*info.sites.inputs, *info.sites.targets)
        heads = {s.name: self._source(self.cfg.store_uri(s)).head for s in sites}
        targets = tuple((s.name, heads[s.name]) for s in info.sites.targets)
        zero_key = (name, targets, source.multimodal, at)
        if zero_key not in self._zero:
            self._zero[zero_key] = run_mode(model, data.head, d, where, "zero", data.batches, heads)
        sae = run_mode(model, data.head, d, where, "sae", data.batches, heads)
        error = run_mode(model, data.head, d, where, "error", data.batches, heads)
        metrics = summarize(clean_totals(data.batches), sae, error, self._zero[zero_key])
        samples = sum(len(b.x["input_ids"] if isinstance(b.x, dict) else b.x) for b in data.batches)
        return {**metrics, "label_source": data.label_source, "splice_samples": samples}

    def _splice_data(self, name: str, source: StoreSource, hooks: list[str]) -> SpliceData:
        """The inputs of model `name` and their clean runs (each one forward pass, which also caches the
        activations at `hooks`: those of the first dictionary evaluated)."""
        if name in self._splice:
            return self._splice[name]
        model = self._model(name, source)
        if source.multimodal:
            self._splice[name] = self._sequence_splice_data(model, source, hooks)
            return self._splice[name]
        head = self._head(name, model)
        if head is None:
            note = f"{name} outputs an embedding, not logits; set heads.{name}.text_embeddings"
            self._splice[name] = SpliceData(None, [], "", note)
            return self._splice[name]
        spec = source.dataset(self.options)
        data = decode_first(spec, InputFormat.create(spec, model.preprocess), self.cfg.splice_samples)
        x = PixelInputs(model, device=self.device).pixels(data.pixels)
        y = torch.from_numpy(data.labels).to(self.device)
        size = self.cfg.splice_batch_size
        runs = [model.run_with_cache(x[i : i + size], hooks) for i in range(0, len(x), size)]
        clean = torch.cat([head(output) for output, _ in runs])
        label_source = "dataset"
        if bool(((y < 0) | (y >= clean.shape[1])).any()):
            y, label_source = clean.argmax(1), "clean_top1"
        batches = [
            SpliceBatch(x[i : i + size], y[i : i + size], clean[i : i + size], cache)
            for i, (_, cache) in zip(range(0, len(x), size), runs)
        ]
        self._splice[name] = SpliceData(head, batches, label_source)
        return self._splice[name]

    def _sequence_splice_data(self, model: HookedVisionModel, source: StoreSource, hooks: list[str]) -> SpliceData:
        """A multimodal model's held-out inputs (image + prompt, as extracted) scored on next-token
        prediction of every text token, with the store's tokens of each kind marked for splicing. The vision
        tower runs once per batch (`lm_input`); the logits are computed at the scored positions only."""
        spec = source.dataset(self.options)
        fmt = InputFormat.create(spec, model.preprocess)
        data = decode_first(spec, fmt, self.cfg.splice_samples)
        selection = store_selection(source.manifest.token_selection)
        inputs = PromptInputs(model, selection, source.description["prompts"], self.device)
        size, batches = self.cfg.splice_batch_size, []
        for i in range(0, len(data.sample_ids), size):
            ids = data.sample_ids[i : i + size]
            x, layout = inputs.encode(data.pixels[i : i + size], ids)
            kept = inputs.keep(x, layout, ids)
            kinds = np.full(layout.kind.shape, -1, dtype=np.int8)
            kinds[kept.sample, kept.position] = kept.kind
            text = torch.from_numpy(layout.kind == TokenKind.TEXT).to(self.device)
            readout, labels = next_token_readout(x["input_ids"], x["attention_mask"], text)
            batch = SpliceBatch(
                x,
                labels,
                None,
                kinds=torch.from_numpy(kinds).to(self.device),
                readout=readout,
                lm_x=model.lm_input(x),
            )
            batch.clean_logits, batch.clean = model.run_with_cache(batch.input(model, hooks), hooks, logits_at=readout)
            batches.append(batch)
        return SpliceData(classifier_head, batches, "next_token")

    def _head(self, name: str, model: HookedVisionModel) -> Head | None:
        head = self.cfg.heads.get(name)
        if head is not None:
            return ZeroShotHead(load_matrix(head.text_embeddings, self.options).to(self.device), head.logit_scale)
        return classifier_head if outputs_logits(model) else None

    def _ensure_clean(self, model: HookedVisionModel, data: SpliceData, hooks: set[str]) -> None:
        for batch in data.batches:
            missing = sorted(hooks - set(batch.clean))
            if missing:
                _, cache = model.run_with_cache(batch.input(model, missing), missing, stop_early=True)
                batch.clean.update(cache)

    def _ground_truth(self, latents: np.ndarray, held: HeldOut, source: StoreSource, key: HeldKey) -> dict[str, Any]:
        """Factor recovery from the `latents` of the first held-out rows of a synthetic dataset's store, and its
        margin over the baselines scored on the same tokens."""
        truth = self._store_truth(source, held, key)
        scored = latents[truth.scored]
        result = factor_recovery(scored, truth.factors, self.cfg.detect_auroc, detectors=True)
        detectors = detector_column(result.pop("detectors"))
        row = {**recovery_columns(result), **margin_columns(result, truth.baselines), **detectors}
        if truth.baselines:
            row["gt_baseline_fit"] = truth.baseline_fit
        return row

    def _store_truth(self, source: StoreSource, held: HeldOut, key: HeldKey) -> StoreTruth:
        """The labels of the first `ground_truth_tokens` held-out rows and the baselines on them, once per rows."""
        if key in self._truth:
            return self._truth[key]
        spec = source.dataset(self.options)
        generator = spec.generator
        motion = ["direction"] if generator.name == "moving-shapes" else []
        model = self._models.get(source.entry.name) or describe_model(source.entry)
        tables = {t: read_table(spec.uri, t, spec.storage) for t in ("samples", "patches", "objects")}
        keys = held.keys.slice(0, self.cfg.ground_truth_tokens)
        labels = token_factors(
            keys,
            source.layout,
            tables["patches"],
            tables["objects"],
            tuple(generator.patch_grid),
            self.cfg.factors or ["shape", "colour", *motion],
            model.preprocess.crop_pct,
            source_frames(tables["samples"], source.sampling),
        )
        scored = labels.scored(self.cfg.gt_min_coverage)
        factors = {f: v[scored] for f, v in labels.values.items()}
        x = held.x[: len(keys)][torch.from_numpy(scored)].float().numpy()
        fit, fit_note = self._baseline_fit(source, held, len(keys), x.shape[1])
        baselines = baseline_recovery(
            x,
            fit,
            factors,
            self.cfg.baselines,
            self.cfg.detect_auroc,
            self.cfg.baseline_seed,
            self.cfg.baseline_clusters,
            self.cfg.baseline_directions,
        )
        self._truth[key] = StoreTruth(scored, factors, baselines, fit_note)
        return self._truth[key]

    def _baseline_fit(self, source: StoreSource, held: HeldOut, n: int, width: int) -> tuple[np.ndarray, str]:
        """`(rows, note)`: the patch tokens PCA and k-means are fitted on and where they come from. First choice: the
        `baseline_fit_split` store beside the held-out one (what the dictionaries were trained on: out of sample for
        both); else the held-out patch tokens after the `n` scored rows; else, with fewer of those than `width`, the
        scored rows themselves (in sample, which favours the baselines: the note says so)."""
        split = self.cfg.baseline_fit_split
        if split and split != self.cfg.split:
            uri = storage.join(source.uri.rstrip("/").rsplit("/", 1)[0], split)
            try:
                rows = read_held_out([uri], [], self.cfg.max_tokens, self.options, ["patch"]).x
            except (InvalidRequest, OSError) as exc:
                log.info("ground-truth baselines: no %s split to fit on (%s)", split, exc)
            else:
                if len(rows) >= width:
                    return rows.float().numpy(), f"{split}: {len(rows)} patch tokens of {uri}"
        rest = held.x[n:][torch.from_numpy(held.keys.column("token").to_numpy()[n:] >= source.layout.n_prefix)]
        if len(rest) >= width:
            return rest.float().numpy(), f"held-out: {len(rest)} patch tokens after the {n} scored rows"
        held_x = held.x[:n].float().numpy()
        patch = held.keys.column("token").to_numpy()[:n] >= source.layout.n_prefix
        return held_x[patch], (
            f"scored rows: {len(rest)} held-out patch tokens after the {n} scored rows, fewer than the width {width}; "
            f"extract a {split or 'train'} split or raise max_tokens above ground_truth_tokens"
        )

    def _pooled_truth(self, latents: np.ndarray, held: HeldOut, source: StoreSource, key: HeldKey) -> dict[str, Any]:
        """Image- and track-level recovery (`pooled_truth`) from the same `latents` as `_ground_truth`; `key` names
        the held-out rows (`_held_out`'s key: their stores and token kinds)."""
        if key not in self._pooled:
            spec = source.dataset(self.options)
            model = self._models.get(source.entry.name) or describe_model(source.entry)
            self._pooled[key] = pooled_labels(
                held.keys.slice(0, self.cfg.ground_truth_tokens),
                source.layout,
                patch_tokens_per_sample(source.layout, source.manifest.token_selection),
                read_table(spec.uri, "patches", spec.storage),
                read_table(spec.uri, "objects", spec.storage),
                tuple(spec.generator.patch_grid),
                model.preprocess.crop_pct,
                source_frames(read_table(spec.uri, "samples", spec.storage), source.sampling),
                self.cfg.gt_min_coverage,
            )
        return pooled_columns(latents, self._pooled[key], self.cfg.detect_auroc)


def load_matrix(uri: str, options: StorageOptions) -> torch.Tensor:
    """A `[rows, width]` float matrix from a `.npy` file or a one-tensor `.safetensors` file (never unpickled)."""
    data = storage.read_bytes(uri, options)
    if uri.endswith(".npy"):
        matrix = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    elif uri.endswith(".safetensors"):
        tensors = load_safetensors(data)
        if len(tensors) != 1:
            raise InvalidRequest(f"{uri}: expected one tensor (the text embeddings), found {sorted(tensors)}")
        matrix = next(iter(tensors.values()))
    else:
        raise InvalidRequest(f"{uri}: text embeddings must be a .npy or .safetensors file")
    if matrix.dim() != 2:
        raise InvalidRequest(f"{uri}: text embeddings must be [classes, width]; got {list(matrix.shape)}")
    return matrix.float()


def evaluate_checkpoint(uri: str, cfg: EvalConfig) -> dict[str, Any]:
    """The metrics row of one checkpoint (a fresh `Evaluator`)."""
    return Evaluator(cfg).evaluate(uri)
