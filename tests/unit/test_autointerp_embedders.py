"""The OpenCLIP embedder's towers (random weights, offline: shapes only)."""

import numpy as np
import pytest

from prisma_ray.interpret.autointerp.embedders import OpenClipEmbedder
from prisma_ray.interpret.autointerp.explainers import VocabularyExplainer
from prisma_ray.interpret.evidence import LatentEvidence

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_open_clip_embedder_embeds_images_and_texts_into_one_unit_space():
    embedder = OpenClipEmbedder.from_name("ViT-B-32", pretrained=None)
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    image_emb, text_emb = embedder.embed_images(images), embedder.embed_texts(["red", "circle", "dog"])
    assert image_emb.shape == (2, 512) and text_emb.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([image_emb, text_emb]), axis=1), 1.0, rtol=1e-5)
    evidence = LatentEvidence("c", 0, images, np.ones((2, 2, 2)), np.ones(2))
    assert VocabularyExplainer(embedder, ["red", "circle", "dog"]).explain(evidence).text in {"red", "circle", "dog"}
