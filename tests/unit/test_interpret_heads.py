"""Interpretation of a dictionary over a per-head hook point (an attention-output SAE on `attn.hook_z`)."""

import numpy as np
import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
from prisma_ray.models import ModelEntry, load_model
from prisma_ray.models.inputs import PixelInputs
from prisma_ray.sae import Sites
from prisma_ray.sae.dictionary import Site
from tests.tiny_models import tiny_vit
from tests.unit.test_evaluate_checkpoint import identity, save

ENTRY = ModelEntry(**tiny_vit())  # 2 blocks of width 32, 2 heads of 16
HOOK = "blocks.1.attn.hook_z"


def test_latents_read_the_heads_flattened_into_the_width(tmp_path):
    """An identity dictionary over `hook_z`'s 2 x 16 = 32 flattened values: its latents are relu(±z), head-major."""
    ckpt = save(identity(Sites(inputs=(Site(name=HOOK, width=32, model=ENTRY.name),))), tmp_path / "sae")
    dataset = dict(type="synthetic", uri=str(tmp_path / "shapes"), generator=dict(name="shapes", n_images=4))
    plan = plan_interpret(
        InterpretConfig(checkpoint=ckpt, model=ENTRY, pretrained=False, dataset=dataset, output=str(tmp_path / "i"))
    )
    worker = LatentWorker(plan.job())
    pixels = np.zeros((2, 32, 32, 3), np.uint8) + np.arange(32, dtype=np.uint8)[:, None, None]
    latents = worker.latents(pixels, np.array(["a", "b"]))
    model = load_model(ENTRY, pretrained=False, seed=0)
    with torch.inference_mode():
        _, cache = model.run_with_cache(PixelInputs(model).pixels(pixels), [HOOK])
    z = cache[HOOK].flatten(2).numpy()
    np.testing.assert_allclose(latents, np.concatenate([np.maximum(z, 0), np.maximum(-z, 0)], -1), atol=1e-5)

    wrong = save(identity(Sites(inputs=(Site(name=HOOK, width=16, model=ENTRY.name),))), tmp_path / "sae16")
    with pytest.raises(InvalidRequest, match="32 wide"):
        plan_interpret(
            InterpretConfig(checkpoint=wrong, model=ENTRY, pretrained=False, dataset=dataset, output=str(tmp_path))
        )
