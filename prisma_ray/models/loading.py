"""`load_model`: registry name -> `HookedVisionModel`, for every source."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

from prisma_ray.errors import InvalidRequest

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


def resolve_entry(model: str | ModelEntry) -> ModelEntry:
    """The registry entry named `model` (an unknown name raises `UnknownModel`), or the inline entry."""
    return model if isinstance(model, ModelEntry) else get_entry(model)


def build_model(
    entry: ModelEntry, pretrained: bool, seed: int, device: str | torch.device = "cpu"
) -> HookedVisionModel:
    """The entry's hooked model in eval mode; with `pretrained=False` its random weights depend on `seed` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HookedVisionModel(build_sites(entry, pretrained), entry.name).eval()
    model.model.to(device)  # HookedVisionModel.to() is shadowed by its own `_apply` helper
    return model


def actor_model(
    entry: ModelEntry, pretrained: bool, seed: int, device: torch.device, torch_threads: int | None
) -> HookedVisionModel:
    """`build_model` in a model actor: on CPU it first takes `torch_threads` threads (when given)."""
    if device.type == "cpu" and torch_threads:
        torch.set_num_threads(torch_threads)
    return build_model(entry, pretrained, seed, device)


def describe_model(entry: ModelEntry) -> HookedVisionModel:
    """The entry's hooked model on the `meta` device: hook names, layout and input spec, no weights."""
    with torch.device("meta"):
        return HookedVisionModel(build_sites(entry, False), entry.name)


def check_hooks(model: HookedVisionModel, hooks: Sequence[str]) -> None:
    """Raise unless every hook point exists and holds one activation vector per token of the sequence."""
    multimodal = model.preprocess.modality == "multimodal"
    for name in hooks:
        point = model.hook_point(name)
        if point.site == "attn.hook_pattern":
            raise InvalidRequest(
                f"{name} holds attention probabilities [batch, heads, tokens, tokens], not one vector per token; "
                "extract a residual, attention-output or MLP hook point instead."
            )
        if multimodal and not point.lm:
            raise InvalidRequest(
                f"{name} is on {model.name}'s vision tower, whose tokens are image crops or packed patches, not the "
                "sequence's tokens; extract lm.* hook points (the language model) from a multimodal model."
            )
