"""`load_model`: registry name -> `HookedVisionModel`, for every source."""
from __future__ import annotations

import importlib

import torch

from .hooked import HookedVisionModel
from .registry import ModelEntry, get_entry
from .sites import ModelSites

_ADAPTERS = {
    "timm": "prisma_ray.models.adapters.timm_adapter",
    "open_clip": "prisma_ray.models.adapters.open_clip_adapter",
    "hf": "prisma_ray.models.adapters.hf_adapter",
    "hf-lmm": "prisma_ray.models.adapters.lmm_adapter",
    "prisma": "prisma_ray.models.adapters.toy_adapter",
}


def build_sites(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Build the source model of `entry` (random weights unless `pretrained`) and describe it.

    Called under `torch.device("meta")` it allocates no memory, which is how every registry
    entry is checked.
    """
    adapter = importlib.import_module(_ADAPTERS[entry.source])
    return adapter.build(entry, pretrained)


def load_model(
    name: str,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> HookedVisionModel:
    """Load registry model `name` as a `HookedVisionModel` in eval mode.

    `pretrained=False` builds the same architecture with random weights and needs no download.
    """
    entry = get_entry(name)
    model = HookedVisionModel(build_sites(entry, pretrained), entry.name).eval()
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
