"""Registry entries, one module per source, and the helpers the catalogs share."""

from __future__ import annotations

from typing import Any

from ..registry import ModelEntry, Source

SHAPE = ("layers", "width", "heads", "image_size", "patch_size")


def catalog_entry(
    source: Source, name: str, architecture: str, pretrained: str, family: str, shape: tuple[int, ...], **fields: Any
) -> ModelEntry:
    """A `ModelEntry` whose shape fields are `shape`, in the order of `SHAPE`; `fields` are the others."""
    common = dict(source=source, name=name, architecture=architecture, pretrained=pretrained, family=family)
    return ModelEntry(**common, **dict(zip(SHAPE, shape, strict=True)), **fields)


def hf_name(hub: str) -> str:
    """The registry name of a hub model: `hf-` + its repository name in lower case, `_` as `-`, less a `-hf` suffix."""
    return "hf-" + hub.split("/")[-1].lower().replace("_", "-").removesuffix("-hf")


def all_entries() -> list[ModelEntry]:
    """Every entry of every source."""
    from . import hf_models, lmm_models, open_clip_models, timm_models, toy_models

    return [
        *toy_models.ENTRIES,
        *timm_models.ENTRIES,
        *open_clip_models.ENTRIES,
        *hf_models.ENTRIES,
        *lmm_models.ENTRIES,
    ]
