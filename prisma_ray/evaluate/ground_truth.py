"""Ground-truth recovery on the synthetic datasets: how well single latents detect known factors.

Each patch token of a held-out store is joined to the synthetic dataset's `patches.parquet` (the
object covering most of that patch, its coverage of the patch, its shape and colour) and through the
object to `objects.parquet` (e.g. the motion direction of `moving-shapes`). A token is a positive of a
factor value (`shape=circle`, `colour=red`, ...) when its cell's dominant object has that value and
covers at least `min_coverage` of the cell, a negative when the cell is background or its dominant
object covers at least `min_coverage` and has another value, and ambiguous (scored for no value) when
0 < coverage < `min_coverage` (`TokenLabels.scored`). Prefix tokens (CLS, registers) are never scored.

For every value, every latent's AUROC as a detector of the value's tokens is computed and the best
latent kept; for that latent, its average precision, the purity of its top-k tokens with k the number
of positives (R-precision) and its coverage of the positives (`detector_metrics`). A value is detected
when its best AUROC reaches 0.95. These are the per-patch grounding metrics of the vision-SAE
literature: saev (github.com/OSU-NLP-group/saev) reports mAP, Purity@k and Coverage@tau per class
for the best latent of each class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve

from prisma_ray.errors import InvalidRequest

from ..data.decode import FrameSampling
from ..data.synthetic import unambiguous_cells
from ..models.spec import TokenLayout

JOIN_KEYS = ["sample_id", "frame", "patch_row", "patch_col"]
OBJECT_KEYS = ["sample_id", "frame", "object"]


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """`float64[N, L]`: the 1-based rank of each value within its column, tied values sharing their mean rank
    (`scipy.stats.rankdata`)."""
    return rankdata(scores, axis=0)


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
    latents: np.ndarray,
    factors: dict[str, np.ndarray],
    threshold: float = 0.95,
    chunk: int = 256,
    signed: bool = False,
    detectors: bool = False,
) -> dict[str, object]:
    """Best single-latent detector of every factor value present among the rows of `latents` (`[..., L]`, every
    leading position one row, in row-major order), with its grounding metrics.

    `factors[name]` holds each row's value (None where the row has none, e.g. background: a negative of every
    value); a factor whose length is not the number of rows raises `InvalidRequest`. Give only scored rows
    (`TokenLabels.scored`). `signed` scores each column with both signs (baseline directions, unlike dictionary
    latents, are signed): the better sign is kept in `best_sign`, and coverage uses the F1-maximising threshold
    (`detector_metrics`). Columns that are constant (latents that never fire) score 0.5 and are skipped.

    Returns, per value (`values`, `"factor=value"`): `best_auroc`, `best_latent` (-1: none beats chance),
    `best_sign`, `ap`, `purity`, `coverage`, `positives`; and `fraction_detected` (best AUROC >= `threshold`),
    `mean_best_auroc`, `mean_ap`, `mean_purity`, `mean_coverage` (NaN without values). With `detectors`, also
    `detectors`: the detector latents (`detector_latents`) read from the same AUROC matrix, so each latent column is
    ranked once for both.
    """
    latents = np.asarray(latents)
    if latents.ndim == 0:
        raise InvalidRequest("factor recovery: expected latent activations of shape [..., latents], got a scalar")
    latents = latents.reshape(-1, latents.shape[-1])
    names, positives = value_columns(factors, len(latents))
    areas = auroc_matrix(latents, positives, chunk)
    best, column, sign = best_detectors(areas, signed)
    scores = np.where(column >= 0, latents[:, np.maximum(column, 0)] * sign, 0.0)
    metrics = detector_metrics(scores, positives, signed)
    metrics["coverage"][column < 0] = 0.0  # no detector: it covers nothing

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else float("nan")

    found = {"detectors": detectors_of(areas, names, threshold)} if detectors else {}
    return {
        **found,
        "values": names,
        "best_auroc": best.tolist(),
        "best_latent": column.tolist(),
        "best_sign": sign.tolist(),
        "ap": metrics["ap"].tolist(),
        "purity": metrics["purity"].tolist(),
        "coverage": metrics["coverage"].tolist(),
        "positives": positives.sum(0).tolist(),
        "fraction_detected": mean(best >= threshold),
        "mean_best_auroc": mean(best),
        "mean_ap": mean(metrics["ap"]),
        "mean_purity": mean(metrics["purity"]),
        "mean_coverage": mean(metrics["coverage"]),
    }


def recovery_columns(result: dict[str, object]) -> dict[str, object]:
    """The metrics-row columns of a dictionary's `factor_recovery` result: `gt_values`, `gt_fraction_detected`,
    `gt_mean_best_auroc`, `gt_mean_ap`, `gt_mean_purity`, `gt_mean_coverage` and `gt_detail` (JSON: per value the
    best latent, its AUROC, AP, purity and coverage)."""
    detail = {
        value: {
            "latent": int(result["best_latent"][i]),
            "auroc": result["best_auroc"][i],
            **{metric: result[metric][i] for metric in ("ap", "purity", "coverage")},
        }
        for i, value in enumerate(result["values"])
    }
    return {
        "gt_values": len(result["values"]),
        "gt_fraction_detected": result["fraction_detected"],
        "gt_mean_best_auroc": result["mean_best_auroc"],
        "gt_mean_ap": result["mean_ap"],
        "gt_mean_purity": result["mean_purity"],
        "gt_mean_coverage": result["mean_coverage"],
        "gt_detail": json.dumps(detail),
    }


@dataclass(frozen=True)
class Detector:
    """A detector latent: its best factor value (`"red"`, `"circle"`), that value's AUROC, and every value it detects
    at the threshold (best first)."""

    latent: int
    value: str
    auroc: float
    detected: tuple[str, ...]


def detector_latents(
    latents: np.ndarray, factors: Mapping[str, np.ndarray], threshold: float = 0.95, chunk: int = 256
) -> list[Detector]:
    """Issue 18's detector latents: each latent whose best factor value reaches patch AUROC >= `threshold`, counted
    once, with that best value (the value an explanation must name to agree: `interpret.autointerp.scoring.agreement` of `(latent, value)`).

    `latents` is `float[N, L]` over scored patch tokens, `factors[name]` each token's value (None: a negative of
    every value), as `factor_recovery` takes them. Unlike its per-value best latent (the
    sweep's `gt_detail`), a latent that is the best detector of several values is one detector here, and a latent
    whose own best value has a better latent elsewhere is still a detector of that value. Latents that never fire
    are skipped."""
    latents = np.asarray(latents)
    names, positives = value_columns(dict(factors), len(latents))
    return detectors_of(auroc_matrix(latents, positives, chunk), names, threshold)


def detectors_of(areas: np.ndarray, names: list[str], threshold: float) -> list[Detector]:
    """The detector latents (`detector_latents`) of an AUROC matrix (`float64[L, V]`, `auroc_matrix`) over the
    values `names` (`"factor=value"`): each column whose best value reaches `threshold`, in column order, ties
    going to the first value (shapes before colours)."""
    values = [name.split("=", 1)[-1] for name in names]
    found = []
    for latent in np.flatnonzero(areas.max(1, initial=0.0) >= threshold):
        row = areas[latent]
        order = np.argsort(-row, kind="stable")
        detected = tuple(values[i] for i in order if row[i] >= threshold)
        found.append(Detector(int(latent), values[order[0]], float(row[order[0]]), detected))
    return found


def detector_column(detectors: list[Detector]) -> dict[str, str]:
    """The metrics-row column `gt_detectors` (JSON: per detector latent (`detector_latents`), its `latent`, best
    `value`, that value's `auroc` and every value it `detected`), which the explain step's agreement reads."""
    rows = [
        {"latent": d.latent, "value": d.value, "auroc": round(d.auroc, 4), "detected": list(d.detected)}
        for d in detectors
    ]
    return {"gt_detectors": json.dumps(rows)}


def value_columns(factors: dict[str, np.ndarray], rows: int) -> tuple[list[str], np.ndarray]:
    """`(names, bool[rows, V])`: one positive column per factor value present on some but not all rows."""
    wrong = {factor: len(values) for factor, values in factors.items() if len(values) != rows}
    if wrong:
        raise InvalidRequest(
            f"factor recovery: {rows} rows of latents but factors of {wrong} values; give one value per row"
        )
    names, columns = [], []
    for factor, values in factors.items():
        for value in sorted({v for v in values if v is not None}, key=str):
            column = np.array([v == value for v in values], dtype=bool)
            if 0 < column.sum() < len(column):
                names.append(f"{factor}={value}")
                columns.append(column)
    return names, np.stack(columns, axis=1) if columns else np.zeros((rows, 0), dtype=bool)


def auroc_matrix(scores: np.ndarray, positives: np.ndarray, chunk: int = 256) -> np.ndarray:
    """`float64[L, V]`: the AUROC (`auroc`) of each column of `scores` (`[N, L]`) for each positive set
    (`bool[N, V]`), ranking `chunk` columns at a time (memory `N x chunk`); a constant column (a latent that never
    fires) is 0.5 without being ranked, as is a NaN (an empty or full positive set)."""
    n_values = positives.shape[1]
    areas = np.full((scores.shape[1], n_values), 0.5)
    live = np.flatnonzero((scores != scores[:1]).any(0)) if len(scores) else np.zeros(0, np.int64)
    for start in range(0, len(live) if n_values else 0, chunk):
        cols = live[start : start + chunk]
        areas[cols] = np.nan_to_num(auroc(scores[:, cols], positives), nan=0.5)
    return areas


def best_detectors(areas: np.ndarray, signed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(auroc float64[V], column int64[V], sign float64[V])`: the column with the highest AUROC for each value of an
    AUROC matrix (`float64[L, V]`, `auroc_matrix`), the first column on ties; with `signed`, a column's negation
    (AUROC 1 - a) competes too and wins as sign -1. Column -1 (AUROC 0.5): no column beats chance."""
    n_values = areas.shape[1]
    flipped = np.maximum(areas, 1 - areas) if signed else areas
    if not len(areas):
        return np.full(n_values, 0.5), np.full(n_values, -1, dtype=np.int64), np.ones(n_values)
    column = np.argmax(flipped, axis=0).astype(np.int64)
    best = flipped[column, np.arange(n_values)]
    sign = np.where(areas[column, np.arange(n_values)] >= 0.5, 1.0, -1.0)
    chance = best <= 0.5
    best[chance], column[chance], sign[chance] = 0.5, -1, 1.0
    return best, column, sign


def detector_metrics(scores: np.ndarray, positives: np.ndarray, signed: bool = False) -> dict[str, np.ndarray]:
    """Grounding metrics of detector `v` (`scores[:, v]`, `[N, V]`) of positive set `v` (`positives[:, v]`), each
    `float64[V]`:

    - `ap`: average precision (`sklearn.metrics.average_precision_score`; tied scores form one step);
    - `purity`: the fraction of positives among the k highest-scoring rows, k = the number of positives
      (R-precision); rows tied with the k-th score count by their share of positives (random tie-breaking);
    - `coverage`: the fraction of positives on which the detector fires: score > 0 for dictionary latents, or
      with `signed` (baseline directions, no natural zero) score >= the threshold that maximises F1.
    """
    positives = np.asarray(positives, dtype=bool)
    n_values = positives.shape[1]
    ap, coverage = np.zeros(n_values), np.zeros(n_values)
    for v in range(n_values):
        ap[v] = average_precision_score(positives[:, v], scores[:, v])
        if signed:
            precision, recall, _ = precision_recall_curve(positives[:, v], scores[:, v])
            with np.errstate(invalid="ignore", divide="ignore"):
                f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
            coverage[v] = recall[np.argmax(f1[:-1])]  # the last point (recall 0) has no threshold
        else:
            coverage[v] = (scores[positives[:, v], v] > 0).mean()
    k = positives.sum(0)
    kth = np.sort(scores, axis=0)[::-1][np.maximum(k - 1, 0), np.arange(n_values)]
    above, tied = scores > kth, scores == kth
    ties_positive = (tied & positives).sum(0) / np.maximum(tied.sum(0), 1)
    purity = ((above & positives).sum(0) + (k - above.sum(0)) * ties_positive) / np.maximum(k, 1)
    return {"ap": ap, "purity": purity, "coverage": coverage}


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


@dataclass(frozen=True)
class TokenLabels:
    """Ground truth of N store rows: `patch` (`bool[N]`, False for prefix tokens), `values[factor]` (object
    array: the value of the cell's dominant object, None off-object or for prefix tokens) and `coverage`
    (`float32[N]`: the fraction of the cell its dominant object covers, 0 for background, NaN for prefix tokens).
    """

    patch: np.ndarray
    values: dict[str, np.ndarray]
    coverage: np.ndarray

    def scored(self, min_coverage: float = 0.5) -> np.ndarray:
        """`bool[N]`: the rows scored for every value (positive or negative): patch tokens whose cell is background
        or covered at least `min_coverage` by its dominant object; edge cells (0 < coverage < `min_coverage`) are
        ambiguous and left out, so that they count neither for nor against a detector."""
        if not 0 < min_coverage <= 1:
            raise InvalidRequest(f"min_coverage must be in (0, 1]; got {min_coverage}")
        return self.patch & unambiguous_cells(self.coverage, min_coverage)


def token_factors(
    keys: pa.Table,
    layout: TokenLayout,
    patches: pa.Table,
    objects: pa.Table,
    patch_grid: tuple[int, int],
    factors: list[str],
    crop_pct: float = 1.0,
    frames: dict[str, np.ndarray] | None = None,
) -> TokenLabels:
    """Ground-truth labels of the store rows `keys` (`sample_id`, `token`, `frame`).

    `frames` maps a video model's model-input frames to clip frames (`source_frames`); an image model's rows
    already hold the clip frame (a video read frame by frame) or -1 (images).

    Factors come from `patches` (`shape`, `colour`) or, through the patch's object, from `objects`; each patch
    token's `coverage` from `patches`. A factor in neither table, or a `patches` table without `coverage`, raises
    `InvalidRequest`.
    """
    if "coverage" not in patches.column_names:
        raise InvalidRequest(
            "ground truth: patches.parquet has no `coverage` column; regenerate the synthetic dataset "
            "(prisma_ray.data.synthetic.generate)"
        )
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
    from_patches = [f for f in factors if f in patches.column_names and f not in (*JOIN_KEYS, "coverage")]
    from_objects = [f for f in factors if f not in from_patches and f in objects.column_names]
    unknown = sorted(set(factors) - set(from_patches) - set(from_objects))
    if unknown:
        raise InvalidRequest(f"ground-truth factors {unknown} are in neither patches.parquet nor objects.parquet")
    columns = list(dict.fromkeys([*JOIN_KEYS, "object", "coverage", *from_patches]))  # `object` may be a factor itself
    joined = rows.join(_cast_keys(patches.select(columns), JOIN_KEYS), JOIN_KEYS)
    if from_objects:
        joined = joined.join(_cast_keys(objects.select([*OBJECT_KEYS, *from_objects]), OBJECT_KEYS), OBJECT_KEYS)
    joined = joined.sort_by("_row")
    values = {}
    for factor in factors:
        column = np.full(len(token), None, dtype=object)
        column[patch] = joined.column(factor).to_pylist()
        values[factor] = column
    coverage = np.full(len(token), np.nan, dtype=np.float32)
    coverage[patch] = joined.column("coverage").to_numpy(zero_copy_only=False)
    return TokenLabels(patch, values, coverage)


def _cast_keys(table: pa.Table, keys: list[str]) -> pa.Table:
    """`table` with its join keys cast to the types `token_factors` builds (string, int64)."""
    fields = [
        pa.field(k, pa.string() if k == "sample_id" else pa.int64()) if k in keys else f
        for k, f in zip(table.column_names, table.schema)
    ]
    return table.cast(pa.schema(fields))
