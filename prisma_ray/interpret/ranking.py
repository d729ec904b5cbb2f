"""What the top-k accumulators share (pure numpy): the order of the best entries, and the range check of the
latent activations they keep."""

from __future__ import annotations

import numpy as np

from prisma_ray.errors import InvalidRequest

MAP_MAX = float(np.finfo(np.float16).max)  # the maps are kept as float16: larger magnitudes would become inf


def best_order(
    scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray, new_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best `k = scores.shape[1]` of kept entries (`scores`, `ids`: `[L, k]`) and candidates (`[L, n]`) per
    latent, by score descending then sample id ascending: `(order [L, k], all_scores [L, k + n], all_ids)`, where
    `order` indexes the kept entries then the candidates (`< k`: a kept entry)."""
    all_scores = np.concatenate([scores, new_scores], axis=1)
    all_ids = np.concatenate([ids, np.asarray(new_ids).astype(str)], axis=1)
    return np.lexsort((all_ids, -all_scores), axis=-1)[:, : scores.shape[1]], all_scores, all_ids


def check_range(acts: np.ndarray, sample_ids: np.ndarray) -> None:
    """Refuse `acts [B, tokens, L]` holding NaN/inf or magnitudes the float16 maps cannot hold, naming where."""
    magnitude = np.abs(acts).max(axis=1)  # [B, L]; NaN propagates
    bad = ~(magnitude <= MAP_MAX)
    if not bad.any():
        return
    samples, latents = np.nonzero(bad)
    names = sorted({str(sample_ids[i]) for i in samples})
    finite = magnitude[np.isfinite(magnitude)]
    what = (
        "are NaN or inf"
        if not np.isfinite(magnitude[bad]).all()
        else f"reach magnitude {float(finite.max()):.6g}, beyond float16's largest value {MAP_MAX:.6g} that the "
        "top-k activation maps are kept in"
    )
    raise InvalidRequest(
        f"latent activations of samples {names[:5]}{' (+more)' if len(names) > 5 else ''} at latents "
        f"{sorted(set(latents.tolist()))[:5]} {what}; nothing of this batch was recorded"
    )
