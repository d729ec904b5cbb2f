"""Registry entries, one module per source."""

from __future__ import annotations

from ..registry import ModelEntry


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
