"""Logit lens and attention rollout on the embedded toy ViT, where the answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prisma_ray.analysis import (
    NoReadout,
    attention_patterns,
    class_readout,
    lens_accuracy,
    logit_lens,
    query_rows,
    render,
    rollout,
)
from prisma_ray.data.synthetic import patch_factors
from prisma_ray.evaluate.splice import ZeroShotHead
from prisma_ray.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(toy_vit):
    return render(toy_vit, 48, seed=0)


def test_last_layer_lens_is_the_model_and_accuracy_rises_with_depth(toy_vit, shapes):
    with torch.inference_mode():
        logits = toy_vit(shapes.x)
    lens = logit_lens(toy_vit, shapes.x, class_readout(toy_vit))
    assert lens.tokens.shape == (48, toy_vit.n_layers + 1, toy_vit.token_layout.n_tokens, 6)
    assert torch.equal(lens.pooled[:, -1], logits)
    acc = lens_accuracy(lens.pooled, torch.from_numpy(shapes.labels)).numpy()
    assert acc[-1] >= 0.8 and acc[0] < 0.4  # the model: 0.802 held-out on its label (largest object's shape)
    assert np.all(np.diff(acc) >= -0.05), acc


def test_zero_shot_lens_for_an_embedding_tower_and_a_clear_error_without_text():
    tower = load_model("prisma-toy-vit-shapes")
    tower.model.reset_classifier(0)
    with pytest.raises(NoReadout, match="prisma-toy-vit-shapes has no classification head"):
        class_readout(tower)
    head = ZeroShotHead(torch.randn(5, tower.d_model), logit_scale=50.0)
    x = render(tower, 3).x
    lens = logit_lens(tower, x, class_readout(tower, head))
    with torch.inference_mode():
        expected = head(tower(x))
    assert lens.tokens.shape == (3, tower.n_layers + 1, tower.token_layout.n_tokens, 5)
    torch.testing.assert_close(lens.pooled[:, -1], expected)


def test_rollout_rows_are_distributions_and_cls_attends_to_the_object(toy_vit, shapes):
    patterns = attention_patterns(toy_vit, shapes.x)
    n = toy_vit.token_layout.n_tokens
    assert patterns.shape == (48, toy_vit.n_layers, toy_vit.n_heads, n, n)
    rolled = rollout(patterns)
    torch.testing.assert_close(rolled.sum(-1), torch.ones(48, toy_vit.n_layers, n))
    on_object = torch.from_numpy(
        np.stack([patch_factors(m, toy_vit.token_layout.grid)[0].ravel() > 0 for m in shapes.masks])
    )
    cls = query_rows(rolled[:, -1], toy_vit.token_layout)[:, 1:]
    share = (cls * on_object).sum(-1) / cls.sum(-1)
    chance = on_object.float().mean(-1)
    assert (share > chance).float().mean() >= 0.9
    assert share.mean() > 1.2 * chance.mean()


def test_rollout_of_identity_attention_is_identity():
    patterns = torch.eye(5).expand(2, 3, 4, 5, 5)
    torch.testing.assert_close(rollout(patterns), torch.eye(5).expand(2, 3, 5, 5))


def test_attention_on_an_unknown_layer_names_it(toy_vit, shapes):
    with pytest.raises(Exception, match="blocks.9.attn.hook_pattern"):
        attention_patterns(toy_vit, shapes.x[:1], layers=[9])


def test_wrong_image_size_is_refused_with_the_expected_shape(toy_vit):
    with pytest.raises(ValueError, match="32x32 pixels"):
        logit_lens(toy_vit, torch.zeros(1, 3, 64, 64), class_readout(toy_vit))
