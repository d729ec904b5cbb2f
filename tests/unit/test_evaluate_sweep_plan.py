"""Sweep planning without Ray: model selection, `{model}` URIs, checkpoint discovery, grouping, resuming."""

import json
import logging
from pathlib import Path

import pytest

from prisma_ray.config import load_config
from prisma_ray.errors import PrismaRayError
from prisma_ray.evaluate import find_checkpoints, read_checkpoint_info
from prisma_ray.evaluate.results import ResultStore
from prisma_ray.evaluate.sweep import ModelSelection, SweepConfig, checkpoint_roots, plan_sweep
from prisma_ray.models import UnknownModel
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, write_files
from prisma_ray.storage import MissingInputError

REPO = Path(__file__).resolve().parents[2]
TOY_IMAGE, TOY_VIDEO = "prisma-toy-vit-shapes", "prisma-toy-video-moving-shapes"


def save(uri: Path, model: str, hook: str = "blocks.1.hook_resid_post", k: int = 4) -> str:
    d = Dictionary(
        DictionaryConfig(architecture="topk", d_sae=16, k=k), Sites(inputs=(Site(name=hook, width=8, model=model),))
    )
    write_files(export_files(d), str(uri))
    return str(uri)


def test_model_selection_by_name_family_modality_source():
    assert ModelSelection(family="toy-vit").resolve() == [TOY_IMAGE]
    assert ModelSelection(modality="video", source="prisma").resolve() == [TOY_VIDEO]
    assert ModelSelection(names=[TOY_IMAGE], family=["videomae"], source="prisma").resolve() == [TOY_VIDEO, TOY_IMAGE]
    assert len(ModelSelection(modality="image").resolve()) > 90
    with pytest.raises(UnknownModel, match="no-such-model"):
        ModelSelection(names=["no-such-model"]).resolve()
    with pytest.raises(ValueError, match=r"unknown model families \['vitt'\]"):
        ModelSelection(family="vitt").resolve()


def test_example_config_covers_the_registry_image_models():
    cfg = load_config(SweepConfig, REPO / "jobs" / "sweep_checkpoints.yaml")
    roots = checkpoint_roots(cfg)
    assert len(roots) > 90 and ("s3://my-bucket/runs/prisma-toy-vit-shapes", False) in roots
    assert cfg.evaluation.stores == "s3://my-bucket/acts" and cfg.evaluation.split == "test"


def test_find_checkpoints_and_read_their_config(tmp_path):
    save(tmp_path / "run" / "a", TOY_IMAGE)
    save(tmp_path / "run" / "deep" / "checkpoint_000001" / "b", TOY_IMAGE, k=2)
    (tmp_path / "run" / "partial").mkdir()
    (tmp_path / "run" / "partial" / "cfg.json").write_text("{}")
    found = find_checkpoints(str(tmp_path / "run"))
    assert found == [str(tmp_path / "run" / "a"), str(tmp_path / "run" / "deep" / "checkpoint_000001" / "b")]
    assert find_checkpoints(str(tmp_path / "run" / "a")) == [str(tmp_path / "run" / "a")]
    info = read_checkpoint_info(found[1])
    assert (info.name, info.architecture, info.k, info.kind, info.models) == ("b", "topk", 2, "sae", (TOY_IMAGE,))
    with pytest.raises(MissingInputError, match="nowhere"):
        find_checkpoints(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a dictionary checkpoint"):
        read_checkpoint_info(str(tmp_path / "run" / "partial"))


def test_saelens_checkpoints_without_our_metadata(tmp_path):
    uri = save(tmp_path / "sl", TOY_IMAGE)
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    del cfg["metadata"]["prisma_ray"]
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    info = read_checkpoint_info(uri)
    assert info.sites == Sites(inputs=(Site(name="blocks.1.hook_resid_post", width=8, model=TOY_IMAGE),))
    assert (info.name, info.architecture, info.k) == ("sl", "topk", 4)


def test_a_saelens_transcoder_is_discovered_as_one_or_refused(tmp_path):
    """Discovery reads cfg.json as loading does: a transcoder is never taken for an SAE of its input hook.
    Without its output hook it is refused, and the sweep records it as a failure while planning the others."""
    sites = Sites(
        inputs=(Site(name="blocks.1.hook_mlp_in", width=8, model=TOY_IMAGE),),
        outputs=(Site(name="blocks.1.hook_mlp_out", width=8, model=TOY_IMAGE),),
    )
    write_files(export_files(Dictionary(DictionaryConfig(architecture="relu", d_sae=16), sites)), str(tmp_path / "tc"))
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder"
    del cfg["metadata"]["prisma_ray"]
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps(cfg))
    info = read_checkpoint_info(str(tmp_path / "tc"))
    assert (info.kind, info.sites, info.row()["hook_out"]) == ("transcoder", sites, "blocks.1.hook_mlp_out")

    del cfg["metadata"]["hook_name_out"]
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PrismaRayError, match=rf"{tmp_path / 'tc'}.*metadata\.hook_name_out"):
        read_checkpoint_info(str(tmp_path / "tc"))
    good = save(tmp_path / "sae", TOY_IMAGE)
    plan = plan_sweep(SweepConfig(checkpoints=[str(tmp_path)], output=str(tmp_path / "out")))
    assert [g.uris for g in plan.groups] == [[good]], "the readable checkpoint is still evaluated"
    (failure,) = plan.unreadable
    assert failure["checkpoint"] == str(tmp_path / "tc")
    assert "CheckpointConfigError" in failure["error"] and "metadata.hook_name_out" in failure["error"]


