"""Every hooked model runs on CUDA with every hook point cached, proven without a GPU.

`FakeTensorMode` makes CUDA tensors that carry shapes, dtypes and devices but no data: ops run their shape
rules only, so no GPU is needed, and an op that mixes a CUDA tensor with a CPU one raises
`FakeTensorDeviceMismatchError` exactly where CUDA would raise. One small random-weight model per adapter (timm,
OpenCLIP, Hugging Face image and video, the toy models) is moved with `.to("cuda")` and run with every hook
point cached; the model's input path (`PixelInputs`: uint8 crops to normalised pixels on the device) runs too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from prisma_ray.models import load_model
from prisma_ray.models.inputs import PixelInputs
from tests.tiny_models import HF, OPEN_CLIP, TIMM, tiny

ENTRIES = {
    "toy-vit": "prisma-toy-vit-shapes",
    "toy-video": "prisma-toy-video-moving-shapes",
    "timm-vit": TIMM["vit"],
    "timm-eva02": TIMM["eva02"],
    "open_clip": OPEN_CLIP["native"],
    **{f"hf-{e.architecture}": e for e in HF if e.architecture in ("Dinov2Model", "VideoMAEModel", "VJEPA2Model")},
}


@pytest.mark.parametrize("entry", ENTRIES.values(), ids=ENTRIES.keys())
def test_every_hook_point_on_fake_cuda(entry):
    model = load_model(entry, pretrained=False) if isinstance(entry, str) else tiny(entry)
    *lead, c, h, w = model.preprocess.input_shape()  # the model's input is [..., 3, H, W]; crops are [..., H, W, 3]
    crops = np.zeros((2, *lead, h, w, c), dtype=np.uint8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        x = PixelInputs(model, device="cuda").pixels(crops)
        out, cache = model.run_with_cache(x, model.hook_names)
    assert x.device.type == "cuda" and out.device.type == "cuda"
    assert set(cache) == set(model.hook_names)
    wrong = {name: str(t.device) for name, t in cache.items() if t.device.type != "cuda"}
    assert not wrong, wrong
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert isinstance(torch.empty(0), torch.Tensor)  # the mode is gone: real tensors again
