"""The campaign's planning, state and in-process stages, without Ray."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from pydantic import ValidationError

from prisma_ray.campaign import CampaignConfig
from prisma_ray.campaign.plan import block_at_depth, hooks_of, plan_model, sweep_config
from prisma_ray.campaign.registry_check import dictionary_seed, estimated_params, registry_config, sample, too_big
from prisma_ray.campaign.stages import MemoryPeak, ModelRunner, run_model
from prisma_ray.campaign.state import (
    STAGES,
    Outcome,
    finished,
    outcome_table,
    read_status,
    with_earlier_seconds,
    write_status,
)
from prisma_ray.errors import InvalidRequest
from prisma_ray.models import default_hook, get_entry, list_entries
from prisma_ray.runtime import pool

TOY = "prisma-toy-vit-shapes"
VIDEO = "prisma-toy-video-moving-shapes"
IMAGES = {"type": "images", "uri": "photos"}


def config(tmp_path, **fields) -> CampaignConfig:
    return CampaignConfig.model_validate({"output": str(tmp_path / "c"), "models": {"names": [TOY]}, **fields})


@pytest.mark.parametrize(
    ("blocks", "depth", "block"), [(12, 0.5, 6), (12, 0.75, 9), (12, 0.0, 0), (12, 1.0, 11), (4, 0.5, 2), (3, 0.5, 2)]
)
def test_block_at_depth_is_the_nearest_block(blocks, depth, block):
    assert block_at_depth(blocks, depth) == block


def test_hooks_by_name_and_depth_per_model(tmp_path):
    cfg = config(tmp_path, hooks=["blocks.1.hook_mlp_out"], depths=[0.5, 0.75])
    vit_b = get_entry("timm-vit-base-patch16-224-augreg2-in21k-ft-in1k")
    assert hooks_of(cfg, vit_b) == ["blocks.1.hook_mlp_out", "blocks.6.hook_resid_post", "blocks.9.hook_resid_post"]
    lmm = get_entry("hf-llava-onevision-qwen2-0.5b-ov")
    blocks = lmm.config["text_config"]["num_hidden_layers"]
    assert hooks_of(config(tmp_path, depths=[1.0]), lmm) == [f"lm.blocks.{blocks - 1}.hook_resid_post"]
    # no hooks and no depths: half depth, the block every job reads by default
    assert hooks_of(config(tmp_path), vit_b) == [default_hook(vit_b)]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"depths": [0.5, 1.5]}, r"depths \[1.5\] are not in \[0, 1\]"),
        ({"weights": {"pretrained": True, "checkpoint": "w.safetensors"}}, "not both"),
        ({"data": {"audio": {"train": IMAGES, "test": IMAGES}}}, r"modalities \['audio'\]"),
        ({"models": {}}, "no model: give models"),
        ({"entries": {"a": {"model": TOY}, "b": {"model": TOY}}}, "entries a and b both run prisma-toy-vit-shapes"),
        (
            {"entries": {"a": {"model": TOY, "root": "r"}, "b": {"model": VIDEO, "root": "r", "eval_tokens": 8}}},
            "share root 'r'",
        ),
        ({"entries": {"a": {"model": TOY, "root": "/abs"}}}, "must be a relative sub-folder"),
    ],
)
def test_bad_config_names_the_input(tmp_path, fields, match):
    with pytest.raises(ValidationError, match=match):
        config(tmp_path, **fields)


def test_the_registry_check_gives_each_models_dictionaries_a_seed_of_its_own(tmp_path):
    """Two models' dictionaries of one width must not start from one decoder; each model's seed is the same in
    every run, whatever the other models."""
    cfg = registry_config([TOY, VIDEO], str(tmp_path / "c"))
    seeds = {name: [d.seed for d in plan_model(cfg, name, "cpu", 1).trains[0].dictionaries] for name in (TOY, VIDEO)}
    assert seeds == {TOY: [dictionary_seed(TOY)], VIDEO: [dictionary_seed(VIDEO)]}
    assert seeds[TOY] != seeds[VIDEO]
    alone = registry_config([TOY], str(tmp_path / "d"))
    assert [d.seed for d in plan_model(alone, TOY, "cpu", 1).trains[0].dictionaries] == seeds[TOY]


def test_model_sized_data_must_be_synthetic(tmp_path):
    images = IMAGES
    with pytest.raises(ValidationError, match="at_model_size: true needs synthetic"):
        config(tmp_path, data={"image": {"train": images, "test": images, "at_model_size": True}})


def test_plan_model_stages(tmp_path):
    cfg = registry_config([TOY, VIDEO], str(tmp_path / "c"))
    cfg = cfg.model_copy(update={"model_weights": {TOY: cfg.weights.model_copy(update={"seed": 3})}})
    plan = plan_model(cfg, TOY, "cpu", 1)
    entry = get_entry(TOY)
    train, test = plan.extracts
    assert (train.split, test.split, train.pretrained, train.seed, train.hooks) == (
        "train",
        "test",
        False,
        3,
        [f"blocks.{entry.layers // 2}.hook_resid_post"],
    )
    grid = entry.image_size // entry.patch_size
    assert train.dataset.uri.endswith(f"shapes-train-{entry.image_size}px-{entry.patch_size}")
    assert train.dataset.generator.image_size == entry.image_size
    assert train.dataset.generator.patch_grid == (grid, grid)
    (job,) = plan.trains
    assert job.workers == 0 and job.output.endswith(f"dictionaries/{TOY}/{train.hooks[0]}")
    assert plan.sweep.output == cfg.uri("sweep") and plan.sweep.checkpoints == [cfg.uri("dictionaries", TOY)]
    assert plan.sweep.models.names == [TOY]
    # the last sweep over every dictionary keeps to the selected models, and alone writes the page across them
    assert sweep_config(cfg, [cfg.uri("dictionaries")]).models.names == [VIDEO, TOY]
    assert sweep_config(cfg, [cfg.uri("dictionaries")]).cross_model and not plan.sweep.cross_model


def test_the_last_sweeps_write_each_roots_page_across_models_once(tmp_path, monkeypatch):
    """Each model's own sweep leaves the cross-model page out; after every model, one sweep per root of two models
    or more (the campaign's own always: its leaderboard) writes it."""
    from types import SimpleNamespace

    from prisma_ray.campaign import run

    shapes = {"type": "synthetic", "uri": "s", "generator": {"name": "shapes", "n_images": 4}}
    data = {"data": {"train": shapes, "test": shapes}}
    cfg = config(
        tmp_path,
        models={"names": [VIDEO]},
        entries={"one": {"model": TOY, "root": "alone", **data}, "a": {"model": TOY, "root": "pair", **data}},
    )
    cfg.entries["b"] = cfg.entries["a"].model_copy(update={"model": VIDEO})
    swept = []

    def sweep(sweep_cfg):
        swept.append((sweep_cfg.output, sweep_cfg.checkpoints, sweep_cfg.cross_model))
        return SimpleNamespace(leaderboard="lb", cross_model="")

    monkeypatch.setattr(run, "ensure_ray", lambda ray: None)
    monkeypatch.setattr(run, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(run, "prepare_data", lambda cfg, names: (names, {}))
    monkeypatch.setattr(run, "run_pool", lambda *args, **kwargs: iter(()))
    monkeypatch.setattr(run, "_has_checkpoints", lambda uri, options: True)
    monkeypatch.setattr(run, "run_sweep", sweep)
    assert run.run_campaign(cfg).leaderboard == "lb"
    assert swept == [
        (cfg.uri("sweep"), [cfg.uri("dictionaries")], True),
        (cfg.uri("pair", "sweep"), [cfg.uri("pair", "dictionaries")], True),
    ]


def test_model_without_data_of_its_modality_is_refused(tmp_path):
    cfg = registry_config([VIDEO], str(tmp_path / "c"))
    cfg = cfg.model_copy(update={"data": {"image": cfg.data["image"]}})
    with pytest.raises(InvalidRequest, match="no video entry; add data.video"):
        plan_model(cfg, VIDEO)


def test_inline_pool_runs_the_worker_here_once(monkeypatch):
    built = []

    class Worker:
        def __init__(self, base):
            built.append(base)
            self.base = base

        def run(self, x):
            return self.base + x

    monkeypatch.setattr(pool, "ray", None)  # no Ray at all within `inline`
    size = pool.PoolSize("cpu", 4, 1.0, 0.5, 1, 2)
    with pool.inline({"CPU": 2.0}):
        assert pool.cluster_resources() == {"CPU": 2.0}
        out = list(
            pool.run_pool(
                [1, 2, 3], Worker, {"base": 10}, size, method="run", read=lambda x, k: x * k, read_kwargs={"k": 2}
            )
        )
    assert out == [12, 14, 16] and built == [10]
    assert not pool.inlined()


def test_failed_model_is_recorded_not_raised(tmp_path):
    """A model whose stage raises returns its error (no Ray is needed to get there)."""
    cfg = registry_config([TOY], str(tmp_path / "c"))
    cfg = cfg.model_copy(update={"weights": cfg.weights.model_copy(update={"checkpoint": str(tmp_path / "no.pt")})})
    outcome = Outcome(**ModelRunner(cfg.model_dump(mode="json"), "cpu", 1).run(TOY))
    assert outcome.error.startswith("MissingInputError:") and "no.pt" in outcome.error
    assert (outcome.reached, outcome.ran, outcome.passed) == ("", [], False)
    assert outcome.peak_mib > 0
    assert not pool.inlined()


def test_nothing_finished_in_an_empty_root_and_status_round_trips(tmp_path):
    cfg = registry_config([TOY], str(tmp_path / "c"))
    plan = plan_model(cfg, TOY)
    assert finished(plan, cfg.uri(), cfg.storage) == dict.fromkeys(STAGES, False)
    outcomes = {TOY: Outcome(model=TOY, reached="dashboard", ran=list(STAGES), seconds={"train": 1.5}, peak_mib=10)}
    write_status(cfg.uri(), outcomes, cfg.storage)
    assert read_status(cfg.uri(), cfg.storage) == outcomes and outcomes[TOY].passed
    lines = outcome_table(list(outcomes.values()))
    assert lines[1].split()[:4] == [TOY, "dashboard", "extract,train,evaluate,dashboard", "1.5"]


def test_memory_peak_keeps_the_highest_resident_memory_sampled(monkeypatch):
    """The sampler keeps the maximum of the process's resident memory over the block (a fake process whose memory
    rises then falls, so the check does not depend on how the allocator reuses freed memory in a long suite)."""
    import time
    from types import SimpleNamespace

    from prisma_ray.campaign import stages

    readings = iter([100, 300, 200])

    class FakeProcess:
        def memory_info(self):
            return SimpleNamespace(rss=next(readings, 200) * 2**20)

    monkeypatch.setattr(stages.psutil, "Process", FakeProcess)
    with MemoryPeak(every=0.01) as peak:
        time.sleep(0.2)
    assert peak.peak_mib == 300


def test_registry_sample_is_one_model_per_source_and_modality():
    names = sample()
    kinds = {(e.source, e.modality) for e in list_entries()}
    assert len(names) == len(kinds) == len({(get_entry(n).source, get_entry(n).modality) for n in names})
    assert "timm-vit-large-patch14-dinov2-518" not in names
    big = get_entry("hf-qwen2-vl-7b-instruct")
    assert estimated_params(big) > 5e9
    assert "not run: about" in too_big(big, 6 * 2**30) and too_big(get_entry(TOY), 6 * 2**30) == ""


def test_run_model_skips_finished_stages(tmp_path, monkeypatch):
    """Stages the stores say are finished are not run again (each stage replaced by a recorder)."""
    from prisma_ray.campaign import stages

    cfg = registry_config([TOY], str(tmp_path / "c"))
    ran = []
    for name in ("extract", "train", "evaluate"):
        monkeypatch.setattr(stages, name, lambda c, p, name=name: ran.append(name))
    monkeypatch.setattr(stages, "dashboard", lambda *a: ran.append("dashboard"))
    monkeypatch.setattr(stages, "best_checkpoint", lambda c, p: "best")
    monkeypatch.setattr(stages, "check_extracted", lambda p: ran.append("check"))
    monkeypatch.setattr(
        stages, "finished", lambda p, r, o: {"extract": True, "train": True, "evaluate": False, "dashboard": False}
    )
    outcome = run_model(cfg, TOY)
    assert ran == ["check", "evaluate", "dashboard"] and outcome.skipped == ["extract", "train"] and outcome.passed
    assert set(outcome.seconds) == set(outcome.cpu_seconds) == {"evaluate", "dashboard"}


@pytest.mark.parametrize("current", [True, False])
def test_a_finished_dashboard_of_another_pass_is_drawn_again(tmp_path, monkeypatch, current):
    """A dashboard's index alone skipped the stage: a rerun whose dashboard data or best dictionary changed kept
    the old site. It is skipped only where its interpretation pass is the one asked for now."""
    from prisma_ray.campaign import stages

    cfg = registry_config([TOY], str(tmp_path / "c"))
    ran = []
    monkeypatch.setattr(stages, "dashboard", lambda *a: ran.append("dashboard"))
    monkeypatch.setattr(stages, "best_checkpoint", lambda c, p: "best")
    monkeypatch.setattr(stages, "check_extracted", lambda p: None)
    monkeypatch.setattr(
        stages, "finished", lambda p, r, o: dict.fromkeys(("extract", "train", "evaluate", "dashboard"), True)
    )
    monkeypatch.setattr(stages, "dashboard_current", lambda *a: current)
    outcome = run_model(cfg, TOY)
    assert ran == ([] if current else ["dashboard"]) and outcome.passed


@pytest.mark.parametrize("earlier, current", [(None, False), (([], {}), True), ((["dataset"], {}), False)])
def test_a_dashboard_is_current_only_with_results_of_the_same_pass(tmp_path, monkeypatch, earlier, current):
    from prisma_ray.campaign import stages

    cfg = registry_config([TOY], str(tmp_path / "c"))
    asked = []
    monkeypatch.setattr(stages, "best_checkpoint", lambda c, p: "best")
    monkeypatch.setattr(stages, "plan_interpret", lambda job: asked.append(job.checkpoint) or job)
    monkeypatch.setattr(stages, "changed_from_results", lambda plan, output: asked.append(output) or earlier)
    assert stages.dashboard_current(cfg, plan_model(cfg, TOY), "cpu", 1) is current
    assert asked == ["best", str(tmp_path / "c" / "interpret" / TOY)]


def test_interpretation_rebuilds_the_model_as_extracted(tmp_path):
    """Random weights at extraction must be random weights (same seed) in the dashboard's pass, not a download."""
    cfg = registry_config([TOY], str(tmp_path / "c"))
    cfg = cfg.model_copy(update={"weights": cfg.weights.model_copy(update={"seed": 7})})
    interpret = plan_model(cfg, TOY).interpret(cfg, str(tmp_path / "ckpt"), "cpu", 1)
    assert (interpret.pretrained, interpret.seed, interpret.weights) == (False, 7, None)
    assert interpret.dataset == plan_model(cfg, TOY).data["test"]


def test_status_keeps_the_seconds_of_stages_done_in_an_earlier_run():
    earlier = Outcome(model=TOY, reached="train", ran=["extract", "train"], seconds={"extract": 3.0, "train": 2.0})
    now = Outcome(model=TOY, reached="dashboard", ran=["evaluate", "dashboard"], skipped=["extract", "train"])
    now.seconds = {"evaluate": 1.0, "dashboard": 0.5}
    assert with_earlier_seconds(now, earlier).seconds == {
        "extract": 3.0,
        "train": 2.0,
        "evaluate": 1.0,
        "dashboard": 0.5,
    }
    assert with_earlier_seconds(Outcome(model=TOY, seconds={"extract": 1.0}), None).seconds == {"extract": 1.0}
    earlier.cpu_seconds, now.cpu_seconds = {"extract": 2.5, "train": 1.0}, {"evaluate": 0.5}
    assert with_earlier_seconds(now, earlier).cpu_seconds == {"extract": 2.5, "train": 1.0, "evaluate": 0.5}
    refused = Outcome(model=TOY, error="StoreConfigMismatch: ...")  # a rerun refused before any stage ran
    assert with_earlier_seconds(refused, earlier).seconds == {"extract": 3.0, "train": 2.0}


def test_entries_run_one_model_on_two_datasets_under_their_own_roots(tmp_path):
    """An entry names its model, data, hooks, dictionaries, epochs and root; a second entry of the same model under
    another root gets its own stores, dictionaries, sweep and dashboard; unset settings are the campaign's."""
    from prisma_ray.campaign import state
    from prisma_ray.campaign.state import dashboard_uri

    shapes = {"type": "synthetic", "uri": "s", "generator": {"name": "shapes", "n_images": 4}}
    photos = {"type": "images", "uri": "photos"}
    grid = [{"architecture": "topk", "k": 4, "expansion_factor": 1}]
    cfg = config(
        tmp_path,
        models={"names": [VIDEO]},
        entries={
            TOY: {"hooks": ["blocks.1.hook_resid_post"], "epochs": 3, "explain": True, "dashboard_data": photos},
            "other": {"model": TOY, "root": "sub", "data": {"train": shapes, "test": shapes}, "dictionaries": grid},
        },
    )
    assert cfg.names() == ["other", VIDEO, TOY] and cfg.root_models() == [VIDEO, TOY]
    main, other = plan_model(cfg, TOY), plan_model(cfg, "other")
    assert (main.name, main.label, other.name, other.label) == (TOY, TOY, TOY, "other")
    assert main.hooks == ("blocks.1.hook_resid_post",) and main.trains[0].epochs == 3 and main.settings.explain
    assert main.data["dashboard"].uri == "photos" and main.interpret(cfg, "c", "cpu", 1).dataset.uri == "photos"
    assert main.data["train"] == cfg.data["image"].train, "no data of its own: the campaign's of its modality"
    assert other.data["train"].uri == "s" and [d.k for d in other.trains[0].dictionaries] == [4]
    assert other.trains[0].epochs == cfg.epochs and not other.settings.explain
    assert other.extracts[0].output == cfg.uri("sub", "activations") and main.extracts[0].output == cfg.uri(
        "activations"
    )
    assert other.sweep.output == cfg.uri("sub", "sweep") and other.sweep.evaluation.stores == cfg.uri(
        "sub", "activations"
    )
    assert other.trains[0].output_uri.startswith(cfg.uri("sub", "dictionaries", TOY))
    assert dashboard_uri(other) == cfg.uri("sub", "dashboard", TOY, "index.html")
    assert other.interpret_uri() == cfg.uri("sub", "interpret", TOY)
    assert state.lost_outcome(other, cfg.uri(), cfg.storage, "its process died").model == "other"
    with pytest.raises(InvalidRequest, match="entry e runs prisma-toy-vit-shapes, which `models` selects too"):
        config(tmp_path, models={"names": [TOY]}, entries={"e": {"model": TOY}}).names()


def test_only_data_that_two_models_share_is_generated_before_the_actors_start(tmp_path):
    """A dataset of one model is generated by its actor's extraction (beside the other actors' work); one that two
    models read is generated once, in the driver, before any actor starts."""
    from prisma_ray.campaign.run import prepare_data

    def shapes(name: str) -> dict:
        return {"type": "synthetic", "uri": str(tmp_path / name), "generator": {"name": "shapes", "n_images": 2}}

    own = {"train": shapes("own-train"), "test": shapes("own-test")}
    shared = {"train": shapes("shared-train"), "test": shapes("shared-test")}
    cfg = config(
        tmp_path,
        models={},
        entries={
            "a": {"model": TOY, "root": "a", "data": own},
            "b": {"model": TOY, "root": "b", "data": shared},
            TOY: {"data": shared},
        },
    )
    assert prepare_data(cfg, cfg.names()) == (["a", "b", TOY], {})
    assert (tmp_path / "shared-train").is_dir() and (tmp_path / "shared-test").is_dir()
    assert not (tmp_path / "own-train").exists() and not (tmp_path / "own-test").exists()


@pytest.mark.parametrize(
    "name, frames, suffix",
    [
        ("hf-timesformer-large-finetuned-k400", 96, "-224px-16-96f"),  # samples 96 frames: clips of 96
        ("hf-videomae-base", 16, "-224px-16"),  # 16 frames, the generator's default: the URI is unchanged
    ],
)
def test_model_sized_clips_hold_the_frames_one_sample_takes(name, frames, suffix):
    """The registry campaign gave TimeSformer-L 16-frame clips, every one rejected as too short."""
    from prisma_ray.campaign.plan import sized
    from prisma_ray.data.sources import SyntheticSource

    spec = SyntheticSource(type="synthetic", uri="/d/moving", generator={"name": "moving-shapes", "n_clips": 1})
    out = sized(spec, get_entry(name))
    assert out.uri == "/d/moving" + suffix and out.generator.num_frames == frames
    assert out.generator.image_size == 224 and out.generator.patch_grid == (14, 14)


def test_a_model_whose_actor_died_is_recorded_with_the_stage_it_died_in(tmp_path, monkeypatch):
    from prisma_ray.campaign import state

    cfg = registry_config([TOY], str(tmp_path / "c"))
    plan = plan_model(cfg, TOY)
    first = state.lost_outcome(plan, cfg.uri(), cfg.storage, "out of memory (Ray's memory monitor killed it)")
    assert first.error.startswith(f"ActorDied: the actor running {TOY} died during extract: out of memory")
    assert (first.reached, first.passed) == ("", False)
    monkeypatch.setattr(state, "finished", lambda p, r, o: dict(zip(STAGES, (True, True, False, False))))
    later = state.lost_outcome(plan, cfg.uri(), cfg.storage, "its process died")
    assert later.reached == "train" and "died during evaluate: its process died" in later.error


def test_a_models_stages_share_one_build_of_it(tmp_path, monkeypatch):
    """Every stage of one model that loads it (extraction of each split, evaluation, the dashboard's pass) gets
    the model built once; the actor holds nothing once the model is done."""
    import weakref

    from prisma_ray.campaign import stages
    from prisma_ray.models import loading

    builds = []
    real = loading.build_sites
    monkeypatch.setattr(loading, "build_sites", lambda *a: builds.append(a[0].name) or real(*a))

    def load(*_):
        return loading.load_model(TOY, pretrained=False, seed=0, device="cpu", dtype=torch.float32)

    seen = []
    for name in ("extract", "train", "evaluate"):
        monkeypatch.setattr(stages, name, lambda c, p: seen.append(load()))
    monkeypatch.setattr(stages, "dashboard", lambda *a: seen.append(load()))
    monkeypatch.setattr(stages, "best_checkpoint", lambda c, p: "best")
    monkeypatch.setattr(stages, "finished", lambda p, r, o: dict.fromkeys(STAGES, False))
    outcome = run_model(registry_config([TOY], str(tmp_path / "c")), TOY)
    assert outcome.passed and len(seen) == 4 and all(m is seen[0] for m in seen) and builds == [TOY]
    held = weakref.ref(seen[0])
    seen.clear()
    assert held() is None, "the model is dropped when its stages are done"
    assert load() is not load(), "outside a campaign's model every load builds"


def test_reuse_holds_one_model_at_a_time():
    import weakref

    from prisma_ray.models import loading
    from prisma_ray.models.reuse import reuse_models

    with reuse_models() as stats:
        a = loading.load_model(TOY, pretrained=False, seed=0)
        assert loading.load_model(TOY, pretrained=False, seed=0) is a
        first = weakref.ref(a)
        del a
        b = loading.load_model(TOY, pretrained=False, seed=1)  # other weights: the first is dropped
        assert first() is None and loading.load_model(TOY, pretrained=False, seed=1) is b
        assert loading.load_model(TOY, pretrained=False, seed=1, dtype=torch.bfloat16) is not b
    assert (stats.builds, stats.reused) == (3, 2)


@pytest.mark.parametrize(
    ("new_train", "error"),
    [("more", "StoreConfigMismatch: .* Changed: dataset"), ("gone", "MissingInputError: .*gone: no such file")],
)
def test_a_rerun_with_changed_or_missing_data_is_refused_not_skipped(tmp_path, monkeypatch, caplog, new_train, error):
    """A campaign rerun whose train data changed (another photo) or is gone reported 'done (nothing to run)' from
    the old stores' manifests, keeping their dictionaries and leaderboard; it is refused per model as `extract`
    refuses it, before any stage runs."""
    from PIL import Image

    from prisma_ray.campaign import stages
    from prisma_ray.extract.plan import plan_extract

    def photos(name: str, n: int) -> dict:
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / name / f"{i}.png")
        return {"type": "images", "uri": str(tmp_path / name)}

    data = {"image": {"train": photos("train", 1), "test": photos("test", 1)}}
    cfg = config(tmp_path, data=data)
    caplog.set_level(logging.INFO)
    for job in plan_model(cfg, TOY).extracts:  # the stores as a finished extraction leaves them
        for writer in plan_extract(job).writers.values():
            (tmp_path / writer.uri / "manifest.json").write_text("{}")
    assert f"{TOY}: 1 sample in 1 shard, 1 pending" in caplog.text, "not '1 shards'"
    ran = []
    for name in ("extract", "train", "evaluate"):
        monkeypatch.setattr(stages, name, lambda c, p, name=name: ran.append(name))
    monkeypatch.setattr(stages, "dashboard", lambda *a: ran.append("dashboard"))
    data["image"]["train"] = photos("more", 2) if new_train == "more" else {**IMAGES, "uri": str(tmp_path / "gone")}
    outcome = run_model(config(tmp_path, data=data), TOY)
    assert re.match(error, outcome.error) and ran == [] and not outcome.passed
