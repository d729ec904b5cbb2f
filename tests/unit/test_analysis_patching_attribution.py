"""Activation patching and direct attribution on the embedded toy ViT, where the answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prisma_ray.analysis import (
    activation_patching,
    class_readout,
    latent_attribution,
    logit_attribution,
    patch_positions,
    render,
)
from prisma_ray.analysis.attribution import components
from prisma_ray.data.synthetic import patch_factors
from prisma_ray.sae import Dictionary, DictionaryConfig, Sites
from prisma_ray.sae.dictionary import Site

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(toy_vit):
    inputs = render(toy_vit, 32, seed=0)
    with torch.inference_mode():
        pred = toy_vit(inputs.x).argmax(-1).numpy()
    right = [i for i in range(len(pred)) if pred[i] == inputs.labels[i]]
    pairs = [(i, j) for i, j in zip(right[0::2], right[1::2]) if inputs.labels[i] != inputs.labels[j]][:6]
    return inputs, pred, pairs


def _object_region(mask_a: np.ndarray, mask_b: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Patches holding an object of either image, grown by one patch (the conv stem sees 7 px, patches are 4 px)."""
    on = (patch_factors(mask_a, grid)[0] > 0) | (patch_factors(mask_b, grid)[0] > 0)
    padded = np.pad(on, 1)
    h, w = grid
    return np.any(
        [padded[1 + dy : 1 + h + dy, 1 + dx : 1 + w + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0
    ).ravel()


def test_patching_object_patches_moves_the_prediction_and_background_does_not(toy_vit, shapes):
    inputs, pred, pairs = shapes
    assert len(pairs) >= 4
    for i, j in pairs:
        region = _object_region(inputs.masks[i], inputs.masks[j], toy_vit.token_layout.grid)
        obj = [1 + p for p in np.nonzero(region)[0]]
        background = [1 + p for p in np.nonzero(~region)[0]]
        clean, corrupted = inputs.x[i : i + 1], inputs.x[j : j + 1]
        assert int(patch_positions(toy_vit, clean, corrupted, "blocks.0.hook_resid_pre", obj).argmax()) == pred[j]
        assert (
            int(patch_positions(toy_vit, clean, corrupted, "blocks.0.hook_resid_pre", background).argmax()) == pred[i]
        )


def test_effect_map_is_largest_on_the_object(toy_vit, shapes):
    inputs, pred, pairs = shapes
    i, j = pairs[0]
    result = activation_patching(toy_vit, inputs.x[i : i + 1], inputs.x[j : j + 1], "hook_resid_pre")
    assert result.effect.shape == (toy_vit.n_layers, toy_vit.token_layout.n_tokens)
    assert result.hooks == [f"blocks.{l}.hook_resid_pre" for l in range(toy_vit.n_layers)]
    assert (result.clean_class, result.corrupted_class) == (pred[i], pred[j])
    region = np.concatenate([[False], _object_region(inputs.masks[i], inputs.masks[j], toy_vit.token_layout.grid)])
    effect = result.effect[0].numpy()
    assert effect[region].max() > 0.2 > np.abs(effect[~region]).max()
    assert effect[region].sum() > 0.5


def test_denoising_a_single_hook_point_restores_exactly_when_every_position_is_patched(toy_vit, shapes):
    inputs, _, pairs = shapes
    i, j = pairs[1]
    result = activation_patching(
        toy_vit,
        inputs.x[i : i + 1],
        inputs.x[j : j + 1],
        "blocks.2.hook_resid_post",
        positions=[0, 5],
        mode="denoising",
    )
    assert result.effect.shape == (1, 2) and result.positions == [0, 5]
    everything = patch_positions(
        toy_vit,
        inputs.x[j : j + 1],
        inputs.x[i : i + 1],
        "blocks.2.hook_resid_post",
        list(range(toy_vit.token_layout.n_tokens)),
    )
    with torch.inference_mode():
        torch.testing.assert_close(everything, toy_vit(inputs.x[i : i + 1]))


def test_patching_refuses_bad_input(toy_vit, shapes):
    x = shapes[0].x
    with pytest.raises(Exception, match="hook_resid_nowhere"):
        activation_patching(toy_vit, x[:1], x[1:2], "hook_resid_nowhere")
    with pytest.raises(ValueError, match="positions \\[99\\]"):
        activation_patching(toy_vit, x[:1], x[1:2], positions=[99])
    with pytest.raises(ValueError, match="one clean and one corrupted"):
        activation_patching(toy_vit, x[:2], x[2:4])


def test_logit_attribution_sums_to_the_logit_with_frozen_norm_scales(toy_vit, shapes):
    x = shapes[0].x[:8]
    result = logit_attribution(toy_vit, x, class_readout(toy_vit))
    with torch.inference_mode():
        logits = toy_vit(x)
    assert result.components[0] == "embed" and result.components[-1] == "blocks.3.mlp"
    assert result.per_token.shape == (8, 1 + 2 * toy_vit.n_layers, toy_vit.token_layout.n_tokens)
    torch.testing.assert_close(result.target, logits.max(-1).values)
    torch.testing.assert_close(result.per_component().sum(-1) + result.bias, result.target, atol=1e-4, rtol=1e-5)
    # the toy_vit pools patch tokens: the CLS token contributes nothing directly
    assert torch.all(result.per_token[..., 0] == 0)


def test_logit_attribution_of_chosen_classes(toy_vit, shapes):
    x = shapes[0].x[:3]
    classes = torch.tensor([0, 3, 5])
    result = logit_attribution(toy_vit, x, class_readout(toy_vit), classes)
    with torch.inference_mode():
        torch.testing.assert_close(result.target, toy_vit(x)[torch.arange(3), classes])
    torch.testing.assert_close(result.per_component().sum(-1) + result.bias, result.target, atol=1e-4, rtol=1e-5)


def test_latent_attribution_sums_to_the_pre_activation(toy_vit, shapes):
    site = Site(name="blocks.1.hook_resid_mid", width=toy_vit.d_model)
    d = Dictionary(DictionaryConfig(architecture="relu", d_sae=32), Sites(inputs=(site,)))
    with torch.no_grad():
        d.b_enc.normal_()
        d.b_dec.normal_()
        d.set_normalization(torch.randn(64), torch.rand(64) + 0.5, torch.zeros(64), torch.ones(64))
    result = latent_attribution(toy_vit, shapes[0].x[:4], d, latent=7)
    assert result.components == ["embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn"]
    assert result.target.shape == result.bias.shape == (4, toy_vit.token_layout.n_tokens)
    torch.testing.assert_close(result.per_token.sum(1) + result.bias, result.target, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="latent 99 is out of range"):
        latent_attribution(toy_vit, shapes[0].x[:1], d, latent=99)


def test_attribution_needs_a_residual_stream_hook_point(toy_vit):
    assert [h for _, h in components(toy_vit, "blocks.1.hook_resid_pre")] == [
        "hook_embed",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_out",
    ]
    with pytest.raises(ValueError, match="blocks.1.hook_mlp_out"):
        components(toy_vit, "blocks.1.hook_mlp_out")


def test_patching_per_head_gives_a_layer_by_head_map_of_single_head_patches(toy_vit, shapes):
    """`heads=True` at `attn.hook_z`: entry (l, h) is the normalised logit difference of the clean run with head h
    of block l (at every position) taken from the corrupted run."""
    inputs, _, pairs = shapes
    i, j = pairs[0]
    clean, corrupted = inputs.x[i : i + 1], inputs.x[j : j + 1]
    result = activation_patching(toy_vit, clean, corrupted, "attn.hook_z", heads=True, batch_size=3)
    assert result.effect.shape == (toy_vit.n_layers, toy_vit.n_heads) and result.heads == [0, 1, 2, 3]
    layer, head = 1, 2
    name = f"blocks.{layer}.attn.hook_z"
    with torch.inference_mode():
        _, donor = toy_vit.run_with_cache(corrupted, [name])

        def put(t, hook):
            t = t.clone()
            t[:, :, head] = donor[name][:, :, head]
            return t

        with toy_vit.hooks([(name, put)]):
            logits = toy_vit(clean)[0]
    a, b = result.clean_class, result.corrupted_class
    expected = (float(logits[a] - logits[b]) - result.clean_ld) / (result.corrupted_ld - result.clean_ld)
    assert float(result.effect[layer, head]) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="per-head site"):
        activation_patching(toy_vit, clean, corrupted, "hook_resid_pre", heads=True)


def test_logit_attribution_per_head_splits_each_attention_output_exactly(toy_vit, shapes):
    """Per head: every block's attention term becomes its 4 heads' results and b_O; those sum to the block's
    attention term, and everything still sums to the logit."""
    x = shapes[0].x[:4]
    readout = class_readout(toy_vit)
    whole = logit_attribution(toy_vit, x, readout)
    split = logit_attribution(toy_vit, x, readout, heads=True)
    assert split.components[1:6] == [f"blocks.0.attn.head{h}" for h in range(4)] + ["blocks.0.attn.b_O"]
    assert len(split.components) == 1 + toy_vit.n_layers * (4 + 1 + 1)
    for layer in range(toy_vit.n_layers):
        parts = [i for i, c in enumerate(split.components) if c.startswith(f"blocks.{layer}.attn.")]
        block = whole.components.index(f"blocks.{layer}.attn")
        torch.testing.assert_close(split.per_token[:, parts].sum(1), whole.per_token[:, block], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split.per_token.sum((1, 2)) + split.bias, split.target, atol=1e-3, rtol=1e-4)


def test_attribution_per_head_refuses_a_layer_scaled_attention_branch():
    """OpenCLIP CLIPA scales its attention branch by 0.5 (LayerScale): the heads' results do not sum to it."""
    from prisma_ray.analysis.attribution import _terms
    from prisma_ray.models import load_model
    from tests.tiny_models import OPEN_CLIP, batch

    model = load_model(OPEN_CLIP["clipa"], pretrained=False, seed=0)
    with pytest.raises(ValueError, match="layer-scale"):
        _terms(model, batch(model), "blocks.1.hook_resid_post", heads=True)
    _terms(model, batch(model), "blocks.1.hook_resid_post", heads=False)
