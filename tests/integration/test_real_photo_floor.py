"""A floor on real photos: a dictionary trained on the real DINOv2's patch tokens has a face latent.

scikit-image's `lfw_subset` holds 100 faces and 100 non-faces (25x25 grey crops), upscaled here to the
model's 224x224 input by its own preprocessing. A TopK dictionary (`prisma_ray.sae.Trainer`, in process, no
Ray) is trained on the patch tokens of `HOOK` for half the images (50 of each class); each latent scores an
image by its maximum over the image's patches. The latent chosen on the training half (best AUROC there)
must separate the held-out faces from the held-out non-faces with AUROC >= 0.99.

This is a floor, not a discovery: raw dimensions of the residual stream already separate them. Measured
(held out, the column chosen on the training half): dictionary latent 0.998 to 1.000 over seeds 0-2, raw
dimension 0.987 (the best raw dimension on the held-out half itself reaches 1.000, and so does the best latent).
About 45 s wall (41 s CPU) on this 2-core machine, shared: forward passes of 200 images to block 6 and 150
training steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prisma_ray.sae import DictionaryConfig, Normalization, Site, Sites, Trainer
from prisma_ray.sae.trainer import SiteStats
from tests.real_weights import model_input, require

skimage_data, sklearn_metrics, scipy_stats = require("skimage.data", "sklearn.metrics", "scipy.stats")

HOOK = "blocks.6.hook_resid_post"
FLOOR = 0.99
STEPS, BATCH = 150, 256

pytestmark = pytest.mark.slow


def aurocs(scores: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column of `scores [images, columns]` as a detector of `labels` (1: face), from the ranks
    of the positives (Mann-Whitney U, ties averaged)."""
    ranks = scipy_stats.rankdata(scores.numpy(), axis=0)
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return (ranks[positive].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def chosen_on_train(scores: torch.Tensor, labels: np.ndarray, train: np.ndarray) -> tuple[float, int, float]:
    """(held-out AUROC of the column best on the training half, that column, the best held-out AUROC)."""
    on_train, on_test = aurocs(scores[train], labels[train]), aurocs(scores[~train], labels[~train])
    best = int(on_train.argmax())
    held_out = sklearn_metrics.roc_auc_score(labels[~train], scores[~train, best].numpy())
    assert held_out == pytest.approx(on_test[best]), "rank AUROC and sklearn's differ"
    return float(held_out), best, float(on_test.max())


def test_a_latent_of_the_real_models_dictionary_detects_faces(real_dinov2):
    model = real_dinov2[0]
    images = (skimage_data.lfw_subset() * 255).round().clip(0, 255).astype(np.uint8)
    labels = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]  # the first 100 are faces
    train = np.arange(200) % 2 == 0  # 50 faces and 50 non-faces
    x = model_input(model, list(images))
    with torch.no_grad():
        acts = [model.run_with_cache(batch, [HOOK], stop_early=True)[1][HOOK] for batch in x.split(50)]
    tokens = torch.cat(acts)[:, model.token_layout.n_prefix :]  # [images, patches, width]
    width = tokens.shape[-1]

    rows = tokens[torch.from_numpy(train)].reshape(-1, width)
    cfg = DictionaryConfig(architecture="topk", d_sae=2 * width, k=16, lr=1e-3, seed=0)
    norm = Normalization.from_stats([SiteStats.of(rows)], None, "center_scale")
    trainer = Trainer([cfg], Sites(inputs=(Site(name=HOOK, width=width),)), STEPS, norm)
    generator = torch.Generator().manual_seed(0)
    trainer.initialize(rows[torch.randperm(len(rows), generator=generator)[:4096]])
    for _ in range(STEPS):
        trainer.train_step(rows[torch.randint(len(rows), (BATCH,), generator=generator)])
    with torch.no_grad():
        latents = trainer.first.encode(tokens).amax(dim=1)  # [images, latents]: the max over patches

    raw = torch.cat([tokens.amax(dim=1), (-tokens).amax(dim=1)], dim=1)  # every dimension, both signs
    latent_auc, latent, latent_best = chosen_on_train(latents, labels, train)
    raw_auc, dim, raw_best = chosen_on_train(raw, labels, train)
    report = (
        f"held-out AUROC of faces vs non-faces ({HOOK}, max over patches, chosen on the training half): "
        f"dictionary latent {latent} {latent_auc:.4f} (best held-out latent {latent_best:.4f}); raw dimension "
        f"{dim % width}{'-' if dim >= width else '+'} {raw_auc:.4f} (best held-out {raw_best:.4f})"
    )
    print(report)
    assert latent_auc >= FLOOR, report
