"""From top-activation results to auto-interpretation: the `LatentEvidence` of a latent.

Video clips are shown to explainers as one frame each: the first frame of the time step where the
latent's map peaks, with that time step's patch map.
"""

from __future__ import annotations

import numpy as np

from .evidence import LatentEvidence
from .heatmaps import patch_grid
from .results import Results


def _frame(crop: np.ndarray, grid: np.ndarray, tubelet: int) -> tuple[np.ndarray, np.ndarray]:
    """`(image [H, W, 3], map [h, w])` of a crop: the image itself, or a clip's frame at the map's peak time step."""
    if crop.ndim == 3:
        return crop, grid[0]
    step = int(np.unravel_index(grid.argmax(), grid.shape)[0])
    return crop[min(step * tubelet, len(crop) - 1)], grid[step]


def latent_evidence(results: Results, latent: int, ranking: str = "max", n: int | None = None) -> LatentEvidence | None:
    """The evidence of `latent` (its top `n` samples under `ranking`, its negatives and, for multimodal language
    models, its top `n` text contexts); None if it fired on neither an image nor a text token. A latent that
    fired on text tokens only has no images (`uint8[0, 0, 0, 3]`, maps `float32[0, h, w]`)."""
    rows = results.top_rows(latent, ranking)[:n]
    texts = tuple(r["context"] for r in results.text_rows(latent)[:n])
    if not rows and not texts:
        return None
    layout = results.layout
    shown = [_frame(results.image(r["sample_id"]), patch_grid(r["map"], layout), layout.tubelet) for r in rows]
    negative_ids, _ = results.values(latent, "negative")
    negatives = [_frame(results.image(s), np.zeros((layout.time, *layout.grid)), 1)[0] for s in negative_ids]
    return LatentEvidence(
        checkpoint=results.summary["checkpoint"],
        latent=latent,
        images=np.stack([image for image, _ in shown]) if shown else np.zeros((0, 0, 0, 3), np.uint8),
        maps=np.stack([grid for _, grid in shown]).astype(np.float32)
        if shown
        else np.zeros((0, *layout.grid), np.float32),
        values=np.array([r["score"] for r in rows], np.float32),
        negatives=np.stack(negatives) if negatives else None,
        texts=texts,
    )
