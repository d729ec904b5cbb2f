"""Baselines for ground-truth recovery: how well directions found without a dictionary detect the same factors.

A dictionary earns its place only if its latents detect the factor values better than what the model's
activations give away for free. Each baseline is a set of scores per token, scored on exactly the tokens the
dictionary is scored on, every score with both signs (unlike dictionary latents, these directions are signed):

- `raw`: the model's own dimensions (`d` scores: the activation itself);
- `pca`: the projections on the `d` principal components (`sklearn.decomposition.PCA`);
- `kmeans`: minus the Euclidean distance to each centroid of `sklearn.cluster.MiniBatchKMeans` (a graded
  one-hot assignment: the nearest centroid scores highest);
- `random`: projections on random unit directions (Gaussian, normalised; `d` of them unless set).

PCA and k-means are fitted on other held-out tokens than the scored ones (`fit`), as saev's trait-discovery
baselines are (github.com/OSU-NLP-group/saev, contrib/trait_discovery: PCA and MiniBatchKMeans baselines).
"""

from __future__ import annotations

import json
import math
from typing import Literal

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA

from prisma_ray.errors import InvalidRequest

from .ground_truth import factor_recovery

Baseline = Literal["raw", "pca", "kmeans", "random"]
BASELINES: tuple[Baseline, ...] = ("raw", "pca", "kmeans", "random")
MAX_CLUSTERS = 1024
SUMMARY_KEYS = ("fraction_detected", "mean_best_auroc", "mean_ap", "mean_purity", "mean_coverage")


def baseline_scores(
    name: Baseline,
    x: np.ndarray,
    fit: np.ndarray,
    seed: int = 0,
    clusters: int | None = None,
    directions: int | None = None,
) -> np.ndarray:
    """`float32[N, m]`: the scores of baseline `name` on the rows `x` (`[N, d]`), fitted on the rows `fit` (`[M, d]`).

    `clusters` (k-means; default `min(4 d, 1024)`) is capped at the number of fit rows; `directions` (random;
    default `d`). PCA keeps `min(d, M)` components. `seed` fixes k-means and the random directions. Fewer than 2
    fit rows for PCA or k-means, or an unknown `name`, raise `InvalidRequest`.
    """
    x = np.asarray(x, dtype=np.float32)
    fit = np.asarray(fit, dtype=np.float32)
    d = x.shape[1]
    if name == "raw":
        return x
    if name == "random":
        w = np.random.default_rng(seed).standard_normal((d, directions or d)).astype(np.float32)
        return x @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    if name not in ("pca", "kmeans"):
        raise InvalidRequest(f"unknown ground-truth baseline {name!r}; known: {list(BASELINES)}")
    if len(fit) < 2:
        raise InvalidRequest(f"the {name} baseline needs at least 2 rows to fit; got {len(fit)}")
    if name == "pca":
        return PCA(n_components=min(d, len(fit)), random_state=seed).fit(fit).transform(x).astype(np.float32)
    k = min(clusters or min(4 * d, MAX_CLUSTERS), len(fit))
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=1024).fit(fit)  # k-means++, one init
    return -kmeans.transform(x).astype(np.float32)


def baseline_recovery(
    x: np.ndarray,
    fit: np.ndarray,
    factors: dict[str, np.ndarray],
    names: list[Baseline],
    threshold: float = 0.95,
    seed: int = 0,
    clusters: int | None = None,
    directions: int | None = None,
) -> dict[str, dict[str, object]]:
    """`{baseline: factor_recovery result + "directions"}`: each baseline of `names` scored with both signs on the
    rows `x` against `factors` (as `factor_recovery` takes them), fitted on `fit` (see `baseline_scores`)."""
    out = {}
    for name in names:
        scores = baseline_scores(name, x, fit, seed, clusters, directions)
        out[name] = {**factor_recovery(scores, factors, threshold, signed=True), "directions": scores.shape[1]}
    return out


def margin_columns(result: dict[str, object], baselines: dict[str, dict[str, object]]) -> dict[str, object]:
    """The metrics-row columns comparing a dictionary's `factor_recovery` result with the baselines' results:

    `gt_best_baseline` (the baseline with the highest mean best AUROC) and its `gt_baseline_mean_best_auroc`;
    `gt_baseline_fraction_detected` (the highest fraction detected by any baseline); `gt_margin_auroc` and
    `gt_margin_detected` (the dictionary's figure minus those: positive only when it beats every baseline); and
    `gt_baselines` (JSON: per baseline its number of directions, mean metrics and best AUROC per value). Empty
    without baselines.
    """
    if not baselines:
        return {}
    best = max(baselines, key=lambda name: _ordered(baselines[name]["mean_best_auroc"]))
    auroc = baselines[best]["mean_best_auroc"]
    detected = max((b["fraction_detected"] for b in baselines.values()), key=_ordered)
    detail = {
        name: {
            "directions": b["directions"],
            **{k: b[k] for k in SUMMARY_KEYS},
            "best_auroc": dict(zip(b["values"], b["best_auroc"])),
        }
        for name, b in baselines.items()
    }
    return {
        "gt_best_baseline": best,
        "gt_baseline_mean_best_auroc": auroc,
        "gt_baseline_fraction_detected": detected,
        "gt_margin_auroc": result["mean_best_auroc"] - auroc,
        "gt_margin_detected": result["fraction_detected"] - detected,
        "gt_baselines": json.dumps(detail),
    }


def _ordered(value: float) -> float:
    """`value`, with NaN (no factor values) below every number."""
    return -math.inf if math.isnan(value) else value