def test_plan_expands_model_uris_filters_groups_and_skips_done(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    for k in (2, 4):
        save(tmp_path / "runs" / TOY_IMAGE / f"k{k}", TOY_IMAGE, k=k)
    save(tmp_path / "runs" / TOY_VIDEO / "k2", TOY_VIDEO, k=2)
    save(tmp_path / "other" / "k2", TOY_VIDEO, k=2)
    template = str(tmp_path / "runs" / "{model}")
    cfg = SweepConfig(checkpoints=[template], models=ModelSelection(source="prisma"), output=str(tmp_path / "out"))
    plan = plan_sweep(cfg)
    assert [(g.models, len(g.uris)) for g in plan.groups] == [((TOY_IMAGE,), 2), ((TOY_VIDEO,), 1)], "largest first"

    only_image = cfg.model_copy(
        update={"models": ModelSelection(family="toy-vit"), "checkpoints": [template, str(tmp_path / "other")]}
    )
    assert [g.models for g in plan_sweep(only_image).groups] == [(TOY_IMAGE,)], "other models' checkpoints dropped"
    assert "2 checkpoints found, 0 unreadable, 2 to evaluate in 1 model group\n" in caplog.text + "\n"

    ResultStore(str(tmp_path / "out")).write({"checkpoint": plan.groups[0].uris[0], "model": TOY_IMAGE, "hook": "h"})
    resumed = plan_sweep(cfg)
    assert resumed.pending == 2 and len(resumed.found) == 3

    clip = ModelSelection(family="clip")
    with pytest.raises(MissingInputError, match="no checkpoints"):
        plan_sweep(cfg.model_copy(update={"models": clip}))
    with pytest.raises(MissingInputError, match="selected models"):
        plan_sweep(cfg.model_copy(update={"models": clip, "checkpoints": [str(tmp_path / "other")]}))


def test_a_missing_bucket_under_a_model_template_is_named_once_not_read_as_no_checkpoints(s3, tmp_path, monkeypatch):
    from prisma_ray import storage

    real, checked = storage.require_bucket, []
    monkeypatch.setattr(storage, "require_bucket", lambda uri, options=None: checked.append(uri) or real(uri, options))
    cfg = SweepConfig(
        checkpoints=["s3://no-such-bucket/runs/{model}"],
        models=ModelSelection(source="prisma"),
        output=str(tmp_path / "out"),
        evaluation={"storage": s3.options},
    )
    with pytest.raises(MissingInputError, match="bucket 'no-such-bucket' does not exist"):
        plan_sweep(cfg)
    assert len(checked) == 1, "one check per bucket, not one per model"


def test_a_runs_folder_gives_each_trained_dictionary_once(tmp_path, caplog):
    """`prisma-ray train` leaves each dictionary in its Ray Train checkpoint and in `dictionaries/`: searching the
    runs folder (as the README's sweep example does) found both, and the leaderboard listed every dictionary twice."""
    caplog.set_level(logging.INFO)
    run = tmp_path / "runs" / "real"
    for folder in ("checkpoint_000000030/topk-k-16", "dictionaries/topk-k-16", "checkpoint_000000030/only-here"):
        save(run / folder, TOY_IMAGE)
    assert find_checkpoints(str(tmp_path / "runs")) == [
        str(run / "checkpoint_000000030" / "only-here"),
        str(run / "dictionaries" / "topk-k-16"),
    ]
    assert "1 training-checkpoint copy of a finished dictionary left out" in caplog.text
    checkpoint = run / "checkpoint_000000030"
    assert find_checkpoints(str(checkpoint)) == [str(checkpoint / "only-here"), str(checkpoint / "topk-k-16")]
