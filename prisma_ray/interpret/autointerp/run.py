"""Explain and score many latents: config, the per-batch pipeline, and its Ray orchestration.

`explain_latents(evidence, cfg, output)` skips the latents already in `<output>/explanations.jsonl`,
sends batches of `batch_size` latents to the pool of Ray actors of `resources` (`runtime.pool`: each
builds the explainer and scorers once; a chat actor keeps `chat.concurrency` requests in flight), at
most `resources.in_flight_per_actor` batches per actor (default 2), and appends each finished batch to
`explanations.jsonl` atomically: a killed run loses only the batches in flight, and a rerun does only
the latents missing.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prisma_ray import storage
from prisma_ray.data.synthetic import ShapesConfig
from prisma_ray.errors import InvalidRequest
from prisma_ray.models.spec import WEIGHTS_HELP
from prisma_ray.runtime.devices import Device, placement_line
from prisma_ray.runtime.pool import PoolStats, Resources, cluster_resources, run_pool, size_pool
from prisma_ray.runtime.session import RayOptions, ensure_ray
from prisma_ray.storage import StorageOptions

from ..evidence import ExplanationRecord, LatentEvidence, append_explanations, read_explanations
from .chat import ChatClient, ChatConfig
from .embedders import (
    Embedder,
    HookedModelFeatures,
    OpenClipEmbedder,
    PrototypeEmbedder,
    factor_groups,
    synthetic_prototypes,
)
from .explainers import ChatExplainer, Explainer, VocabularyExplainer
from .object_features import ObjectDescriptors
from .scoring import ChatJudge, EmbeddingJudge, GroundTruthSegmenter, Scorers, random_baseline

log = logging.getLogger(__name__)

# 14 object descriptors against hundreds of prototypes: their covariance is well estimated, so it is whitened almost
# fully (held-out single objects of the toy's distribution: shape named right 0.82 at 0.001, 0.74 at 0.01, 0.60 at 10)
OBJECT_SHRINKAGE = 0.001


def _default_prototype_data() -> ShapesConfig:
    """The toy ViT's training distribution (one object per 32 px image) under a seed of its own."""
    return ShapesConfig(image_size=32, n_objects=(1, 1), size_range=(0.25, 0.4), seed=2000)


