"""Hugging Face adapter: every registry entry on the meta device, and tiny random-weight models of
every supported architecture on CPU (hook sites, bit-identical outputs, interventions, layouts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.videomae import modeling_videomae

from prisma_ray.models.adapters.hf_adapter import build
from prisma_ray.models.catalog.hf_models import ENTRIES
from prisma_ray.models.hooked import HookedVisionModel, InterventionNotSupported
from prisma_ray.models.registry import ModelEntry
from tests.hooked_checks import check_cache_shapes

transformers.logging.set_verbosity_error()

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
IMG = dict(image_size=32, patch_size=8)
NO_MLP = {k: v for k, v in TINY.items() if k != "intermediate_size"}
VJEPA2 = dict(
    **NO_MLP,
    patch_size=8,
    tubelet_size=2,
    crop_size=32,
    frames_per_clip=4,
    pred_hidden_size=16,
    pred_num_attention_heads=2,
    pred_num_hidden_layers=1,
    num_pooler_layers=1,
)


def tiny(architecture: str, family: str, config: dict, frames: int | None = None) -> ModelEntry:
    return ModelEntry(
        name=f"tiny-{architecture}",
        source="hf",
        architecture=architecture,
        family=family,
        modality="video" if frames else "image",
        layers=config["num_hidden_layers"],
        width=config["hidden_size"],
        heads=config["num_attention_heads"],
        image_size=32,
        patch_size=8,
        frames=frames,
        config=config,
    )


TINY_ENTRIES = [
    tiny("ViTForImageClassification", "vit", dict(**TINY, **IMG, num_labels=5)),
    tiny("ViTModel", "vit", dict(**TINY, **IMG)),
    tiny("DeiTForImageClassificationWithTeacher", "deit", dict(**TINY, **IMG, num_labels=5)),
    tiny("BeitForImageClassification", "beit", dict(**TINY, **IMG, num_labels=5, use_relative_position_bias=True)),
    tiny("Dinov2Model", "dinov2", dict(**NO_MLP, **IMG)),
    tiny("Dinov2WithRegistersModel", "dinov2", dict(**NO_MLP, **IMG, num_register_tokens=2, use_swiglu_ffn=True)),
    tiny("CLIPVisionModelWithProjection", "clip", dict(**TINY, **IMG, projection_dim=16)),
    tiny("SiglipVisionModel", "siglip", dict(**TINY, **IMG)),
    tiny("IJepaModel", "ijepa", dict(**TINY, **IMG)),
    tiny("VideoMAEForVideoClassification", "videomae", dict(**TINY, **IMG, num_frames=4, num_labels=5), 4),
    tiny("VideoMAEModel", "videomae", dict(**TINY, **IMG, num_frames=4, use_mean_pooling=False), 4),
    tiny("TimesformerForVideoClassification", "timesformer", dict(**TINY, **IMG, num_frames=4, num_labels=5), 4),
    tiny(
        "VivitForVideoClassification",
        "vivit",
        dict(**TINY, image_size=32, num_frames=4, tubelet_size=[2, 8, 8], num_labels=5),
        4,
    ),
    tiny("VJEPA2Model", "vjepa2", VJEPA2, 4),
    tiny("VJEPA2ForVideoClassification", "vjepa2", dict(VJEPA2, num_labels=5), 4),
]
WITHOUT_PATTERN = {"TimesformerForVideoClassification"}
SCALED = {"BeitForImageClassification"}  # hook_mlp_out divides a replacement by the layer-scale parameter


def _sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """`modeling_videomae.get_sinusoid_encoding_table`, vectorised (the original loops in Python)."""
    angles = np.arange(n_position)[:, None] / np.power(10000, 2 * (np.arange(d_hid) // 2) / d_hid)[None, :]
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.FloatTensor(angles).unsqueeze(0)


def test_vectorised_sinusoid_table_is_exact():
    assert torch.equal(_sinusoid_table(40, 24), modeling_videomae.get_sinusoid_encoding_table(40, 24))


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run far faster on one thread than with two threads contending on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_only(names):
    return [(n, lambda t, hook: None) for n in names]


def sample(model: HookedVisionModel, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, *model.preprocess.input_shape(), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=TINY_ENTRIES, ids=lambda e: e.architecture)
def tiny_model(request):
    torch.manual_seed(0)
    entry = request.param
    return entry, HookedVisionModel(build(entry, False), entry.name).eval()


def test_registry_has_hf_models():
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names)) >= 25
    assert sum(e.modality == "video" for e in ENTRIES) >= 12
    assert all(e.name.startswith("hf-") and e.source == "hf" and e.pretrained for e in ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_registry_entry_builds_on_meta(entry, monkeypatch):
    monkeypatch.setattr(modeling_videomae, "get_sinusoid_encoding_table", _sinusoid_table)
    with torch.device("meta"):
        model = HookedVisionModel(build(entry, False), entry.name)
    assert (model.n_layers, model.d_model, model.n_heads) == (entry.layers, entry.width, entry.heads)
    assert model.preprocess.modality == entry.modality and model.preprocess.image_size == (entry.image_size,) * 2
    assert model.token_layout.grid == (entry.image_size // entry.patch_size,) * 2
    modules = set(map(id, model.model.modules()))
    for layer in model._sites.layers:
        sites = [layer.block, layer.mlp_in, layer.mlp_out, layer.attn_out or layer.resid_mid]
        assert all(id(m) in modules for m in sites)
    with model.hooks(read_only(model.hook_names)):
        pass
    assert ("blocks.0.attn.hook_pattern" in model.hook_names) == (entry.family != "timesformer")


def test_unknown_class_and_family_raise_clear_errors():
    entry = TINY_ENTRIES[0]
    with pytest.raises(ValueError, match="Unsupported Hugging Face model class 'SwinModel'"):
        build(entry.model_copy(update={"architecture": "SwinModel"}), False)
    with pytest.raises(ValueError, match="No preprocessing known"):
        build(entry.model_copy(update={"family": "mystery"}), False)


@torch.no_grad()
def test_outputs_bit_identical_with_read_only_hooks(tiny_model):
    entry, model = tiny_model
    x = sample(model)
    raw = model.model(**{model.model.main_input_name: x})
    out = model(x)
    assert out.shape[0] == 2
    assert any(torch.equal(out, v) for v in raw.values() if isinstance(v, torch.Tensor))
    names = [n for n in model.hook_names if not n.endswith("hook_pattern")]
    with model.hooks(read_only(names)):
        assert torch.equal(model(x), out)
    assert torch.equal(model(x), out)


@torch.no_grad()
def test_cache_shapes_and_patterns(tiny_model):
    entry, model = tiny_model
    x = sample(model)
    _, cache = model.run_with_cache(x)
    check_cache_shapes(model, cache, 2)
    has_pattern = entry.architecture not in WITHOUT_PATTERN
    assert (f"blocks.{model.n_layers - 1}.attn.hook_pattern" in cache) == has_pattern
    if has_pattern:
        assert model.model.config._attn_implementation == "sdpa"  # restored after the run


@torch.no_grad()
def test_residual_decomposition(tiny_model):
    _, model = tiny_model
    _, cache = model.run_with_cache(sample(model))
    for layer in range(model.n_layers):
        c = {k.split(".", 2)[2]: v for k, v in cache.items() if k.startswith(f"blocks.{layer}.")}
        assert torch.allclose(c["hook_resid_pre"] + c["hook_attn_out"], c["hook_resid_mid"], atol=1e-5)
        assert torch.allclose(c["hook_resid_mid"] + c["hook_mlp_out"], c["hook_resid_post"], atol=1e-5)
        if layer:
            assert torch.equal(cache[f"blocks.{layer - 1}.hook_resid_post"], c["hook_resid_pre"])
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])


@torch.no_grad()
def test_final_is_the_backbone_token_sequence(tiny_model):
    _, model = tiny_model
    x = sample(model)
    _, cache = model.run_with_cache(x, ["hook_final"])
    backbone = model.model.base_model
    assert torch.equal(cache["hook_final"], backbone(**{backbone.main_input_name: x}).last_hidden_state)


@torch.no_grad()
def test_identity_interventions_change_nothing(tiny_model):
    entry, model = tiny_model
    x = sample(model)
    out = model(x)
    identity = lambda t, hook: t.clone()  # noqa: E731
    with model.hooks([("blocks.1.hook_resid_pre", identity)]):
        assert torch.equal(model(x), out)
    with model.hooks([("blocks.1.hook_mlp_out", identity)]):
        changed = model(x)
    assert torch.equal(changed, out) if entry.architecture not in SCALED else torch.allclose(changed, out, atol=1e-6)
    if entry.architecture in WITHOUT_PATTERN:
        with pytest.raises(InterventionNotSupported), model.hooks([("blocks.1.hook_resid_mid", identity)]):
            model(x)
    else:
        with model.hooks([("blocks.1.hook_resid_mid", identity)]):
            assert torch.allclose(model(x), out, atol=1e-6)


@torch.no_grad()
def test_zero_ablation_changes_output(tiny_model):
    _, model = tiny_model
    x = sample(model)
    out = model(x)
    with model.hooks([("blocks.0.hook_resid_post", lambda t, hook: torch.zeros_like(t))]):
        assert not torch.allclose(model(x), out)


@torch.no_grad()
def test_stop_early_caches_the_same_values(tiny_model):
    _, model = tiny_model
    x = sample(model)
    names = [n for n in model.hook_names if n.startswith("blocks.0.") and not n.endswith("hook_pattern")]
    output, early = model.run_with_cache(x, names, stop_early=True)
    _, full = model.run_with_cache(x, names)
    assert output is None
    assert all(torch.equal(early[n], full[n]) for n in names)


@torch.no_grad()
def test_token_layout_matches_the_input(tiny_model):
    """Perturbing one frame (video) or one patch (image) changes exactly the tokens the layout assigns to it."""
    _, model = tiny_model
    layout = model.token_layout
    x = sample(model)
    y = x.clone()
    positions = layout.patch_positions()
    if model.preprocess.modality == "video":
        frame = layout.tubelet  # first frame of the second temporal token group
        y[:, frame] += 1.0
        expected = positions[:, 0] == 1
    else:
        y[..., 8:16, 16:24] += 1.0  # patch row 1, column 2
        expected = (positions[:, 1] == 1) & (positions[:, 2] == 2)
    _, a = model.run_with_cache(x, ["hook_embed"])
    _, b = model.run_with_cache(y, ["hook_embed"])
    changed = (a["hook_embed"] - b["hook_embed"]).abs().amax(dim=(0, 2)) > 0
    assert not changed[: layout.n_prefix].any()
    assert torch.equal(changed[layout.n_prefix :], torch.as_tensor(expected))


def test_token_layouts():
    layouts = {e.architecture: HookedVisionModel(build(e, False), e.name).token_layout for e in TINY_ENTRIES}
    assert layouts["Dinov2WithRegistersModel"].kinds().tolist()[:4] == [0, 1, 1, 2]
    assert layouts["DeiTForImageClassificationWithTeacher"].n_prefix == 2
    assert layouts["SiglipVisionModel"].n_prefix == 0 and layouts["VideoMAEModel"].n_prefix == 0
    assert layouts["TimesformerForVideoClassification"].patch_order == "hwt"
    assert (layouts["VivitForVideoClassification"].time, layouts["VivitForVideoClassification"].tubelet) == (2, 2)


@pytest.mark.parametrize("entry", [e for e in TINY_ENTRIES if e.modality == "video"], ids=lambda e: e.architecture)
def test_wrong_frame_count_raises(entry):
    model = HookedVisionModel(build(entry, False), entry.name)
    with pytest.raises(ValueError, match="4 frames"):
        model(torch.zeros(1, 6, 3, 32, 32))
