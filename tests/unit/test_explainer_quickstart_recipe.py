"""Issue 18 on the quickstart's own run: the offline explainer against ground truth on the toy ViT's detector latents.

The quickstart's recipe (`benchmarks/explainer_agreement.py --recipe toy-quickstart`, `ToyQuickstart`): every token of
its 1,024 training images at `blocks.2.hook_resid_post` of `prisma-toy-vit-shapes` (float16, as stored), its largest
TopK dictionary (k 32, the one with the best held-out explained variance, which the quickstart explains) trained as
the training job trains it (24 epochs of 1,024 tokens), explained by the default `prisma-ray explain` pipeline on the
quickstart's 128 held-out images. Detector latents: each latent whose best shape or colour value has patch AUROC >=
0.95, counted once (`scoring.detector_latents`). Measured (README): 14 detector latents, agreement with their best
value 0.71 (0.93 naming some value they detect at AUROC >= 0.95), detection balanced accuracy 0.94, largest label
share 0.36; the quickstart's own count over the sweep's per-value best latents, 0.50 of 12. The top 8 images of only
0.64 of those latents show their best value most often (the evidence ceiling), so an explainer that names what the top
images show cannot reach 0.8 on them; the explanations name a most-shown value for 0.71.
"""

import collections

import pytest
import torch

from tests import benchmark_scripts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def measured():
    bench = benchmark_scripts.load("explainer_agreement")
    threads = torch.get_num_threads()
    try:  # small matrices on a shared 2-core machine: one thread
        out = bench.measure_toy_quickstart(bench.ToyQuickstart(min_k=32), threads=1, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    print({k: v for k, v in out.items() if k != "rows"})
    return out


def test_explanations_of_the_quickstarts_detector_latents_detect_and_do_not_collapse(measured):
    assert measured["dictionary"] == "topk-k-32" and measured["detectors"] >= 8
    assert measured["detection"] >= 0.8 > measured["random_detection"]
    assert measured["largest_label_share"] <= 0.5, measured["labels"]
    assert measured["agreement_any_detected"] >= 0.8
    assert measured["agreement"] >= 0.6 > measured["random_agreement"]
    assert measured["evidence_ceiling"] < 0.8 and measured["fidelity"] >= 0.7


def test_read_out_figures_count_what_the_top_images_show():
    bench = benchmark_scripts.load("explainer_agreement")
    shown = collections.Counter({"cross": 5, "star": 2, "red": 4, "blue": 4})
    assert bench.most_shown(shown, "cross") and not bench.most_shown(shown, "star")
    assert bench.most_shown(shown, "red") and bench.most_shown(shown, "blue")  # ties are most shown
    assert not bench.most_shown(shown, "circle")
    rows = [
        {"shown": shown, "value": "star", "text": "cross"},  # reads its images, its best value is not shown most
        {"shown": shown, "value": "red", "text": "star"},
    ]
    figures = bench.read_out_figures(rows, ["star", "cross", "circle", "red", "blue"])
    assert figures == {"evidence_ceiling": 0.5, "fidelity": 0.5}


@pytest.mark.xfail(
    strict=True,
    reason="issue 18 open on the toy ViT: 0.71 of the quickstart's detector latents are named by their best value; the "
    "top 8 images of only 0.64 of them show their best value most often (evidence ceiling), so no read-out of those "
    "images reaches 0.8 (README, Auto-interpretation)",
)
def test_explanations_name_the_best_value_of_80_percent_of_the_quickstarts_detector_latents(measured):
    assert measured["agreement"] >= 0.8
