"""Hugging Face adapter: every registry entry on the meta device, and what is particular to Hugging Face on tiny
random-weight models of every supported architecture on CPU (final tokens, attention restored, token layouts); the
contract every adapter keeps is in `test_hooked_contract.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.videomae import modeling_videomae

from prisma_ray.models.adapters.hf_adapter import build
from prisma_ray.models.catalog.hf_models import ENTRIES
from prisma_ray.models.loading import describe_model
from tests.tiny_models import HF, WITHOUT_PATTERN, batch, tiny

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """`modeling_videomae.get_sinusoid_encoding_table`, vectorised (the original loops in Python)."""
    angles = np.arange(n_position)[:, None] / np.power(10000, 2 * (np.arange(d_hid) // 2) / d_hid)[None, :]
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.FloatTensor(angles).unsqueeze(0)


def test_vectorised_sinusoid_table_is_exact():
    assert torch.equal(_sinusoid_table(40, 24), modeling_videomae.get_sinusoid_encoding_table(40, 24))


def read_only(names):
    return [(n, lambda t, hook: None) for n in names]


@pytest.fixture(scope="module", params=HF, ids=lambda e: e.architecture)
def tiny_model(request):
    return request.param, tiny(request.param)


def test_registry_has_hf_models():
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names)) >= 25
    assert sum(e.modality == "video" for e in ENTRIES) >= 12
    assert all(e.name.startswith("hf-") and e.source == "hf" and e.pretrained for e in ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_registry_entry_builds_on_meta(entry, monkeypatch):
    monkeypatch.setattr(modeling_videomae, "get_sinusoid_encoding_table", _sinusoid_table)
    model = describe_model(entry)
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
    entry = HF[0]
    with pytest.raises(ValueError, match="Unsupported Hugging Face model class 'SwinModel'"):
        build(entry.model_copy(update={"architecture": "SwinModel"}), False)
    with pytest.raises(ValueError, match="No preprocessing known"):
        build(entry.model_copy(update={"family": "mystery"}), False)


@torch.no_grad()
@pytest.mark.parametrize(
    "entry", [e for e in HF if e.architecture not in WITHOUT_PATTERN], ids=lambda e: e.architecture
)
def test_pattern_capture_restores_sdpa_attention(entry):
    model = tiny(entry)
    _, cache = model.run_with_cache(batch(model), [f"blocks.{model.n_layers - 1}.attn.hook_pattern"])
    assert model.model.config._attn_implementation == "sdpa"  # restored after the run


@torch.no_grad()
def test_final_is_the_backbone_token_sequence(tiny_model):
    _, model = tiny_model
    x = batch(model, seed=0)
    _, cache = model.run_with_cache(x, ["hook_final"])
    backbone = model.model.base_model
    assert torch.equal(cache["hook_final"], backbone(**{backbone.main_input_name: x}).last_hidden_state)


@torch.no_grad()
def test_token_layout_matches_the_input(tiny_model):
    """Perturbing one frame (video) or one patch (image) changes exactly the tokens the layout assigns to it."""
    _, model = tiny_model
    layout = model.token_layout
    x = batch(model, seed=0)
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
    layouts = {e.architecture: describe_model(e).token_layout for e in HF}
    assert layouts["Dinov2WithRegistersModel"].kinds().tolist()[:4] == [0, 1, 1, 2]
    assert layouts["DeiTForImageClassificationWithTeacher"].n_prefix == 2
    assert layouts["SiglipVisionModel"].n_prefix == 0 and layouts["VideoMAEModel"].n_prefix == 0
    assert layouts["TimesformerForVideoClassification"].patch_order == "hwt"
    assert (layouts["VivitForVideoClassification"].time, layouts["VivitForVideoClassification"].tubelet) == (2, 2)


@pytest.mark.parametrize("entry", [e for e in HF if e.modality == "video"], ids=lambda e: e.architecture)
def test_wrong_frame_count_raises(entry):
    model = describe_model(entry)
    with pytest.raises(ValueError, match="4 frames"):
        model(torch.zeros(1, 6, 3, 32, 32))
