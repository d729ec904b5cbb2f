"""The shipped toy models, loaded offline, reach their target accuracy on held-out encoded files."""

import numpy as np
import pytest
import torch

from prisma_ray.data import SyntheticSource, decode_refs, list_refs, split_errors
from prisma_ray.data.batches import RowFormat
from prisma_ray.models import get_entry, load_model, toy

HELD_OUT = {"prisma-toy-vit-shapes": 600, "prisma-toy-video-moving-shapes": 300}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_shipped_model_reaches_target_on_held_out_files(tmp_path, name):
    spec = toy.SPECS[get_entry(name).architecture]
    model = load_model(name, pretrained=True)
    source = SyntheticSource(uri=str(tmp_path / "held-out"), generator=spec.held_out(HELD_OUT[name]))
    fmt = RowFormat.create(source, model.preprocess)
    predictions, labels = [], []
    with torch.no_grad():
        for batch in decode_refs(list_refs(source), source, fmt, max_rows=100):
            good, errors = split_errors(batch)
            assert not errors
            predictions.append(model(torch.from_numpy(good["pixels"])).argmax(-1).numpy())
            labels.append(good["label"])
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    assert len(labels) == HELD_OUT[name]
    assert np.bincount(labels).min() > 0
    accuracy = float((predictions == labels).mean())
    assert accuracy >= spec.target_accuracy, f"{name}: held-out accuracy {accuracy:.3f}"
