"""HookedVisionModel over small timm configurations: caching, interventions, early stopping, errors."""

import pytest
import timm
import torch

from prisma_ray.models import HookedVisionModel, UnknownHookPoint
from prisma_ray.models.adapters.timm_adapter import sites_from_timm
from prisma_ray.models.spec import TokenKind
from tests.hooked_checks import (
    batch,
    check_cache_shapes,
    check_early_stop,
    check_identity_intervention,
    check_residual_decomposition,
    check_zero_ablation,
    read_only_names,
)

SMALL = {
    "vit": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3),
    "vit-reg": dict(
        model_name="vit_small_patch14_reg4_dinov2", img_size=28, patch_size=14, depth=2, embed_dim=48, num_heads=2
    ),
    "deit-distilled": dict(
        model_name="deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
    ),
    "eva02": dict(model_name="eva02_tiny_patch14_224", img_size=28, patch_size=14, depth=2, embed_dim=48, num_heads=3),
    "beit": dict(model_name="beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3),
    "siglip": dict(
        model_name="vit_base_patch16_siglip_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
    ),
}


def small_model(kind: str) -> HookedVisionModel:
    torch.manual_seed(0)
    kwargs = dict(SMALL[kind])
    model = timm.create_model(kwargs.pop("model_name"), pretrained=False, num_classes=10, **kwargs).eval()
    return HookedVisionModel(sites_from_timm(model), kind)


@pytest.fixture(params=sorted(SMALL))
def model(request) -> HookedVisionModel:
    return small_model(request.param)


@torch.no_grad()
def test_output_bit_identical_with_read_hooks(model):
    x = batch(model)
    reference = model.model(x)
    output, cache = model.run_with_cache(x, read_only_names(model))
    assert torch.equal(output, reference)
    assert torch.equal(model(x), reference)
    assert set(cache) == set(read_only_names(model))


@torch.no_grad()
def test_cache_shapes_follow_token_layout(model):
    x = batch(model, 3)
    _, cache = model.run_with_cache(x)
    check_cache_shapes(model, cache, 3)


@torch.no_grad()
def test_residual_decomposition(model):
    _, cache = model.run_with_cache(batch(model))
    check_residual_decomposition(model, cache)


@torch.no_grad()
@pytest.mark.parametrize(
    "site", ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_in", "hook_mlp_out"]
)
def test_identity_intervention_changes_nothing(site):
    model = small_model("beit")
    check_identity_intervention(model, batch(model), f"blocks.1.{site}")


@torch.no_grad()
def test_zero_ablation_of_residual_changes_output(model):
    check_zero_ablation(model, batch(model))


@torch.no_grad()
def test_resid_mid_replacement_reaches_the_stream():
    model = small_model("vit")
    x = batch(model)
    patched = torch.randn(2, model.token_layout.n_tokens, model.d_model)
    with model.hooks([("blocks.1.hook_resid_mid", lambda t, hook: patched)]):
        _, cache = model.run_with_cache(x, ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_in"])
    assert torch.allclose(cache["blocks.1.hook_resid_mid"], patched, atol=1e-6)
    norm2 = model.model.blocks[1].norm2
    assert torch.allclose(cache["blocks.1.hook_mlp_in"], norm2(patched), atol=1e-5)


@torch.no_grad()
def test_patching_from_another_run():
    model = small_model("vit")
    x_clean, x_corrupt = batch(model), batch(model) * -1
    _, clean = model.run_with_cache(x_clean, ["blocks.2.hook_resid_post"])
    with model.hooks([("blocks.2.hook_resid_post", lambda t, hook: clean[hook.name])]):
        patched = model(x_corrupt)
    assert torch.allclose(patched, model(x_clean), atol=1e-6)


@torch.no_grad()
def test_pattern_replacement_is_used():
    model = small_model("vit")
    x = batch(model)
    n = model.token_layout.n_tokens
    uniform = torch.full((2, model.n_heads, n, n), 1.0 / n)
    with model.hooks([("blocks.0.attn.hook_pattern", lambda t, hook: uniform)]):
        _, cache = model.run_with_cache(x, ["blocks.0.hook_attn_out"])
    attn = model.model.blocks[0].attn
    assert attn.fused_attn == timm.layers.use_fused_attn(), "fused attention restored"
    _, plain = model.run_with_cache(x, ["blocks.0.hook_attn_out"])
    assert not torch.allclose(cache["blocks.0.hook_attn_out"], plain["blocks.0.hook_attn_out"])


@torch.no_grad()
def test_early_stop_caches_same_values(model):
    x = batch(model)
    names = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_in", "hook_embed"]
    check_early_stop(model, x, names)


def test_token_layouts():
    assert small_model("vit").token_layout.prefix == (TokenKind.CLS,)
    assert small_model("vit-reg").token_layout.prefix == (TokenKind.CLS,) + (TokenKind.REGISTER,) * 4
    assert small_model("deit-distilled").token_layout.prefix == (TokenKind.CLS, TokenKind.DISTILLATION)
    assert small_model("siglip").token_layout.prefix == ()
    layout = small_model("vit").token_layout
    assert layout.grid == (4, 4) and layout.n_tokens == 17
    assert list(layout.kinds()[:2]) == [TokenKind.CLS, TokenKind.PATCH]


def test_unknown_hook_lists_valid_names():
    model = small_model("vit")
    with pytest.raises(UnknownHookPoint, match="blocks.1.hook_resid_post"):
        model.run_with_cache(batch(model), ["blocks.1.hook_resid_pots"])
    with pytest.raises(UnknownHookPoint, match="Valid hook points"):
        model.hook_point("blocks.9.hook_resid_post")


def test_wrong_input_size_says_what_is_expected():
    model = small_model("vit")
    with pytest.raises(ValueError, match=r"expects image input .*32x32"):
        model(torch.zeros(1, 3, 64, 64))


def test_replacement_of_wrong_shape_is_refused():
    model = small_model("vit")
    with model.hooks([("blocks.0.hook_resid_post", lambda t, hook: t[:, :1])]):
        with pytest.raises(ValueError, match="must keep the shape"):
            model(batch(model))
