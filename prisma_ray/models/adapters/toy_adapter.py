"""The embedded toy models (`source="prisma"`): weights shipped in the package, sites from the timm/HF adapters."""

from __future__ import annotations

from .. import toy, toy_training
from ..registry import ModelEntry
from ..sites import ModelSites
from . import hf_adapter, timm_adapter


def build(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Create the toy network of `entry` (shipped weights if `pretrained`, else random) and describe it."""
    spec = toy.SPECS[entry.architecture]
    model = toy_training.build_network(spec)
    if pretrained:
        toy_training.load_weights(model, toy.weights_path(spec.name))
    model.eval()
    if spec.modality == "image":
        return timm_adapter.sites_from_timm(model)
    return hf_adapter.sites_from_hf(model, entry)
