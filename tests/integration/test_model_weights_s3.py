"""`weights:` from s3:// (moto on loopback): loaded like a local file, recorded with the store by URI and SHA-256."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from safetensors.torch import save

from prisma_ray.models import load_model
from tests.tiny_models import TIMM
from tests.unit.test_evaluate_checkpoint import HOOKS, extract_in_process, shapes_config
from tests.unit.test_model_weights import TINY_VIT, assert_same_model, state, trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_weights_from_s3_load_and_are_recorded(s3, tmp_path):
    from prisma_ray.models import ModelEntry

    source = trained(TIMM["vit"])
    data = save(state(source))
    s3.client.put_object(Bucket=s3.bucket, Key="models/camera.safetensors", Body=io.BytesIO(data))
    uri = s3.uri("models/camera.safetensors")
    assert_same_model(source, load_model(TIMM["vit"], weights=uri, storage=s3.options))

    tiny = state(trained(ModelEntry(**TINY_VIT), seed=3))
    s3.client.put_object(Bucket=s3.bucket, Key="models/tiny.safetensors", Body=io.BytesIO(save(tiny)))
    tiny_uri = s3.uri("models/tiny.safetensors")
    extract_in_process(shapes_config(tmp_path, hooks=HOOKS[:1], weights=tiny_uri, storage=s3.options))
    recorded = json.loads((tmp_path / "acts" / "test-vit-tiny" / HOOKS[0] / "test" / "_config.json").read_text())
    assert recorded["weights"] == {"uri": tiny_uri, "sha256": hashlib.sha256(save(tiny)).hexdigest()}