class EmbedderConfig(BaseModel):
    """The image-text embedder: an OpenCLIP model, or prototype images through a hooked model's features."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["prototype", "objects", "open_clip"] = Field(
        "prototype",
        description="prototype: mean features of rendered images per label at a model's hook; objects: mean colour "
        "and shape descriptors of the objects in rendered images per label (pixels, no model); open_clip: a CLIP model",
    )
    open_clip_model: str = Field("ViT-B-32", description="open_clip: OpenCLIP model name")
    open_clip_pretrained: str | None = Field("laion2b_s34b_b79k", description="open_clip: OpenCLIP pretrained tag")
    template: str = Field("a photo of {}.", description="open_clip: text each label is put into ({} = the label)")
    model: str = Field("prisma-toy-vit-shapes", description="prototype: registry model giving image features")
    pretrained: bool = Field(True, description="prototype: load the model's published weights")
    weights: str | None = Field(
        None, description="prototype: " + WEIGHTS_HELP + " (s3:// reached with the AWS_* environment)"
    )
    hook: str = Field(
        "blocks.3.hook_resid_post", description="prototype: features = this hook, mean over the patches of a region"
    )
    prototype_data: ShapesConfig = Field(
        default_factory=_default_prototype_data,
        description="prototype: the shapes images rendered per label (default: the toy ViT's training distribution)",
    )
    prototypes_per_label: int = Field(32, ge=1, description="prototype: images rendered per label")
    device: Device = Field(
        "cpu",
        description="where the embedder runs: cpu (the default: explanation actors take no GPU, leaving them to a "
        "served chat model), cuda (one GPU per explanation actor) or auto (cuda where there are GPUs)",
    )


def default_vocabulary() -> list[str]:
    base = ShapesConfig()
    return [*base.shapes, *base.colours]


class ExplainConfig(BaseModel):
    """`prisma-ray explain`: explain and score the latents of a top-activation output."""

    model_config = ConfigDict(extra="forbid")

    evidence: str | None = Field(
        None, description="required: the output dir of the top-activation pass (`prisma-ray interpret`)"
    )
    output: str | None = Field(None, description="where explanations.jsonl goes (default: the evidence dir)")
    explainer: Literal["vocabulary", "chat"] = Field(
        "vocabulary", description="vocabulary: the best-matching label (offline); chat: a served multimodal model"
    )
    chat: ChatConfig = Field(ChatConfig(), description="the served model (explainer or judge chat)")
    vocabulary: list[str] = Field(
        default_factory=default_vocabulary,
        description="labels of the vocabulary explainer and random baselines (default: synthetic shapes and colours)",
    )
    embedder: EmbedderConfig = Field(EmbedderConfig(), description="image-text embedder (vocabulary, embedding judge)")
    judge: Literal["embedding", "chat", "none"] = Field(
        "embedding", description="detection scoring: embedding similarity, a chat model, or none"
    )
    iou: bool = Field(True, description="IoU against ground-truth concept masks, where the evidence has them")
    similarity: bool = Field(True, description="score the explanation's similarity to the top images (embedder)")
    images_per_latent: int = Field(8, ge=1, description="top images shown to the explainer per latent")
    latents: list[int] | None = Field(None, description="explain only these (default: every latent that fired)")
    batch_size: int = Field(16, ge=1, description="latents per task")
    use_ray: bool = Field(True, description="explain on a Ray actor pool (false: in this process)")
    resources: Resources = Field(
        Resources(),
        description="the pipeline actors (on CPU; default 1, never more than batches; 2 batches each at a time)",
    )
    seed: int = Field(0, description="seed of the random baselines (mixed with each latent)")
    ray: RayOptions = Field(RayOptions(), description="which Ray cluster to connect to")
    storage: StorageOptions = Field(StorageOptions(), description="how to reach `evidence` and `output` on s3://")


def build_embedder(cfg: EmbedderConfig, vocabulary: list[str]) -> Embedder:
    """The embedder `cfg` describes, on `cfg.device` (`cuda` where torch sees no GPU raises `InvalidRequest`
    naming `embedder.device`)."""
    from prisma_ray.runtime.devices import local_device

    device = local_device(cfg.device, "embedder.device")
    if cfg.kind == "open_clip":
        return OpenClipEmbedder.from_name(cfg.open_clip_model, cfg.open_clip_pretrained, cfg.template, device)
    prototypes = synthetic_prototypes(vocabulary, cfg.prototype_data, cfg.prototypes_per_label)
    if cfg.kind == "objects":
        return PrototypeEmbedder(ObjectDescriptors(), *prototypes, shrinkage=OBJECT_SHRINKAGE)
    from prisma_ray.models import load_model

    features = HookedModelFeatures(
        load_model(cfg.model, pretrained=cfg.pretrained, weights=cfg.weights, device=device), cfg.hook
    )
    return PrototypeEmbedder(features, *prototypes)


class Pipeline:
    """Explains and scores one batch of latents (a plain class: Ray actors wrap it, tests call it)."""

    def __init__(self, cfg: ExplainConfig, torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        if cfg.explainer == "vocabulary" and not cfg.vocabulary:
            raise InvalidRequest("vocabulary: empty; give at least one label for the vocabulary explainer")
        needs_embedder = cfg.explainer == "vocabulary" or cfg.judge == "embedding" or cfg.similarity
        embedder = build_embedder(cfg.embedder, cfg.vocabulary) if needs_embedder else None
        self.client = ChatClient(cfg.chat) if "chat" in (cfg.explainer, cfg.judge) else None
        self.explainer: Explainer = (
            VocabularyExplainer(
                embedder,
                cfg.vocabulary,
                groups=factor_groups(cfg.vocabulary),
                reference=embedder.reference if isinstance(embedder, PrototypeEmbedder) else None,
            )
            if cfg.explainer == "vocabulary"
            else ChatExplainer(self.client)
        )
        judge = {
            "embedding": lambda: EmbeddingJudge(embedder),
            "chat": lambda: ChatJudge(self.client),
            "none": lambda: None,
        }[cfg.judge]()
        self.scorers = Scorers(
            judge=judge,
            segmenter=GroundTruthSegmenter() if cfg.iou else None,
            embedder=embedder if cfg.similarity else None,
        )
        self.cfg = cfg

    def run(self, batch: list[LatentEvidence]) -> list[ExplanationRecord]:
        """Explanation and scores of every latent of `batch`; baselines are drawn from the vocabulary (vocabulary
        explainer) or from the other explanations of the batch (chat explainer)."""
        if self.client is not None and self.cfg.explainer == "chat":
            explanations = list(self.client.map(self.explainer.explain, batch))
        else:
            explanations = [self.explainer.explain(e) for e in batch]
        pool = self.cfg.vocabulary if self.cfg.explainer == "vocabulary" else [x.text for x in explanations]
        records = []
        for evidence, explanation in zip(batch, explanations):
            baseline = random_baseline(explanation.text, pool, np.random.default_rng([self.cfg.seed, evidence.latent]))
            records.append(ExplanationRecord.of(explanation, self.scorers.score(evidence, explanation, baseline)))
        return records


class ExplainSummary(BaseModel):
    output: str
    explained: int
    already_done: int
    seconds: float
    mean_scores: dict[str, float]
    lost: PoolStats = Field(default_factory=PoolStats, description="what the actor pool lost and retried")

    def format(self) -> str:
        scores = ", ".join(f"{k}={v:.3f}" for k, v in sorted(self.mean_scores.items()))
        lost = f"; lost: {self.lost.format('batch')}" if self.lost.format() else ""
        return (
            f"{self.output}: {self.explained} latents explained ({self.already_done} already done) in "
            f"{self.seconds:.1f}s; mean scores: {scores or 'none'}{lost}"
        )


def _batched(items: Iterable[LatentEvidence], size: int) -> Iterator[list[LatentEvidence]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def explain_latents(
    evidence: Iterable[LatentEvidence], cfg: ExplainConfig, output: str, count: int | None = None
) -> ExplainSummary:
    """Explain and score every latent of `evidence` not yet in `<output>/explanations.jsonl` (see the module doc).

    `count`, the number of latents `evidence` holds at most (default: its length where it has one), caps the
    actors at one per batch."""
    if count is None and isinstance(evidence, Sized):
        count = len(evidence)
    start = time.perf_counter()
    done = read_explanations(output, cfg.storage)
    batches = _batched((e for e in evidence if e.latent not in done), cfg.batch_size)
    written: list[ExplanationRecord] = []

    def save(records: list[ExplanationRecord]) -> None:
        append_explanations(output, records, cfg.storage)
        written.extend(records)

    lost = PoolStats()
    if cfg.use_ray:
        _run_on_ray(batches, None if count is None else -(-count // cfg.batch_size), cfg, save, lost)
    else:
        pipeline = Pipeline(cfg)
        for batch in batches:
            save(pipeline.run(batch))
    values: dict[str, list[float]] = {}
    for record in written:
        for name, value in record.scores.items():
            if np.isfinite(value):
                values.setdefault(name, []).append(value)
    means = {name: float(np.mean(v)) for name, v in values.items()}
    return ExplainSummary(
        output=output,
        explained=len(written),
        already_done=len(done),
        seconds=time.perf_counter() - start,
        mean_scores=means,
        lost=lost,
    )


def _run_on_ray(
    batches: Iterator[list[LatentEvidence]], n_batches: int | None, cfg: ExplainConfig, save, lost: PoolStats
) -> None:
    """Batches onto the pipeline actors (`runtime.pool`); each result saved as it arrives. After a failure no new
    batch is sent, the batches in flight are still saved, then it re-raises (`lost` counts what the pool lost
    and retried)."""
    ensure_ray(cfg.ray)
    size = size_pool(
        cfg.resources,
        cluster_resources(),
        n_batches,
        device=cfg.embedder.device,
        device_field="embedder.device",
        in_flight=2,
        default_actors=1,
    )
    log.info(
        "explaining latents: %s", placement_line(size.actors, "explanation actor", size.device, size.torch_threads)
    )
    embedder = cfg.embedder.model_copy(update={"device": size.device})  # the device the pool was sized for
    kwargs = {"cfg": cfg.model_copy(update={"embedder": embedder}), "torch_threads": size.torch_threads}
    for records in run_pool(batches, Pipeline, kwargs, size, method="run", stats=lost):
        save(records)


def asked_for(latents: list[int], fired: list[int], n_latents: int, evidence: str) -> None:
    """Refuse `latents` (the config's) outside the dictionary's `n_latents`; name those that never fired in the
    evidence, which have nothing to explain."""
    outside = sorted({latent for latent in latents if not 0 <= latent < n_latents})
    if outside:
        raise InvalidRequest(
            f"latents: {outside} are not latents of {evidence}, whose dictionary has {n_latents} latents "
            f"(0-{n_latents - 1}); fix --set latents=[...]"
        )
    silent = sorted(set(latents) - set(fired))
    if silent:
        which = f"latent {silent[0]}" if len(silent) == 1 else f"latents {silent}"
        log.warning("%s never fired in %s: nothing to explain", which, evidence)


def run_explain(cfg: ExplainConfig) -> ExplainSummary:
    """`prisma-ray explain`: explain the latents of the top-activation output at `cfg.evidence`."""
    from ..glue import latent_evidence
    from ..results import read_results

    if not cfg.evidence:
        raise InvalidRequest("evidence: not set; give the output dir of the top-activation pass (--set evidence=URI)")
    storage.require_exists(cfg.evidence, cfg.storage)
    results = read_results(cfg.evidence, cfg.storage)
    output = cfg.output or cfg.evidence
    done = read_explanations(output, cfg.storage)
    fired = results.fired_latents()  # multimodal language models: text-only latents too (their evidence has no images)
    if cfg.latents is not None:
        asked_for(cfg.latents, fired, results.latents.num_rows, cfg.evidence)
    latents = [latent for latent in (cfg.latents if cfg.latents is not None else fired) if latent not in done]
    evidence = (latent_evidence(results, latent, n=cfg.images_per_latent) for latent in latents)
    return explain_latents((e for e in evidence if e is not None), cfg, output, count=len(latents))
