"""Image-level and track-level ground truth: each latent pooled over the patch tokens of one image or one object.

A factor of a whole image (an object of some shape anywhere in it) need not be visible in any single
patch's activation: a latent may fire on one patch of each image holding a star and score a low
patch-level AUROC, yet detect "the image holds a star" perfectly. So every latent is pooled over an
image's patch tokens and scored per image, with `ground_truth.factor_recovery` (best single-latent
AUROC per value), for the factors

- `has_shape=X`, `has_colour=Y`: some object of that shape / colour is visible (`area > 0`) in the image,
  from `objects.parquet` (max-pooling: a detector of presence need fire on one patch);
- `count=N`: the number of distinct objects visible in the image (for `shapes` the `count` column of
  `samples.parquet`); sum-pooling, so that a latent firing once per object adds up to the count.

An image is a store sample: an image, a whole clip for a video model (its objects those visible in the
frames the model read), or one frame of a clip that an image model reads frame by frame. Only images
whose patch tokens are all among the scored rows count (the evaluator scores the first rows of the
held-out store, so the last image is usually cut).

On `moving-shapes` each object's track is scored too: a latent is max-pooled over the patch tokens
whose dataset cell the object dominates with coverage >= `min_coverage` (0.5, the patch-level positive
rule), across all frames of complete images, and scored per track on `direction=D`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from prisma_ray.errors import InvalidRequest

from ..models.spec import TokenLayout
from ..models.token_selection import TokenSelection, fixed_positions
from .ground_truth import factor_recovery, token_factors

MIN_COVERAGE = 0.5
Pooling = Literal["max", "sum"]
IMAGE_POOLING: dict[str, Pooling] = {"has_shape": "max", "has_colour": "max", "count": "sum"}
TRACK_POOLING: dict[str, Pooling] = {"direction": "max"}


@dataclass(frozen=True)
class PooledLabels:
    """Which scored rows pool into which image and which object track, and each one's factor values.

    `image` / `track`: `int64[N]`, the image / track of each scored row (-1: none: a prefix token, an
    incomplete image, a patch no object dominates); `image_factors` / `track_factors`: per factor, one
    set of values per image / track (a set: an image may hold stars and circles).
    """

    image: np.ndarray
    image_factors: dict[str, list[frozenset]]
    track: np.ndarray
    track_factors: dict[str, list[frozenset]]


def patch_tokens_per_sample(layout: TokenLayout, token_selection: dict[str, Any]) -> int:
    """Patch tokens a store keeps of every sample, from its manifest's `token_selection`."""
    selection = TokenSelection.model_validate(token_selection)
    fixed = fixed_positions(layout, selection)
    return int(selection.k) if fixed is None else int((fixed >= layout.n_prefix).sum())


