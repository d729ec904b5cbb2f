"""Every registry entry builds offline on the meta device and matches what it declares."""

import subprocess
import sys

import pytest

from prisma_ray.models import UnknownModel, describe_model, get_entry, list_entries, registry


def test_registry_size():
    entries = list_entries()
    assert len(entries) >= 90
    assert len(list_entries(modality="video")) >= 10
    assert {e.source for e in entries} >= {"timm", "open_clip", "hf"}


@pytest.mark.parametrize("name", sorted(registry()))
def test_entry_builds_on_meta_and_matches(name):
    entry = get_entry(name)
    model = describe_model(entry)
    assert (model.n_layers, model.d_model, model.n_heads) == (entry.layers, entry.width, entry.heads)
    spec, layout = model.preprocess, model.token_layout
    assert spec.modality == entry.modality
    assert spec.image_size[0] == entry.image_size
    assert entry.image_size // layout.grid[0] == entry.patch_size
    if entry.modality == "video":
        assert spec.num_frames == entry.frames
        assert layout.time * layout.tubelet == entry.frames
    with model.hooks([(hook, lambda t, h: None) for hook in model.hook_names]):
        pass


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModel, match="Closest names: .*dinov2"):
        get_entry("vit-small-dinov2")


def test_data_layer_registry_and_shard_decoding_load_without_torch():
    """Ray decode workers import the data layer and `decoding`; torch must stay out of them (seconds and
    about 500 MiB per process)."""
    code = (
        "import sys, prisma_ray.data, prisma_ray.data.shards, prisma_ray.models; prisma_ray.models.list_entries(); "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('prisma_ray'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
