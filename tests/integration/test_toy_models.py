"""The shipped toy models, loaded offline, reach their target accuracy on held-out encoded files."""

import numpy as np
import pytest
import torch

from prisma_ray.data import SyntheticSource, list_refs
from prisma_ray.data.shards import InputFormat, decode_shard, plan_shards
from prisma_ray.models import get_entry, load_model, toy
from prisma_ray.models.inputs import PixelInputs

HELD_OUT = {"prisma-toy-vit-shapes": 600, "prisma-toy-video-moving-shapes": 300}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_shipped_model_reaches_target_on_held_out_files(tmp_path, name):
    spec = toy.SPECS[get_entry(name).architecture]
    model = load_model(name, pretrained=True)
    source = SyntheticSource(uri=str(tmp_path / "held-out"), generator=spec.held_out(HELD_OUT[name]))
    fmt, inputs = InputFormat.create(source, model.preprocess), PixelInputs(model)
    predictions, labels = [], []
    with torch.no_grad():
        for refs in plan_shards(list_refs(source), source, 100):
            data = decode_shard(refs, source, fmt)
            assert not data.errors
            predictions.append(model(inputs.pixels(data.pixels)).argmax(-1).numpy())
            labels.append(data.labels)
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    assert len(labels) == HELD_OUT[name]
    assert np.bincount(labels).min() > 0
    accuracy = float((predictions == labels).mean())
    assert accuracy >= spec.target_accuracy, f"{name}: held-out accuracy {accuracy:.3f}"
