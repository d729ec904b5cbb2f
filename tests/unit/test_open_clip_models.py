"""OpenCLIP image towers: every registry entry on the meta device, and what is particular to OpenCLIP on small
towers on the CPU (the contract every adapter keeps is in `test_hooked_contract.py`)."""

from types import SimpleNamespace

import open_clip
import pytest
import torch
from torch import nn

from prisma_ray.models import HookedVisionModel, InterventionNotSupported, describe_model
from prisma_ray.models.adapters import open_clip_adapter
from prisma_ray.models.catalog.open_clip_models import ENTRIES
from prisma_ray.models.spec import TokenKind
from tests.tiny_models import OPEN_CLIP, batch, read_only_names, tiny


def small_model(kind: str) -> HookedVisionModel:
    return tiny(OPEN_CLIP[kind])


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_entry_builds_on_meta_and_matches(entry):
    model = describe_model(entry)
    assert (model.n_layers, model.d_model, model.n_heads) == (entry.layers, entry.width, entry.heads)
    assert entry.name.startswith("openclip-") and entry.modality == "image"
    assert model.preprocess.image_size == (entry.image_size, entry.image_size)
    assert entry.image_size // model.token_layout.grid[0] == entry.patch_size
    assert "blocks.0.attn.hook_pattern" in model.hook_names
    assert model.token_layout.prefix == (() if entry.family.startswith("siglip") else (TokenKind.CLS,))
    with model.hooks([(hook, lambda t, h: None) for hook in model.hook_names]):
        pass


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_entry_tag_exists_and_matches_activation(entry):
    assert entry.pretrained in open_clip.list_pretrained_tags_by_model(entry.architecture)
    tag_quick_gelu = open_clip.get_pretrained_cfg(entry.architecture, entry.pretrained).get("quick_gelu", False)
    assert open_clip.get_model_config(entry.architecture).get("quick_gelu", False) == tag_quick_gelu


def test_catalog_covers_families():
    assert len(ENTRIES) >= 18
    assert {e.family for e in ENTRIES} >= {"clip", "siglip", "eva02-clip"}
    assert len({e.name for e in ENTRIES}) == len(ENTRIES)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["native", "custom"])
def test_native_pattern_reproduces_attention_output(kind):
    """`pattern @ v` through the output projection is what the attention module returns."""
    model = small_model(kind)
    attn = model.model.transformer.resblocks[1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    _, cache = model.run_with_cache(batch(model), ["blocks.1.attn.hook_pattern"])
    handle.remove()
    pattern, x = cache["blocks.1.attn.hook_pattern"], seen["x"]
    n, length, width = x.shape
    v = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)[2]
    heads = (pattern @ v.reshape(n, length, model.n_heads, -1).transpose(1, 2)).transpose(1, 2)
    expected = attn.out_proj(heads.reshape(n, length, width))
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert torch.allclose(out, expected, atol=1e-5)


@torch.no_grad()
def test_native_pattern_is_read_only_and_restored():
    model = small_model("native")
    x = batch(model)
    reference = model(x)
    with model.hooks([("blocks.0.attn.hook_pattern", lambda t, hook: t * 0)]):
        with pytest.raises(InterventionNotSupported, match="hook_resid_pre"):
            model(x)
    with model.hooks([("blocks.0.attn.hook_pattern", lambda t, hook: None)]):
        assert torch.allclose(model(x), reference, atol=1e-6)
    assert not model.model.transformer.resblocks[0].attn._forward_pre_hooks
    assert torch.equal(model(x), reference)


@torch.no_grad()
def test_final_is_normalised_tokens_or_last_block():
    """`hook_final` is `ln_post` of every token, or the last block where `ln_post` acts after pooling."""
    for kind in ("native", "clipa", "coca"):
        model = small_model(kind)
        last = f"blocks.{model.n_layers - 1}.hook_resid_post"
        _, cache = model.run_with_cache(batch(model), [last, "hook_final"])
        expected = model.model.ln_post(cache[last]) if kind == "native" else cache[last]
        assert torch.equal(cache["hook_final"], expected)


@torch.no_grad()
def test_forward_is_the_image_embedding():
    coca = small_model("coca")
    x = batch(coca)
    assert isinstance(coca.model(x), tuple)
    assert torch.equal(coca(x), coca.model(x)[0])
    for kind, dim in (("native", 32), ("siglip-timm", 64)):
        model = small_model(kind)
        assert model(batch(model)).shape == (2, dim)


def test_token_layouts_and_preprocess():
    native, siglip = small_model("native"), small_model("siglip-timm")
    assert native.token_layout.prefix == (TokenKind.CLS,) and native.token_layout.grid == (4, 4)
    assert native.preprocess.mean == (0.48145466, 0.4578275, 0.40821073)
    assert native.preprocess.std == (0.26862954, 0.26130258, 0.27577711)
    assert siglip.preprocess.mean == (0.5, 0.5, 0.5) and siglip.preprocess.image_size == (160, 160)
    assert siglip.token_layout.grid == (10, 10)
    clipa = small_model("clipa").preprocess
    assert clipa.mean == (0.485, 0.456, 0.406) and clipa.interpolation == "bilinear"


@torch.no_grad()
def test_eva02_timm_tower():
    """EVA02 CLIP (timm `Eva` trunk, token pooling, linear projection): unchanged output, shapes, layout."""
    model = small_model("eva02-timm")
    assert (model.n_layers, model.d_model, model.n_heads) == (12, 192, 3)
    x = batch(model, 1)
    reference = model.model(x)
    output, cache = model.run_with_cache(x, read_only_names(model))
    assert torch.equal(output, reference) and output.shape == (1, 32)
    n_tokens = model.token_layout.n_tokens
    assert model.token_layout.prefix == (TokenKind.CLS,) and n_tokens == 257
    assert all(value.shape == (1, *model.hook_shape(name)[1:]) for name, value in cache.items())
    assert cache["blocks.0.hook_resid_post"].shape == (1, n_tokens, 192)
    pre, mid = cache["blocks.3.hook_resid_pre"], cache["blocks.3.hook_resid_mid"]
    assert torch.equal(pre + cache["blocks.3.hook_attn_out"], mid)
    _, patterns = model.run_with_cache(x, ["blocks.11.attn.hook_pattern"])
    assert patterns["blocks.11.attn.hook_pattern"].shape == (1, 3, n_tokens, n_tokens)
    assert model.preprocess.mean == (0.48145466, 0.4578275, 0.40821073)


def test_pretrained_build_takes_visual_of_create_model(monkeypatch):
    """`pretrained=True` loads through `open_clip.create_model` (stubbed: tests never download)."""
    entry = OPEN_CLIP["native"]
    visual = open_clip_adapter.build(entry, pretrained=False).model
    visual.preprocess_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
    calls = []

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        return SimpleNamespace(visual=visual)

    monkeypatch.setattr(open_clip, "create_model", create_model)
    sites = open_clip_adapter.build(entry, pretrained=True)
    name, kwargs = calls[0]
    assert name == entry.architecture and kwargs["pretrained"] == entry.pretrained and kwargs["require_pretrained"]
    assert kwargs["embed_dim"] == 32 and kwargs["vision_cfg"]["layers"] == 2
    assert sites.model is visual and sites.preprocess.interpolation == "bilinear"
