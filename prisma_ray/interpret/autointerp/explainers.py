"""Explainers: from a latent's evidence to a short explanation of what it detects.

- `ChatExplainer`: a served multimodal model (OpenAI-compatible chat completions) looks at the
  latent's top images with the active patches highlighted and writes a short phrase.
- `VocabularyExplainer`: offline; the vocabulary label whose embedding is closest, on average, to
  the embeddings of the highlighted top images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from prisma_ray.errors import InvalidRequest

from ..evidence import Explanation, LatentEvidence, mask_images
from .chat import ChatClient, image_part
from .embedders import Embedder

EXPLAIN_PROMPT = (
    "These {n} images are the ones that most activate one feature of a vision model. In each image, the "
    "regions where the feature is active are shown bright and everything else is dimmed. What visual concept "
    "does the feature detect? Answer with a short noun phrase (at most {max_words} words) and nothing else."
)


class Explainer(Protocol):
    """Gives each latent a short text explanation."""

    name: str

    def explain(self, evidence: LatentEvidence) -> Explanation: ...


class VocabularyExplainer:
    """Picks the label of `vocabulary` with the highest mean image-text similarity to the highlighted top images."""

    def __init__(
        self,
        embedder: Embedder,
        vocabulary: Sequence[str],
        threshold: float = 0.2,
        dim: float = 0.25,
        name: str = "vocabulary",
    ):
        if not vocabulary:
            raise InvalidRequest("VocabularyExplainer: the vocabulary is empty; give at least one label")
        self.embedder, self.vocabulary, self.name = embedder, list(vocabulary), name
        self.threshold, self.dim = threshold, dim
        self.text_embeddings = embedder.embed_texts(self.vocabulary)

    def similarities(self, evidence: LatentEvidence) -> np.ndarray:
        """`float[len(vocabulary)]`: mean cosine similarity of each label to the highlighted top images."""
        shown = mask_images(evidence.images, evidence.maps, self.threshold, self.dim)
        return (self.embedder.embed_images(shown) @ self.text_embeddings.T).mean(0)

    def explain(self, evidence: LatentEvidence) -> Explanation:
        sims = self.similarities(evidence)
        order = np.argsort(-sims)
        raw = json.dumps({self.vocabulary[i]: round(float(sims[i]), 4) for i in order[:5]})
        return Explanation(latent=evidence.latent, text=self.vocabulary[order[0]], explainer=self.name, raw=raw)


class ChatExplainer:
    """Sends the highlighted top images (PNG data URLs) with an explanation prompt to a chat model."""

    def __init__(
        self,
        client: ChatClient,
        prompt: str = EXPLAIN_PROMPT,
        max_images: int = 8,
        max_words: int = 8,
        threshold: float = 0.2,
        dim: float = 0.25,
    ):
        self.client, self.prompt, self.max_images, self.max_words = client, prompt, max_images, max_words
        self.threshold, self.dim = threshold, dim
        self.name = f"chat:{client.config.model}"

    def messages(self, evidence: LatentEvidence) -> list[dict]:
        """The chat request's messages: the prompt, then one image part per shown top image."""
        order = np.argsort(-np.asarray(evidence.values))[: self.max_images]
        shown = mask_images(evidence.images[order], evidence.maps[order], self.threshold, self.dim)
        text = self.prompt.format(n=len(shown), max_words=self.max_words)
        return [{"role": "user", "content": [{"type": "text", "text": text}, *(image_part(im) for im in shown)]}]

    def explain(self, evidence: LatentEvidence) -> Explanation:
        raw = self.client.complete(self.messages(evidence))
        text = raw.strip().splitlines()[0].strip().strip("\"'`*.").strip() if raw.strip() else ""
        if not text:
            raise InvalidRequest(f"{self.client.config.base_url}: empty explanation for latent {evidence.latent}")
        return Explanation(latent=evidence.latent, text=text, explainer=self.name, raw=raw)
