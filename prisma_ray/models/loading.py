"""`load_model`: registry name or inline entry -> `HookedVisionModel`, for every source."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from prisma_ray.errors import InvalidRequest

from .hooked import HookedVisionModel
from .registry import ModelEntry, get_entry
from .sites import ModelSites
from .spec import ModelDType

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_ADAPTERS = {
    "timm": "prisma_ray.models.adapters.timm_adapter",
    "open_clip": "prisma_ray.models.adapters.open_clip_adapter",
    "hf": "prisma_ray.models.adapters.hf_adapter",
    "hf-lmm": "prisma_ray.models.adapters.lmm_adapter",
    "prisma": "prisma_ray.models.adapters.toy_adapter",
}


def build_sites(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Build the source model of `entry` (random weights unless `pretrained`) and describe it.

    Called under `torch.device("meta")` (`load_model(..., device="meta")`) it allocates no memory, which
    is how every registry entry is checked.
    """
    adapter = importlib.import_module(_ADAPTERS[entry.source])
    return adapter.build(entry, pretrained)


def resolve_entry(model: str | ModelEntry) -> ModelEntry:
    """The registry entry named `model` (an unknown name raises `UnknownModel`), or the inline entry."""
    return model if isinstance(model, ModelEntry) else get_entry(model)


def load_model(
    model: str | ModelEntry,
    pretrained: bool = True,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> HookedVisionModel:
    """Load `model` (a registry name or an inline `ModelEntry`) as a `HookedVisionModel` in eval mode.

    `pretrained=False` builds the same architecture with random weights that depend on `seed` only (the
    global random state is left as it was) and needs no download. The model is built on the CPU, then
    moved to `device` and cast to `dtype` (floating-point parameters and buffers) when given; on
    `device="meta"` it is built without allocating memory (see `describe_model`). An unknown name raises
    `UnknownModel`.
    """
    entry = resolve_entry(model)
    meta = device is not None and torch.device(device).type == "meta"
    with torch.random.fork_rng(devices=[]), torch.device("meta") if meta else nullcontext():
        torch.manual_seed(seed)
        hooked = HookedVisionModel(build_sites(entry, pretrained), entry.name).eval()
    if dtype is not None or (device is not None and not meta):
        hooked = hooked.to(device=device, dtype=dtype)
    return hooked


def describe_model(model: str | ModelEntry) -> HookedVisionModel:
    """`model`'s hooked model on the `meta` device: hook names, layout and input spec, no weights."""
    return load_model(model, pretrained=False, device="meta")


def actor_model(
    entry: ModelEntry,
    pretrained: bool,
    seed: int,
    device: torch.device,
    torch_threads: int | None,
    model_dtype: ModelDType = "float32",
) -> HookedVisionModel:
    """`load_model` in a model actor, at `model_dtype`: on CPU it first takes `torch_threads` threads (when given)."""
    if device.type == "cpu" and torch_threads:
        torch.set_num_threads(torch_threads)
    return load_model(entry, pretrained, seed=seed, device=device, dtype=TORCH_DTYPES[model_dtype])


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
