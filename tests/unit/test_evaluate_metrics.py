"""Metric functions against values computed by hand."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from prisma_ray.data.decode import FrameSampling
from prisma_ray.evaluate.ground_truth import (
    auroc,
    average_ranks,
    factor_recovery,
    grid_cell,
    source_frames,
    token_factors,
)
from prisma_ray.evaluate.metrics import (
    DENSITY_EDGES,
    Reconstruction,
    Sparsity,
    decoder_norm_shares,
    log_density_histogram,
    pareto_front,
    share_summary,
)
from prisma_ray.evaluate.splice import TaskTotals, ZeroShotHead, loss_recovered, summarize
from prisma_ray.models import TokenKind, TokenLayout


def test_reconstruction_by_hand_and_streamed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    whole, streamed = Reconstruction(), Reconstruction()
    whole.update(x, x_hat)
    streamed.update(x[:1], x_hat[:1])
    streamed.update(x[1:], x_hat[1:])
    cos = (3 / math.sqrt(10) + 29 / (5 * math.sqrt(34))) / 2
    for acc in (whole, streamed):
        assert acc.mse == pytest.approx(0.5)
        # about the per-dimension mean [2, 3]: total variance 4 (about zero it would be 30)
        assert acc.total_variance == pytest.approx(4.0)
        assert acc.explained_variance == pytest.approx(0.5)
        assert acc.cosine == pytest.approx(cos)


def test_sparsity_by_hand():
    z = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 3.0, 0, 0], [1.0, 0, 0, 0]])
    acc = Sparsity(4)
    acc.update(z[:2])
    acc.update(z[2:])
    summary = acc.summary(dense_threshold=0.5)
    assert summary["l0"] == pytest.approx(1.0)
    assert summary["dead_fraction"] == pytest.approx(0.5)
    assert summary["dense_fraction"] == pytest.approx(0.25)
    hist = summary["density_hist"]
    assert len(hist) == len(DENSITY_EDGES) - 1 and sum(hist) == 4
    assert hist[0] == 2, "dead latents fall in the lowest bin"
    assert hist[18] == 1 and hist[19] == 1, "densities 0.25 (log -0.60) and 0.75 (log -0.12)"


def test_log_density_histogram_edges():
    counts = log_density_histogram(np.array([1.0, 1e-3, 1e-12]))
    assert counts[-1] == 1 and counts[14] == 1 and counts[0] == 1


def test_decoder_norm_shares_and_summary():
    W_dec = torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 0, 2.0], [1.0, 0, 1.0, 0]])
    shares = decoder_norm_shares(W_dec, [(0, 2), (2, 4)])
    torch.testing.assert_close(shares, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64))
    summary = share_summary(shares, ["a", "b"])
    assert summary["specific"] == pytest.approx({"a": 1 / 3, "b": 1 / 3})
    assert summary["shared"] == pytest.approx(1 / 3)
    assert summary["mean_share"] == pytest.approx({"a": 0.5, "b": 0.5})
    assert summary["hist"]["a"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def test_pareto_front():
    cost = np.array([1, 2, 3, 2, np.nan, 1])
    value = np.array([0.5, 0.8, 0.7, 0.6, 0.99, 0.5])
    assert pareto_front(cost, value).tolist() == [True, True, False, False, False, True]


def test_loss_recovered_and_task_totals():
    assert loss_recovered(1.0, 1.0, 3.0) == 1.0
    assert loss_recovered(1.0, 3.0, 3.0) == 0.0
    assert loss_recovered(1.0, 2.0, 3.0) == 0.5
    assert math.isnan(loss_recovered(1.0, 2.0, 1.0))
    clean = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    same, flat = TaskTotals(), TaskTotals()
    labels = torch.tensor([0, 1])
    same.update(clean, clean, labels)
    flat.update(torch.zeros(2, 2), clean, labels)
    assert same.mean_kl == pytest.approx(0.0, abs=1e-12)
    assert flat.mean_loss == pytest.approx(math.log(2))
    p = torch.tensor([2.0, 0.0]).softmax(0).double()
    assert flat.mean_kl == pytest.approx(float((p * (p.log() - math.log(0.5))).sum()) / 2)
    assert same.top1 == 0.5
    metrics = summarize(same, flat, same, flat)
    assert metrics["loss_recovered"] == pytest.approx(0.0)
    assert metrics["loss_recovered_with_error"] == pytest.approx(1.0)
    assert metrics["top1_delta"] == pytest.approx(0.0)


def test_zero_shot_head_is_scaled_cosine():
    head = ZeroShotHead(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), logit_scale=10.0)
    logits = head(torch.tensor([[5.0, 0.0]]))
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0, 10 / math.sqrt(2)]]))
    with pytest.raises(ValueError, match="share the embedding width"):
        head(torch.zeros(1, 3))


def test_average_ranks_and_auroc_with_ties():
    scores = np.array([[0.0, 3.0], [0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
    assert average_ranks(scores)[:, 0].tolist() == [1.5, 1.5, 3.0, 4.0]
    positives = np.array([[False], [True], [True], [True]])
    # column 0: positives {0, 1, 2} vs negative {0}: (0.5 + 1 + 1) / 3
    np.testing.assert_allclose(auroc(scores, positives), [[2.5 / 3], [0.0]])


def test_factor_recovery_best_latent_and_fraction():
    shape = np.array(["circle", "circle", "square", "square", None, None], dtype=object)
    latents = np.array(
        [
            [0.0, 5.0, 0.0],
            [0.0, 4.0, 0.0],
            [1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0],
        ]
    )
    result = factor_recovery(latents, {"shape": shape}, threshold=0.95)
    assert result["values"] == ["shape=circle", "shape=square"]
    assert result["best_latent"][0] == 1 and result["best_auroc"][0] == pytest.approx(1.0)
    # square: latent 0 fires on one of the two squares and one of the four others: 5 of 8 pairs = 0.625
    assert result["best_latent"][1] == 0 and result["best_auroc"][1] == pytest.approx(0.625)
    assert result["fraction_detected"] == pytest.approx(0.5)
    assert result["mean_best_auroc"] == pytest.approx((1 + 0.625) / 2)


def test_grid_cell_maps_patch_centres_through_the_crop():
    assert grid_cell(np.arange(4), 4, 8).tolist() == [1, 3, 5, 7]
    assert grid_cell(np.arange(8), 8, 8).tolist() == list(range(8))
    assert grid_cell(np.array([0, 3]), 4, 8, crop_pct=0.5).tolist() == [2, 5]


def test_token_factors_joins_patches_and_objects():
    layout = TokenLayout(prefix=(TokenKind.CLS,), grid=(2, 2))
    keys = pa.table(
        {
            "sample_id": ["a"] * 5,
            "token": pa.array([0, 1, 2, 3, 4], pa.int16()),
            "frame": pa.array([-1] * 5, pa.int16()),
        }
    )
    patches = pa.table(
        {
            "sample_id": ["a"] * 4,
            "frame": [-1] * 4,
            "patch_row": [0, 0, 1, 1],
            "patch_col": [0, 1, 0, 1],
            "object": [1, 0, 2, 2],
            "coverage": [0.5, 0.0, 0.9, 0.4],
            "shape": ["star", None, "circle", "circle"],
            "colour": ["red", None, "blue", "blue"],
        }
    )
    objects = pa.table(
        {
            "sample_id": ["a", "a"],
            "frame": pa.array([-1, -1], pa.int16()),
            "object": pa.array([1, 2], pa.int16()),
            "radius": [3.0, 4.0],
        }
    )
    labels = token_factors(keys, layout, patches, objects, (2, 2), ["shape", "radius"])
    assert labels.patch.tolist() == [False, True, True, True, True]
    assert labels.values["shape"].tolist() == [None, "star", None, "circle", "circle"]
    assert labels.values["radius"].tolist() == [None, 3.0, None, 4.0, 4.0]
    np.testing.assert_allclose(labels.coverage, [np.nan, 0.5, 0.0, 0.9, 0.4])
    with pytest.raises(ValueError, match=r"\['speed'\]"):
        token_factors(keys, layout, patches, objects, (2, 2), ["speed"])


def _one_patch_clip() -> tuple[pa.Table, pa.Table, pa.Table]:
    """`(samples, patches, objects)` of clip `c`: 6 frames of one patch whose shape is `s<frame>`."""
    samples = pa.table({"sample_id": ["c"], "num_frames": [6], "fps": [8]})
    patches = pa.table(
        {
            "sample_id": ["c"] * 6,
            "frame": list(range(6)),
            "patch_row": [0] * 6,
            "patch_col": [0] * 6,
            "object": [1] * 6,
            "coverage": [1.0] * 6,
            "shape": [f"s{i}" for i in range(6)],
        }
    )
    return samples, patches, pa.table({"sample_id": ["c"], "frame": [0], "object": [1]})


def test_video_tokens_map_to_source_frames():
    layout = TokenLayout(prefix=(), grid=(1, 1), time=2, tubelet=2)
    keys = pa.table(
        {"sample_id": ["c", "c"], "token": pa.array([0, 1], pa.int16()), "frame": pa.array([0, 2], pa.int16())}
    )
    samples, patches, objects = _one_patch_clip()
    frames = source_frames(samples, FrameSampling(num_frames=4, stride=1, anchor="center"))
    assert frames["c"].tolist() == [1, 2, 3, 4]
    values = token_factors(keys, layout, patches, objects, (1, 1), ["shape"], frames=frames).values
    assert values["shape"].tolist() == ["s1", "s3"], "model frames 0 and 2 are clip frames 1 and 3"


def test_an_image_models_rows_on_video_hold_the_clip_frame():
    """An image model reading a clip frame by frame stores each frame's index in the clip: no mapping."""
    layout = TokenLayout(prefix=(TokenKind.CLS,), grid=(1, 1))
    frame = pa.array([3, 3, 5, 5], pa.int16())
    keys = pa.table({"sample_id": ["c"] * 4, "token": pa.array([0, 1, 0, 1], pa.int16()), "frame": frame})
    samples, patches, objects = _one_patch_clip()
    frames = source_frames(samples, FrameSampling(num_frames=2, stride=2, anchor="start"))
    values = token_factors(keys, layout, patches, objects, (1, 1), ["shape"], frames=frames).values
    assert values["shape"].tolist() == [None, "s3", None, "s5"], "the stored frame is the clip frame"
