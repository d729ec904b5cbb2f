"""Ground-truth recovery on the synthetic datasets: how well single latents detect known factors.

Each patch token of a held-out store is joined to the synthetic dataset's `patches.parquet` (the
object covering most of that patch, its shape and colour) and through the object to
`objects.parquet` (e.g. the motion direction of `moving-shapes`). For every factor value
(`shape=circle`, `colour=red`, ...) the AUROC of every latent's activation as a detector of the
tokens carrying that value is computed; the best latent's AUROC is reported per value, and the
fraction of values that some latent detects with AUROC >= 0.95.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from prisma_ray.errors import InvalidRequest

from ..data.decode import FrameSampling
from ..models.spec import TokenLayout

JOIN_KEYS = ["sample_id", "frame", "patch_row", "patch_col"]
OBJECT_KEYS = ["sample_id", "frame", "object"]


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """`float64[N, L]`: the 1-based rank of each value within its column, tied values sharing their mean rank."""
    n = scores.shape[0]
    order = np.argsort(scores, axis=0, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=0)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(ordered.shape, dtype=bool)
    ends[:-1] = starts[1:]
    index = np.broadcast_to(np.arange(n)[:, None], ordered.shape)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=0)
    last = np.minimum.accumulate(np.where(ends, index, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty(ordered.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=0)
    return ranks


def auroc(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """`float64[L, V]`: AUROC of each score column (`[N, L]`) as a detector of each positive set
    (`bool[N, V]`), ties counted as half (Mann-Whitney); NaN where a set is empty or everything."""
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    pos = np.asarray(positives, dtype=np.float64)
    n_pos = pos.sum(0)
    n_neg = len(pos) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ranks.T @ pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def factor_recovery(
    latents: np.ndarray, factors: dict[str, np.ndarray], threshold: float = 0.95, chunk: int = 256
) -> dict[str, object]:
    """Best single-latent AUROC for every factor value present among the rows of `latents` (`[..., L]`, every
    leading position one row, in row-major order).

    `factors[name]` holds each row's value (None where the row has none, e.g. background); a factor
    whose length is not the number of rows raises `InvalidRequest`. Returns
    `values` (`"factor=value"`), `best_auroc`, `best_latent`, `fraction_detected` (best AUROC >= `threshold`)
    and `mean_best_auroc`. Latents that never fire score 0.5 and are skipped.
    """
    latents = np.asarray(latents)
    if latents.ndim == 0:
        raise InvalidRequest("factor recovery: expected latent activations of shape [..., latents], got a scalar")
    latents = latents.reshape(-1, latents.shape[-1])
    wrong = {factor: len(values) for factor, values in factors.items() if len(values) != len(latents)}
    if wrong:
        raise InvalidRequest(
            f"factor recovery: {len(latents)} rows of latents but factors of {wrong} values; give one value per row"
        )
    names, columns = [], []
    for factor, values in factors.items():
        for value in sorted({v for v in values if v is not None}, key=str):
            column = np.array([v == value for v in values], dtype=bool)
            if 0 < column.sum() < len(column):
                names.append(f"{factor}={value}")
                columns.append(column)
    if not names:
        return {
            "values": [],
            "best_auroc": [],
            "best_latent": [],
            "fraction_detected": float("nan"),
            "mean_best_auroc": float("nan"),
        }
    positives = np.stack(columns, axis=1)
    best = np.full(len(names), 0.5)
    best_latent = np.full(len(names), -1)
    live = np.flatnonzero((latents != 0).any(0))
    for start in range(0, len(live), chunk):
        cols = live[start : start + chunk]
        scores = auroc(latents[:, cols], positives)
        top = np.nanargmax(np.nan_to_num(scores, nan=-1.0), axis=0)
        top_score = scores[top, np.arange(len(names))]
        better = top_score > best
        best[better], best_latent[better] = top_score[better], cols[top[better]]
    return {
        "values": names,
        "best_auroc": best.tolist(),
        "best_latent": best_latent.tolist(),
        "fraction_detected": float((best >= threshold).mean()),
        "mean_best_auroc": float(best.mean()),
    }


def grid_cell(index: np.ndarray, n_model: int, n_data: int, crop_pct: float = 1.0) -> np.ndarray:
    """The dataset patch-grid cell holding the centre of model patch `index` along one axis
    (`n_model` model patches, `n_data` dataset cells; a centre crop of `crop_pct` of the side)."""
    centre = (1 - crop_pct) / 2 + crop_pct * (np.asarray(index) + 0.5) / n_model
    return np.clip(np.floor(centre * n_data), 0, n_data - 1).astype(np.int64)


def source_frames(samples: pa.Table, sampling: FrameSampling | None) -> dict[str, np.ndarray]:
    """`{sample_id: int64[model frames]}`: the clip frame each model-input frame was decoded from."""
    if sampling is None:
        return {}
    rows = samples.select(["sample_id", "num_frames", "fps"]).to_pylist()
    return {r["sample_id"]: sampling.indices(int(r["num_frames"]), float(r["fps"])) for r in rows}


def token_factors(
    keys: pa.Table,
    layout: TokenLayout,
    patches: pa.Table,
    objects: pa.Table,
    patch_grid: tuple[int, int],
    factors: list[str],
    crop_pct: float = 1.0,
    frames: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Ground-truth factors of the store rows `keys` (`sample_id`, `token`, `frame`).

    `frames` maps a video model's model-input frames to clip frames (`source_frames`); an image model's rows
    already hold the clip frame (a video read frame by frame) or -1 (images).

    Returns `(patch, values)`: `bool[N]` marking patch tokens (prefix tokens have no patch) and
    `values[factor]`, an object array with each row's value (None off-object or for prefix tokens).
    Factors come from `patches` (`shape`, `colour`) or, through the patch's object, from `objects`.
    """
    token = keys.column("token").to_numpy().astype(np.int64)
    patch = token >= layout.n_prefix
    t_r_c = layout.patch_positions()[token[patch] - layout.n_prefix].astype(np.int64)
    ids = np.asarray(keys.column("sample_id").to_pylist(), dtype=object)[patch]
    frame = keys.column("frame").to_numpy().astype(np.int64)[patch]  # images -1; image models on video: clip frames
    if frames and (layout.time > 1 or layout.tubelet > 1):  # a video model's rows hold model-input frames
        frame = np.array([frames[s][f] for s, f in zip(ids, frame)], dtype=np.int64)
    rows = pa.table(
        {
            "sample_id": pa.array(ids.tolist(), pa.string()),
            "frame": frame,
            "patch_row": grid_cell(t_r_c[:, 1], layout.grid[0], patch_grid[0], crop_pct),
            "patch_col": grid_cell(t_r_c[:, 2], layout.grid[1], patch_grid[1], crop_pct),
            "_row": np.arange(len(ids)),
        }
    )
    from_patches = [f for f in factors if f in patches.column_names and f not in JOIN_KEYS]
    from_objects = [f for f in factors if f not in from_patches and f in objects.column_names]
    unknown = sorted(set(factors) - set(from_patches) - set(from_objects))
    if unknown:
        raise InvalidRequest(f"ground-truth factors {unknown} are in neither patches.parquet nor objects.parquet")
    columns = list(dict.fromkeys([*JOIN_KEYS, "object", *from_patches]))  # `object` may be a factor itself
    joined = rows.join(_cast_keys(patches.select(columns), JOIN_KEYS), JOIN_KEYS)
    if from_objects:
        joined = joined.join(_cast_keys(objects.select([*OBJECT_KEYS, *from_objects]), OBJECT_KEYS), OBJECT_KEYS)
    joined = joined.sort_by("_row")
    values = {}
    for factor in factors:
        column = np.full(len(token), None, dtype=object)
        column[patch] = joined.column(factor).to_pylist()
        values[factor] = column
    return patch, values


def _cast_keys(table: pa.Table, keys: list[str]) -> pa.Table:
    """`table` with its join keys cast to the types `token_factors` builds (string, int64)."""
    fields = [
        pa.field(k, pa.string() if k == "sample_id" else pa.int64()) if k in keys else f
        for k, f in zip(table.column_names, table.schema)
    ]
    return table.cast(pa.schema(fields))
