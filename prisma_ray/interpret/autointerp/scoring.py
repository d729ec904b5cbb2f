"""Scorers of an explanation, each reported beside the same scorer on a random baseline explanation.

- detection: a judge told the explanation picks the activating images out of a mix of top images
  and negatives; balanced accuracy (0.5 is chance). Judges: `ChatJudge` (asks a served model yes/no
  per image) and `EmbeddingJudge` (image-text similarity of the best-matching patches, split at the
  median of the mix, so the threshold never sees which images are which);
- iou: the latent's activation mask (per-patch map >= `threshold` × its peak, upsampled) against the
  mask of the explained concept from a `Segmenter` (`GroundTruthSegmenter` on synthetic data);
- similarity: mean cosine similarity of the explanation to the highlighted regions of the top images
  (`embedders.region_embeddings`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..evidence import Explanation, LatentEvidence, Score, active_mask, upsample
from .chat import ChatClient, image_part
from .embedders import Embedder, UnknownConcept, named_labels, region_embeddings

JUDGE_PROMPT = "Does this image show {text}? Answer with yes or no only."


class Judge(Protocol):
    """Says, for each image, whether it shows what `text` describes."""

    def judge(self, text: str, images: np.ndarray) -> np.ndarray:
        """`bool[n]` for `uint8[n, H, W, 3]`."""


class Segmenter(Protocol):
    """Where the concept named by `text` is in each of the evidence's top images."""

    def segment(self, evidence: LatentEvidence, text: str) -> np.ndarray | None:
        """`bool[n, H, W]` over `evidence.images`; None where it cannot segment these images."""


class EmbeddingJudge:
    """Yes for the images whose similarity to the text is above the median of the images judged together.

    An image's similarity is that of its `top_patches` best-matching patch tokens (their mean) where the
    embedder embeds patches (`PrototypeEmbedder.embed_patches`): an image shows "red" when some region of
    it is red, however small, as the patch-level grounding probes of vision SAEs score a concept
    (saev, https://github.com/OSU-NLP-Group/saev). Otherwise it is the whole image's similarity.
    """

    def __init__(self, embedder: Embedder, top_patches: int = 4):
        self.embedder, self.top_patches = embedder, top_patches

    def judge(self, text: str, images: np.ndarray) -> np.ndarray:
        text_embedding = self.embedder.embed_texts([text])[0]
        patches = getattr(self.embedder, "embed_patches", lambda _: None)(images)
        if patches is None:
            sims = self.embedder.embed_images(images) @ text_embedding
        else:
            sims = np.sort(patches @ text_embedding, axis=1)[:, -self.top_patches :].mean(1)
        return sims > np.median(sims)


class ChatJudge:
    """One yes/no chat request per image (concurrently, bounded by the client)."""

    def __init__(self, client: ChatClient, prompt: str = JUDGE_PROMPT):
        self.client, self.prompt = client, prompt

    def judge(self, text: str, images: np.ndarray) -> np.ndarray:
        def ask(image: np.ndarray) -> bool:
            content = [{"type": "text", "text": self.prompt.format(text=text)}, image_part(image)]
            return self.client.complete([{"role": "user", "content": content}]).strip().lower().startswith("yes")

        return np.fromiter(self.client.map(ask, images), dtype=bool, count=len(images))


class GroundTruthSegmenter:
    """The evidence's ground-truth concept masks: the intersection of those of every concept label the text
    names ("red circle": red and circle); nothing where it names none; None for evidence without masks."""

    def segment(self, evidence: LatentEvidence, text: str) -> np.ndarray | None:
        if not evidence.concept_masks:
            return None
        size = evidence.images.shape[1:3]
        mask = np.zeros((len(evidence.images), *size), bool)
        labels = named_labels(text, list(evidence.concept_masks))
        if labels:
            mask[:] = True
            for label in labels:
                concept = evidence.concept_masks[label]
                mask &= concept if concept.shape[1:] == size else upsample(concept, size)
        return mask


def balanced_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean of the true positive and true negative rates."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    return float((predicted[truth].mean() + (~predicted[~truth]).mean()) / 2)


def agreement(detectors: Sequence[tuple[int, str]], texts: Mapping[int, str], vocabulary: Sequence[str]) -> float:
    """The fraction of `(latent, value)` pairs (a latent and the ground-truth factor value it detects, e.g.
    `(7, "red")`) whose latent's explanation in `texts` names that value (`named_labels` over `vocabulary`:
    "red star" names "red"); a latent without an explanation disagrees. NaN without pairs."""
    if not detectors:
        return float("nan")
    return float(np.mean([value in named_labels(texts.get(latent, ""), vocabulary) for latent, value in detectors]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@dataclass
class Scorers:
    """Which scores to compute; a missing part (or missing negatives) leaves its score out."""

    judge: Judge | None = None
    segmenter: Segmenter | None = None
    embedder: Embedder | None = None
    threshold: float = 0.2

    def detection(self, evidence: LatentEvidence, text: str) -> float:
        images = np.concatenate([evidence.images, evidence.negatives])
        truth = np.arange(len(images)) < len(evidence.images)
        return balanced_accuracy(self.judge.judge(text, images), truth)

    def iou(self, evidence: LatentEvidence, text: str) -> float:
        active = active_mask(evidence.maps, evidence.images.shape[1:3], self.threshold)
        concept = self.segmenter.segment(evidence, text)
        return iou(active, concept) if concept is not None else float("nan")

    def similarity(self, evidence: LatentEvidence, text: str) -> float:
        regions = region_embeddings(self.embedder, evidence, self.threshold)
        return float((regions @ self.embedder.embed_texts([text])[0]).mean())

    def score(self, evidence: LatentEvidence, explanation: Explanation, baseline: str | None) -> list[Score]:
        """Every available score of `explanation`, with the same score of the `baseline` text (NaN without one);
        none for a text-only latent (every score reads the top images)."""
        if evidence.text_only:
            return []
        names = []
        if self.judge is not None and evidence.negatives is not None and len(evidence.negatives):
            names.append("detection")
        if self.segmenter is not None:
            names.append("iou")
        if self.embedder is not None:
            names.append("similarity")
        scores = [
            Score(
                name=name,
                value=self._safe(name, evidence, explanation.text),
                baseline=self._safe(name, evidence, baseline),
            )
            for name in names
        ]
        return [s for s in scores if not (np.isnan(s.value) and np.isnan(s.baseline))]

    def _safe(self, name: str, evidence: LatentEvidence, text: str | None) -> float:
        """Score `name` of `text`; NaN without a text or for a text the embedder cannot embed."""
        if text is None:
            return float("nan")
        try:
            return getattr(self, name)(evidence, text)
        except UnknownConcept:
            return float("nan")


def random_baseline(text: str, pool: Sequence[str], rng: np.random.Generator) -> str | None:
    """A text drawn from `pool` (vocabulary labels or other latents' explanations) other than `text`; None if none."""
    others = sorted({p for p in pool if p.strip().lower() != text.strip().lower()})
    return others[int(rng.integers(len(others)))] if others else None
