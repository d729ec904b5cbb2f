"""HookedVisionModel over small timm configurations: what is particular to timm (replacements, patterns, token
layouts) and errors; the contract every adapter keeps is in `test_hooked_contract.py`."""

import pytest
import timm
import torch

from prisma_ray.models import HookedVisionModel, UnknownHookPoint
from prisma_ray.models.spec import TokenKind
from tests.tiny_models import TIMM, batch, tiny


def small_model(kind: str) -> HookedVisionModel:
    return tiny(TIMM[kind])


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
