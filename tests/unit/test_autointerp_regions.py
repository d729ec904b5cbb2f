"""Region-pooled image features and patch-level judging for the offline explainer and its detection score."""

import numpy as np
import pytest

from prisma_ray.errors import InvalidRequest
from prisma_ray.interpret.autointerp.embedders import HookedModelFeatures, PrototypeEmbedder
from prisma_ray.interpret.autointerp.scoring import EmbeddingJudge
from prisma_ray.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hooked_features_pool_over_a_region_and_run_each_image_once():
    model = load_model("prisma-toy-vit-shapes")  # 32 px, 4x4 patches of 8 px
    grid, side = model.token_layout.grid, 32 // model.token_layout.grid[0]
    features = HookedModelFeatures(model, "blocks.0.hook_resid_post")
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    tokens = features.tokens(images)
    assert tokens.shape[:2] == (2, grid[0] * grid[1])
    pixels = np.zeros((2, 32, 32), bool)
    pixels[:, :side, : 2 * side] = True  # patches (0, 0) and (0, 1)
    cells = np.zeros((2, *grid), bool)
    cells[:, 0, :2] = True
    expected = tokens[:, :2].mean(1)
    np.testing.assert_allclose(features(images, pixels), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features(images, cells), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features(images, np.zeros_like(cells)), tokens.mean(1), rtol=1e-5, atol=1e-6)
    features._run = lambda batch: pytest.fail("an image already seen ran the model again")
    features(images[::-1])


def test_remembered_tokens_are_used_instead_of_running_the_model():
    model = load_model("prisma-toy-vit-shapes")
    features = HookedModelFeatures(model, "blocks.0.hook_resid_post", cache_size=3)
    images = np.random.default_rng(1).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    computed = features.tokens(images[:2])
    known = np.random.default_rng(2).normal(size=(3, 64, model.d_model)).astype(np.float32)
    features.remember(images[1:], known)  # replaces image 1's tokens; image 0 is evicted (3 kept)
    ran = []
    real_run = features._run
    features._run = lambda batch: ran.append(len(batch)) or real_run(batch)
    np.testing.assert_array_equal(features.tokens(images[1:]), known)
    assert ran == [], "remembered images ran the model"
    np.testing.assert_allclose(features.tokens(images[:1]), computed[:1], rtol=1e-5, atol=1e-6)
    assert ran == [1], "the evicted image runs again"
    with pytest.raises(InvalidRequest, match="remember: tokens of shape \\(2, 64\\) for 3 images"):
        features.remember(images[:3], known[:2, :, 0])


class PixelTokens:
    """A stand-in for a model: every pixel is a token whose feature is its RGB."""

    def tokens(self, images):
        return images.reshape(len(images), -1, 3).astype(np.float64)

    def __call__(self, images, regions=None):
        return self.tokens(images).mean(1)


def test_embedding_judge_finds_a_small_region_that_a_whole_image_hides():
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    embedder = PrototypeEmbedder(
        PixelTokens(), {k: np.broadcast_to(np.array(c, np.uint8), (3, 4, 4, 3)).copy() for k, c in colours.items()}
    )
    blue = np.broadcast_to(np.array(colours["blue"], np.uint8), (4, 8, 8, 3)).copy()
    with_red = blue.copy()
    with_red[:, :2, :2] = colours["red"]  # 1/16 of each image
    yellow = np.broadcast_to(
        np.array((255, 255, 0), np.uint8), blue.shape
    ).copy()  # as a whole, closer to red than a mostly blue image
    images = np.concatenate([with_red, yellow])
    assert EmbeddingJudge(embedder).judge("red", images).tolist() == [True] * 4 + [False] * 4
