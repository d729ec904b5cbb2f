"""Ground-truth grounding metrics (AUROC, AP, purity, coverage), the ambiguous-edge rule, the baselines
(raw, PCA, k-means, random; signed) and the margin columns, on hand-built cases whose answers are known."""

import json

import numpy as np
import pyarrow as pa
import pytest

from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate import EvalConfig
from prisma_ray.evaluate.baselines import baseline_recovery, baseline_scores, margin_columns
from prisma_ray.evaluate.ground_truth import detector_metrics, factor_recovery, token_factors
from prisma_ray.models import TokenKind, TokenLayout


def circles(n: int = 40) -> np.ndarray:
    """`n` rows, every fourth a circle, every fourth a square, the rest background (None)."""
    return np.array(["circle", None, "square", None] * (n // 4), dtype=object)


def test_a_perfect_detector_scores_one_on_every_metric():
    shape = circles()
    latents = np.zeros((len(shape), 3))
    latents[:, 1] = np.where(shape == "circle", 2.0 + np.arange(len(shape)) % 3, 0.0)  # fires on circles only
    latents[:, 2] = np.arange(len(shape)) % 5  # fires everywhere, unrelated
    result = factor_recovery(latents, {"shape": shape})
    i = result["values"].index("shape=circle")
    assert result["best_latent"][i] == 1 and result["best_sign"][i] == 1
    assert (result["best_auroc"][i], result["ap"][i], result["purity"][i], result["coverage"][i]) == (1, 1, 1, 1)
    assert result["positives"][i] == 10


def test_purity_is_r_precision_with_ties_shared_and_coverage_counts_firing():
    positives = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)[:, None]
    # fires on two of the four positives and on one negative; the other five rows tie at 0
    scores = np.array([3.0, 2.0, 0, 0, 1.0, 0, 0, 0])[:, None]
    metrics = detector_metrics(scores, positives)
    # top k=4: the three firing rows (2 positives) + one of the five tied rows, 2 of which are positives
    assert metrics["purity"][0] == pytest.approx((2 + 1 * 2 / 5) / 4)
    assert metrics["coverage"][0] == pytest.approx(0.5)
    # AP: thresholds 3, 2 (precision 1, recall .25 each), 1 (recall stays), 0 (precision 4/8, recall 1)
    assert metrics["ap"][0] == pytest.approx(0.25 + 0.25 + 0.5 * 0.5)


def test_a_random_latent_scores_chance():
    rng = np.random.default_rng(0)
    shape = np.where(rng.random(4000) < 0.25, "circle", None).astype(object)
    latents = np.maximum(rng.normal(size=(4000, 1)), 0)
    result = factor_recovery(latents, {"shape": shape})
    prevalence = (shape == "circle").mean()
    assert result["best_auroc"][0] == pytest.approx(0.5, abs=0.03)
    assert result["ap"][0] == pytest.approx(prevalence, abs=0.03)
    assert result["purity"][0] == pytest.approx(prevalence, abs=0.03)


def test_no_live_latent_scores_chance_and_covers_nothing():
    shape = circles()
    result = factor_recovery(np.zeros((len(shape), 4)), {"shape": shape})
    assert result["best_latent"] == [-1, -1] and result["best_auroc"] == [0.5, 0.5]
    assert result["coverage"] == [0.0, 0.0] and result["ap"] == pytest.approx([0.25, 0.25])


def edge_case() -> tuple[np.ndarray, object]:
    """A 3x3 image of one circle: 4 cells fully covered, 2 edge cells (coverage 0.3), 3 background; a latent
    that fires on the covered cells only. Returns `(latents [10, 1] with the CLS row first, labels)`."""
    layout = TokenLayout(prefix=(TokenKind.CLS,), grid=(3, 3))
    keys = pa.table(
        {"sample_id": ["a"] * 10, "token": pa.array(range(10), pa.int16()), "frame": pa.array([-1] * 10, pa.int16())}
    )
    coverage = [1.0, 1.0, 0.3, 1.0, 1.0, 0.3, 0.0, 0.0, 0.0]
    obj = [1 if c > 0 else 0 for c in coverage]
    patches = pa.table(
        {
            "sample_id": ["a"] * 9,
            "frame": [-1] * 9,
            "patch_row": [r for r in range(3) for _ in range(3)],
            "patch_col": [c for _ in range(3) for c in range(3)],
            "object": obj,
            "coverage": coverage,
            "shape": ["circle" if o else None for o in obj],
        }
    )
    objects = pa.table({"sample_id": ["a"], "frame": pa.array([-1], pa.int16()), "object": pa.array([1], pa.int16())})
    labels = token_factors(keys, layout, patches, objects, (3, 3), ["shape"])
    latents = np.array([[5.0]] + [[1.0 if c == 1.0 else 0.0] for c in coverage])  # CLS fires too: never scored
    return latents, labels


def test_ambiguous_edge_patches_do_not_count_against_a_detector():
    latents, labels = edge_case()
    scored = labels.scored(0.5)
    assert scored.tolist() == [False, True, True, False, True, True, False, True, True, True]
    result = factor_recovery(latents[scored], {f: v[scored] for f, v in labels.values.items()})
    assert (result["best_auroc"], result["ap"], result["purity"], result["coverage"]) == ([1.0], [1.0], [1.0], [1.0])
    # counted as positives (every patch token scored), the edge cells would lower each metric
    everything = labels.patch
    counted = factor_recovery(latents[everything], {f: v[everything] for f, v in labels.values.items()})
    assert counted["best_auroc"][0] < 1 and counted["coverage"][0] == pytest.approx(4 / 6)
    assert labels.scored(0.25)[[3, 6]].all(), "a lower min_coverage scores the edge cells"
    with pytest.raises(InvalidRequest, match="min_coverage must be in"):
        labels.scored(0.0)


def test_patches_without_coverage_are_refused():
    layout = TokenLayout(prefix=(), grid=(1, 1))
    keys = pa.table({"sample_id": ["a"], "token": pa.array([0], pa.int16()), "frame": pa.array([-1], pa.int16())})
    patches = pa.table({"sample_id": ["a"], "frame": [-1], "patch_row": [0], "patch_col": [0], "object": [0]})
    with pytest.raises(InvalidRequest, match="no `coverage` column"):
        token_factors(keys, layout, patches, pa.table({"sample_id": ["a"]}), (1, 1), ["shape"])


def test_the_raw_baseline_finds_an_indicator_dimension_with_either_sign():
    rng = np.random.default_rng(1)
    shape = circles(200)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    x[:, 2] = shape == "circle"
    x[:, 4] = -(shape == "square").astype(np.float32)  # a negated indicator
    result = baseline_recovery(x, x, {"shape": shape}, ["raw"])["raw"]
    assert result["values"] == ["shape=circle", "shape=square"] and result["directions"] == 6
    assert result["best_latent"] == [2, 4] and result["best_sign"] == [1.0, -1.0]
    assert result["best_auroc"] == [1.0, 1.0] and result["ap"] == [1.0, 1.0] and result["purity"] == [1.0, 1.0]
    assert result["coverage"] == [1.0, 1.0], "signed coverage: at the F1-maximising threshold"
    unsigned = factor_recovery(x, {"shape": shape})
    assert unsigned["best_auroc"][1] < 1, "a dictionary latent is not read negated"


def test_pca_and_kmeans_baselines_are_deterministic_with_a_seed():
    rng = np.random.default_rng(2)
    fit, x = rng.normal(size=(300, 8)), rng.normal(size=(50, 8))
    pca = baseline_scores("pca", x, fit, seed=0)
    assert pca.shape == (50, 8) and np.array_equal(pca, baseline_scores("pca", x, fit, seed=0))
    kmeans = baseline_scores("kmeans", x, fit, seed=3, clusters=5)
    assert kmeans.shape == (50, 5) and (kmeans <= 0).all(), "minus the distance to each centroid"
    assert np.array_equal(kmeans, baseline_scores("kmeans", x, fit, seed=3, clusters=5))
    assert baseline_scores("kmeans", x, fit, seed=0).shape == (50, 32), "default: 4 x the width"
    assert baseline_scores("kmeans", x, fit[:10], seed=0).shape == (50, 10), "at most one cluster per fit row"
    random = baseline_scores("random", x, fit, seed=4, directions=3)
    assert random.shape == (50, 3) and np.array_equal(random, baseline_scores("random", x, fit, seed=4, directions=3))
    assert not np.array_equal(random, baseline_scores("random", x, fit, seed=5, directions=3))
    with pytest.raises(InvalidRequest, match="needs at least 2 rows"):
        baseline_scores("pca", x, fit[:1])
    with pytest.raises(InvalidRequest, match="unknown ground-truth baseline 'ica'"):
        baseline_scores("ica", x, fit)


def test_a_pca_component_along_a_factor_detects_it():
    rng = np.random.default_rng(3)
    labels = np.where(rng.random(400) < 0.5, "red", "blue").astype(object)
    x = 0.1 * rng.normal(size=(400, 5))
    x[:, 0] += 10.0 * (labels == "red")  # the direction of largest variance is the factor
    result = baseline_recovery(x[200:], x[:200], {"colour": labels[200:]}, ["pca"])["pca"]
    assert result["best_latent"] == [0, 0] and result["fraction_detected"] == 1.0


def test_margin_columns_compare_with_the_best_baseline():
    dictionary = {"mean_best_auroc": 0.9, "fraction_detected": 0.5}

    def baseline(auroc: float, detected: float) -> dict:
        return {
            "values": ["shape=circle"],
            "best_auroc": [auroc],
            "directions": 4,
            "fraction_detected": detected,
            "mean_best_auroc": auroc,
            "mean_ap": 0.1,
            "mean_purity": 0.2,
            "mean_coverage": 0.3,
        }

    row = margin_columns(
        dictionary, {"raw": baseline(0.8, 0.0), "pca": baseline(0.85, 0.0), "kmeans": baseline(0.7, 1.0)}
    )
    assert row["gt_best_baseline"] == "pca" and row["gt_baseline_mean_best_auroc"] == 0.85
    assert row["gt_margin_auroc"] == pytest.approx(0.05)
    assert row["gt_baseline_fraction_detected"] == 1.0 and row["gt_margin_detected"] == pytest.approx(-0.5)
    detail = json.loads(row["gt_baselines"])
    assert detail["kmeans"]["best_auroc"] == {"shape=circle": 0.7} and detail["raw"]["directions"] == 4
    assert margin_columns(dictionary, {}) == {}


def test_baselines_config():
    assert EvalConfig().baselines == ["raw", "pca", "kmeans", "random"] and EvalConfig().gt_min_coverage == 0.5
    with pytest.raises(ValueError, match="baselines must be distinct; repeated: raw") as err:
        EvalConfig(baselines=["raw", "raw", "pca"])
    assert str(err.value).count("['raw', 'raw', 'pca']") <= 1, "the values once (pydantic adds its own 'got')"
    with pytest.raises(ValueError, match="baselines"):
        EvalConfig(baselines=["ica"])


def test_the_sweeps_detectors_come_from_the_same_ranking_as_the_per_value_best(monkeypatch):
    """The evaluator asks `factor_recovery(..., detectors=True)` for both the per-value best latents and the detector
    latents: each live latent column is ranked once (not once per question), and the detectors equal
    `detector_latents`' own."""
    from prisma_ray.evaluate import ground_truth

    shape = circles(400)
    rng = np.random.default_rng(0)
    latents = np.maximum(rng.normal(size=(len(shape), 600)), 0)  # three chunks of 256 columns
    latents[:, 7] = np.where(shape == "circle", 1.0 + rng.random(len(shape)), 0.0)
    latents[:, 9] = np.where(shape == "square", 1.0, 0.0)
    latents[:, 11] = 0.0  # never fires: not ranked
    ranked = []
    real_ranks = ground_truth.average_ranks
    monkeypatch.setattr(ground_truth, "average_ranks", lambda s: ranked.append(s.shape[1]) or real_ranks(s))
    result = factor_recovery(latents, {"shape": shape}, detectors=True)
    assert sum(ranked) == 599
    found = result.pop("detectors")
    assert [(d.latent, d.value) for d in found] == [(7, "circle"), (9, "square")]
    assert found == ground_truth.detector_latents(latents, {"shape": shape})
    assert result == factor_recovery(latents, {"shape": shape})
    assert result["best_latent"] == [7, 9]
