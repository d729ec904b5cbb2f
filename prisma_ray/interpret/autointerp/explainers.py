"""Explainers: from a latent's evidence to a short explanation of what it detects.

- `ChatExplainer`: a served multimodal model (OpenAI-compatible chat completions) looks at the
  latent's top images with the active patches highlighted (and, for a multimodal language model's
  latent, its top text contexts) and writes a short phrase.
- `VocabularyExplainer`: offline; the vocabulary labels (at most one per factor) whose calibrated
  similarity to the highlighted regions of the top images is highest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from prisma_ray.errors import InvalidRequest

from ..evidence import Explanation, LatentEvidence, mask_images
from .chat import ChatClient, image_part
from .embedders import Embedder, region_embeddings

EXPLAIN_PROMPT = (
    "These {n} images are the ones that most activate one feature of a vision model. In each image, the "
    "regions where the feature is active are shown bright and everything else is dimmed. What visual concept "
    "does the feature detect? Answer with a short noun phrase (at most {max_words} words) and nothing else."
)


TEXT_PROMPT = (
    "These {n} images are the ones that most activate one feature of a multimodal language model, read where the "
    "model saw each image while asked a question about it. In each image, the regions where the feature is active "
    "are shown bright and everything else is dimmed. The feature also fires on text: after the images come the {m} "
    "text contexts where it is most active, each from a prompt the model was asked about an image (written "
    "<image>), with the most active token marked [[like this]]. What concept does the feature detect, in the "
    "image regions and in the text? Answer with a short noun phrase (at most {max_words} words) and nothing else."
)
TEXT_ONLY_PROMPT = (
    "This feature of a multimodal language model fires on text tokens only: it never fired on the tokens of an "
    "image, so there are no image regions for it. Below are the {m} text contexts where it is most active, each "
    "from a prompt the model was asked about an image (written <image>), with the most active token marked "
    "[[like this]]. What concept does the feature detect in the text? Answer with a short noun phrase (at most "
    "{max_words} words) and nothing else."
)
NO_IMAGE_LABEL = "no label: fires on text tokens only (the vocabulary explainer reads image regions)"
IMAGES_HEADER = "Image regions (the feature's top {n} images, active regions bright):"
TEXTS_HEADER = "Text contexts (the feature's top {m} text tokens, marked [[like this]]):"


class Explainer(Protocol):
    """Gives each latent a short text explanation."""

    name: str

    def explain(self, evidence: LatentEvidence) -> Explanation: ...


class VocabularyExplainer:
    """Names a latent with the vocabulary labels that best match where it fires in its top images.

    1. Evidence by region: each top image is embedded over its highlighted patches only (the patches
       reaching `threshold` × the image's peak; `Embedder.embed_regions`), not as a whole image, so the
       other objects and the background in the image do not decide the label.
    2. Calibration: a label's raw score is its mean cosine similarity to those embeddings. Some labels
       are closer to everything than others (a hub; Radovanović et al., "Hubs in space", JMLR 2010), so
       with a `reference` set (`float32[m, d]`, embeddings of images showing every label equally, e.g.
       `PrototypeEmbedder.reference`) each label's score becomes a z-score against that label's
       similarities to the reference: `(s - mean) / std` (the per-class standardisation of Z-norm in
       speaker verification, Auckenthaler et al. 2000; CSLS of Lample et al. 2018 corrects hubs the same
       way). Without a reference the raw similarities are used.
    3. Factors: `groups` partitions the vocabulary by factor (`factor_groups`: shapes, colours). The
       explanation is the best label overall with the best label of each other group whose score
       reaches `combine` × the best score and `min_score`, later groups' labels first ("red star" for
       a latent that fires on red stars only; "red" for one that fires on red objects of every shape).
    """

    def __init__(
        self,
        embedder: Embedder,
        vocabulary: Sequence[str],
        threshold: float = 0.5,
        groups: Sequence[Sequence[str]] | None = None,
        reference: np.ndarray | None = None,
        combine: float = 0.5,
        min_score: float = 1.0,
        name: str = "vocabulary",
    ):
        if not vocabulary:
            raise InvalidRequest("VocabularyExplainer: the vocabulary is empty; give at least one label")
        self.embedder, self.vocabulary, self.name = embedder, list(vocabulary), name
        self.threshold, self.combine, self.min_score = threshold, combine, min_score
        groups = [list(g) for g in groups] if groups is not None else [[label] for label in self.vocabulary]
        stray = sorted({label for g in groups for label in g} ^ set(self.vocabulary))
        if stray or sum(map(len, groups)) != len(self.vocabulary):
            raise InvalidRequest(
                f"VocabularyExplainer: groups must hold every vocabulary label exactly once; {stray or 'repeats'}"
            )
        self.group_of = np.array([next(i for i, g in enumerate(groups) if label in g) for label in self.vocabulary])
        self.text_embeddings = embedder.embed_texts(self.vocabulary)
        if reference is None:
            self.mean, self.std = np.zeros(len(self.vocabulary)), np.ones(len(self.vocabulary))
        else:
            sims = np.asarray(reference) @ self.text_embeddings.T
            self.mean, self.std = sims.mean(0), np.maximum(sims.std(0), 1e-6)

    def similarities(self, evidence: LatentEvidence) -> np.ndarray:
        """`float[len(vocabulary)]`: mean cosine similarity of each label to the highlighted regions."""
        return region_embeddings(self.embedder, evidence, self.threshold).mean(0) @ self.text_embeddings.T

    def scores(self, evidence: LatentEvidence) -> np.ndarray:
        """`float[len(vocabulary)]`: the similarities calibrated against the reference (z-scores)."""
        return (self.similarities(evidence) - self.mean) / self.std

    def explain(self, evidence: LatentEvidence) -> Explanation:
        """The labels of the best-matching regions; a text-only latent (no top images) gets `NO_IMAGE_LABEL`, the
        vocabulary being matched to image regions only."""
        if evidence.text_only:
            return Explanation(latent=evidence.latent, text=NO_IMAGE_LABEL, explainer=self.name)
        scores = self.scores(evidence)
        best = int(np.argmax(scores))
        chosen = [best]
        for group in sorted(set(self.group_of.tolist()) - {int(self.group_of[best])}):
            members = np.flatnonzero(self.group_of == group)
            top = int(members[np.argmax(scores[members])])
            if scores[top] >= max(self.combine * scores[best], self.min_score):
                chosen.append(top)
        text = " ".join(self.vocabulary[i] for i in sorted(chosen, key=lambda i: -self.group_of[i]))
        order = np.argsort(-scores)
        raw = json.dumps({self.vocabulary[i]: round(float(scores[i]), 4) for i in order[:5]})
        return Explanation(latent=evidence.latent, text=text, explainer=self.name, raw=raw)


class ChatExplainer:
    """Sends the highlighted top images (PNG data URLs) with an explanation prompt to a chat model; for a
    multimodal language model's latent (evidence with `texts`) also its top text contexts, after the images,
    under `text_prompt`, each part headed by what it is; for a latent that fired on text tokens only, the text
    contexts alone under `text_only_prompt` (which says there are no image regions)."""

    def __init__(
        self,
        client: ChatClient,
        prompt: str = EXPLAIN_PROMPT,
        max_images: int = 8,
        max_words: int = 8,
        threshold: float = 0.2,
        dim: float = 0.25,
        text_prompt: str = TEXT_PROMPT,
        max_texts: int = 8,
        text_only_prompt: str = TEXT_ONLY_PROMPT,
    ):
        self.client, self.prompt, self.max_images, self.max_words = client, prompt, max_images, max_words
        self.threshold, self.dim = threshold, dim
        self.text_prompt, self.max_texts, self.text_only_prompt = text_prompt, max_texts, text_only_prompt
        self.name = f"chat:{client.config.model}"

    def messages(self, evidence: LatentEvidence) -> list[dict]:
        """The chat request's messages: the prompt, then one image part per shown top image; with text contexts,
        the images under `IMAGES_HEADER` and then the contexts, numbered, under `TEXTS_HEADER` (without top images:
        `text_only_prompt` and the contexts only)."""
        texts = evidence.texts[: self.max_texts]
        m = len(texts)
        contexts = "\n".join(f"{i}. {context}" for i, context in enumerate(texts, 1))
        texts_part = {"type": "text", "text": TEXTS_HEADER.format(m=m) + "\n" + contexts}
        if evidence.text_only:
            prompt = self.text_only_prompt.format(m=m, max_words=self.max_words)
            return [{"role": "user", "content": [{"type": "text", "text": prompt}, texts_part]}]
        order = np.argsort(-np.asarray(evidence.values))[: self.max_images]
        shown = mask_images(evidence.images[order], evidence.maps[order], self.threshold, self.dim)
        images = [image_part(im) for im in shown]
        if not texts:
            text = self.prompt.format(n=len(shown), max_words=self.max_words)
            return [{"role": "user", "content": [{"type": "text", "text": text}, *images]}]
        n = len(shown)
        content = [
            {"type": "text", "text": self.text_prompt.format(n=n, m=m, max_words=self.max_words)},
            {"type": "text", "text": IMAGES_HEADER.format(n=n)},
            *images,
            texts_part,
        ]
        return [{"role": "user", "content": content}]

    def explain(self, evidence: LatentEvidence) -> Explanation:
        raw = self.client.complete(self.messages(evidence))
        text = raw.strip().splitlines()[0].strip().strip("\"'`*.").strip() if raw.strip() else ""
        if not text:
            raise InvalidRequest(f"{self.client.config.base_url}: empty explanation for latent {evidence.latent}")
        return Explanation(latent=evidence.latent, text=text, explainer=self.name, raw=raw)
