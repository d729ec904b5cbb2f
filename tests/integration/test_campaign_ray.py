"""`run_campaign` on the local Ray: the registry check's campaign (random weights, tiny data at each model's input
size, half depth, a few steps, splicing, a dashboard) over one model per source and modality that CI can afford,
a model that fails among them, and a rerun that does no work."""

from __future__ import annotations

import os

import pytest

from prisma_ray.campaign.registry_check import registry_config
from prisma_ray.campaign.run import run_campaign
from prisma_ray.campaign.state import STAGES

pytestmark = pytest.mark.slow

# The registry check's sample (`registry_check.sample`) as far as 2 CI cores afford it: the embedded image and video
# models through every stage, and the smallest timm model given a weights file that does not exist (the
# benchmark runs the whole sample through every stage).
MODELS = ["prisma-toy-vit-shapes", "prisma-toy-video-moving-shapes", "timm-deit-tiny-distilled-patch16-224-fb-in1k"]
BROKEN = "timm-deit-tiny-distilled-patch16-224-fb-in1k"


def _mtimes(root: str, folder: str) -> dict[str, float]:
    top = os.path.join(root, folder)
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(top) for f in files}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    cfg = registry_config(MODELS, str(tmp_path_factory.mktemp("campaign")))
    weights = {BROKEN: cfg.weights.model_copy(update={"checkpoint": cfg.uri("missing.safetensors")})}
    cfg = cfg.model_copy(update={"model_weights": weights})
    first = run_campaign(cfg)
    before = {f: _mtimes(cfg.uri(), f) for f in ("activations", "dictionaries", "dashboard")}
    second = run_campaign(cfg)
    after = {f: _mtimes(cfg.uri(), f) for f in ("activations", "dictionaries", "dashboard")}
    return cfg, first, second, before, after


def test_every_model_through_every_stage_and_a_failure_recorded(runs):
    cfg, first, _, _, _ = runs
    outcomes = {o.model: o for o in first.outcomes}
    assert sorted(outcomes) == sorted(MODELS)
    assert outcomes[BROKEN].error.startswith("MissingInputError:") and not outcomes[BROKEN].ran
    for name in set(MODELS) - {BROKEN}:
        o = outcomes[name]
        assert (o.error, o.ran) == ("", list(STAGES)), o
        assert os.path.exists(o.dashboard) and o.best.startswith(cfg.uri("dictionaries", name))
    assert first.passed == len(MODELS) - 1 and [o.model for o in first.failed] == [BROKEN]
    board = open(first.leaderboard).read()
    assert all(name in board for name in set(MODELS) - {BROKEN})
    assert '"error": "MissingInputError' in open(first.status).read()
    assert first.cross_model.endswith("cross_model.html") and os.path.exists(first.cross_model), "two models: one page"


def test_rerun_skips_finished_work(runs):
    _, _, second, before, after = runs
    for o in second.outcomes:
        if o.model != BROKEN:
            assert (o.ran, o.skipped, o.error) == ([], list(STAGES), ""), o
    assert before == after and before["activations"] and before["dictionaries"]