def image_index(keys: pa.Table, layout: TokenLayout, per_image: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """`(image of each row, images)`: rows of one image share `sample_id` and, for an image model, `frame` (a clip
    read frame by frame is one image per frame; a video model's sample is one image: frame -1). Prefix tokens and
    the rows of images with fewer than `per_image` patch rows get -1. `images[i]` is `(sample_id, frame)`."""
    token = keys.column("token").to_numpy().astype(np.int64)
    patch = token >= layout.n_prefix
    video_model = layout.time > 1 or layout.tubelet > 1
    frame = np.full(len(token), -1, np.int64) if video_model else keys.column("frame").to_numpy().astype(np.int64)
    ids = keys.column("sample_id").to_pylist()
    units: dict[tuple[str, int], int] = {}
    index = np.full(len(token), -1, np.int64)
    for row in np.flatnonzero(patch):
        index[row] = units.setdefault((ids[row], int(frame[row])), len(units))
    counts = np.bincount(index[patch], minlength=len(units))
    complete = np.flatnonzero(counts >= per_image)
    renumber = np.full(len(units) + 1, -1, np.int64)
    renumber[complete] = np.arange(len(complete))
    images = list(units)
    return renumber[index], [images[i] for i in complete]


def image_factors(
    images: list[tuple[str, int]], objects: pa.Table, frames: dict[str, np.ndarray] | None = None
) -> dict[str, list[frozenset]]:
    """`has_shape`, `has_colour` and `count` of each image `(sample_id, frame)`, from the objects visible in it
    (`objects.parquet` rows with `area > 0`): those of that frame, or for frame -1 those of the frames a video
    model read (`frames[sample_id]`, clip frames; every frame when absent, as for images)."""
    wanted = {sample for sample, _ in images}
    columns = [c for c in ("sample_id", "frame", "object", "shape", "colour", "area") if c in objects.column_names]
    by_sample: dict[str, list[dict]] = {}
    for row in objects.select(columns).to_pylist():
        if row["sample_id"] in wanted and row.get("area", 1) > 0:
            by_sample.setdefault(row["sample_id"], []).append(row)
    out: dict[str, list[frozenset]] = {"has_shape": [], "has_colour": [], "count": []}
    for sample, frame in images:
        rows = by_sample.get(sample, [])
        if frame >= 0:
            rows = [r for r in rows if r["frame"] == frame]
        elif frames and sample in frames:
            seen = set(np.asarray(frames[sample]).tolist())
            rows = [r for r in rows if r["frame"] in seen]
        out["has_shape"].append(frozenset(r["shape"] for r in rows))
        out["has_colour"].append(frozenset(r["colour"] for r in rows))
        out["count"].append(frozenset([len({r["object"] for r in rows})]))
    return out


def track_index(
    image: np.ndarray, ids: list[str], obj: np.ndarray, coverage: np.ndarray, min_coverage: float = MIN_COVERAGE
) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """`(track of each row, tracks)`: rows of complete images (`image >= 0`) whose cell's dominant object `obj`
    (0 or None: background) covers >= `min_coverage` of it pool into the track `(sample_id, object)`."""
    index = np.full(len(image), -1, np.int64)
    tracks: dict[tuple[str, int], int] = {}
    for row in range(len(image)):
        o, c = obj[row], coverage[row]
        if image[row] >= 0 and o is not None and o > 0 and c is not None and c >= min_coverage:
            index[row] = tracks.setdefault((ids[row], int(o)), len(tracks))
    return index, list(tracks)


def pooled_labels(
    keys: pa.Table,
    layout: TokenLayout,
    per_image: int,
    patches: pa.Table,
    objects: pa.Table,
    patch_grid: tuple[int, int],
    crop_pct: float = 1.0,
    frames: dict[str, np.ndarray] | None = None,
    min_coverage: float = MIN_COVERAGE,
) -> PooledLabels:
    """The images and object tracks of the store rows `keys` and their factors (see the module docstring);
    tracks only where `objects` has a `direction` (`moving-shapes`)."""
    image, images = image_index(keys, layout, per_image)
    track, track_factors = np.full(len(image), -1, np.int64), {}
    if "direction" in objects.column_names:
        labels = token_factors(keys, layout, patches, objects, patch_grid, ["object", "direction"], crop_pct, frames)
        values = labels.values
        ids = keys.column("sample_id").to_pylist()
        track, tracks = track_index(image, ids, values["object"], labels.coverage, min_coverage)
        direction: list[frozenset] = [frozenset() for _ in tracks]
        for row in np.flatnonzero(track >= 0):
            direction[track[row]] = direction[track[row]] | {values["direction"][row]}
        track_factors = {"direction": direction}
    return PooledLabels(image, image_factors(images, objects, frames), track, track_factors)


def pool(latents: np.ndarray, index: np.ndarray, how: Pooling) -> np.ndarray:
    """`[units, L]`: the rows of `latents` (`[N, L]`) with the same `index` (>= 0; -1 left out) max- or summed
    together, unit `u` in row `u` (every unit from 0 to `index.max()` must have a row)."""
    keep = np.flatnonzero(index >= 0)
    if not len(keep):
        return np.zeros((0, latents.shape[-1]), latents.dtype)
    order = keep[np.argsort(index[keep], kind="stable")]
    units = index[order]
    if not np.array_equal(np.unique(units), np.arange(units[-1] + 1)):
        raise InvalidRequest("pooling: every unit from 0 to the largest index needs at least one row")
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    ufunc = np.maximum if how == "max" else np.add
    return ufunc.reduceat(latents[order], starts, axis=0)


def pooled_recovery(
    latents: np.ndarray,
    index: np.ndarray,
    factors: dict[str, list[frozenset]],
    pooling: dict[str, Pooling],
    threshold: float = 0.95,
) -> dict[str, Any]:
    """Best single-latent AUROC of every factor value over units (images or tracks): `latents` (`[N, L]`) pooled
    per unit as `pooling[factor]` says, each value `f=v` scored as "the unit's set holds v" against the others
    (`factor_recovery`). Returns `factor_recovery`'s keys over all values, and `units`."""
    pooled = {how: pool(latents, index, how) for how in set(pooling.values())}
    values, best, latent = [], [], []
    for factor, sets in factors.items():
        for value in sorted(set().union(*sets), key=str):
            column = np.array([value if value in s else None for s in sets], dtype=object)
            result = factor_recovery(pooled[pooling[factor]], {factor: column}, threshold)
            values += result["values"]
            best += result["best_auroc"]
            latent += result["best_latent"]
    scores = np.asarray(best, dtype=np.float64)
    return {
        "units": int(index.max() + 1) if len(index) else 0,
        "values": values,
        "best_auroc": best,
        "best_latent": latent,
        "fraction_detected": float((scores >= threshold).mean()) if len(scores) else float("nan"),
        "mean_best_auroc": float(scores.mean()) if len(scores) else float("nan"),
    }


def pooled_columns(latents: np.ndarray, labels: PooledLabels, threshold: float = 0.95) -> dict[str, Any]:
    """The metrics-row columns of image-level (`gt_image_...`) and, where there are tracks, track-level
    (`gt_track_...`) recovery: `_units` (images or tracks scored), `_values`, `_fraction_detected`,
    `_mean_best_auroc` and `_detail` (JSON: per value, the best latent and its AUROC)."""
    latents = np.asarray(latents)
    if len(latents) != len(labels.image):
        raise InvalidRequest(
            f"pooled ground truth: {len(latents)} rows of latents but labels of {len(labels.image)} rows"
        )
    scored = {"gt_image": pooled_recovery(latents, labels.image, labels.image_factors, IMAGE_POOLING, threshold)}
    if labels.track_factors:
        scored["gt_track"] = pooled_recovery(latents, labels.track, labels.track_factors, TRACK_POOLING, threshold)
    row: dict[str, Any] = {}
    for prefix, result in scored.items():
        detail = {
            value: {"auroc": auc, "latent": int(best)}
            for value, auc, best in zip(result["values"], result["best_auroc"], result["best_latent"])
        }
        row.update(
            {
                f"{prefix}_units": result["units"],
                f"{prefix}_values": len(result["values"]),
                f"{prefix}_fraction_detected": result["fraction_detected"],
                f"{prefix}_mean_best_auroc": result["mean_best_auroc"],
                f"{prefix}_detail": json.dumps(detail),
            }
        )
    return row
