"""The checkpoint sweep on a local Ray: 3 small models x 4 checkpoints, each model loaded once,
table + leaderboard + plots, resuming, failures, and clear errors for bad configs and URIs."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from prisma_ray.cli import main
from prisma_ray.evaluate.sweep import SweepConfig, run_sweep
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, write_files
from prisma_ray.storage import MissingInputError
from tests.tiny_models import tiny_videomae, tiny_vit
from tests.unit.test_evaluate_checkpoint import extract_in_process, shapes_config

HOOK = "blocks.0.hook_resid_post"
TINY_VIT_REG = tiny_vit(
    "test-vit-reg", "vit_small_patch14_reg4_dinov2", "dinov2", image_size=28, patch_size=14, num_classes=6
)
TINY_VIDEOMAE = tiny_videomae("test-videomae-cls", "VideoMAEForVideoClassification", num_labels=8)
MODELS = ["test-videomae-cls", "test-vit-reg", "test-vit-tiny"]
KS = [2, 4, 8, 16]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_topk(root: Path, model: str, k: int, seed: int = 0) -> str:
    d = Dictionary(
        DictionaryConfig(architecture="topk", d_sae=64, k=k, seed=seed, name=f"topk-{k}-s{seed}"),
        Sites(inputs=(Site(name=HOOK, width=32, model=model),)),
    )
    uri = str(root / model / f"topk-{k}-s{seed}")
    write_files(export_files(d, tokens=1000), uri)
    return uri


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    extract_in_process(shapes_config(root, hooks=[HOOK], n=8))
    extract_in_process(shapes_config(root, model=TINY_VIT_REG, hooks=[HOOK], n=8))
    clips = dict(
        type="synthetic",
        uri=str(root / "clips"),
        generator=dict(name="moving-shapes", n_clips=4, image_size=32, num_frames=4),
    )
    extract_in_process(shapes_config(root, model=TINY_VIDEOMAE, hooks=[HOOK], dataset=clips))
    for model in MODELS:
        for k in KS:
            save_topk(root / "ckpts", model, k)
    return root


def sweep_config(root: Path, output: str = "out", **extra) -> SweepConfig:
    evaluation = dict(stores=str(root / "acts"), split="test", max_tokens=256, splice_samples=4, splice_batch_size=4)
    return SweepConfig.model_validate(
        {
            "checkpoints": [str(root / "ckpts")],
            "output": str(root / output),
            "evaluation": evaluation,
            "resources": {"actors": 2},
            "progress": False,
            **extra,
        }
    )


@pytest.mark.slow
def test_sweep_loads_each_model_once_writes_the_report_and_resumes(ray_local, workspace):
    summary = run_sweep(sweep_config(workspace))
    assert summary.failed == [] and (summary.found, summary.evaluated, summary.skipped) == (12, 12, 0)
    assert summary.model_loads == {m: 1 for m in MODELS}, "each model loaded once for its 4 checkpoints"

    table = pq.read_table(workspace / "out" / "metrics.parquet").to_pylist()
    assert len(table) == 12 and sorted({r["model"] for r in table}) == MODELS
    for row in table:
        assert 0 < row["l0"] <= row["k"] and row["explained_variance"] < 1 and row["eval_tokens"] > 0
        assert row["loss_recovered"] is not None and row["label_source"] in ("dataset", "clean_top1")
        assert row["gt_values"] > 0
        assert set(json.loads(row["gt_baselines"])) == {"raw", "pca", "kmeans", "random"}
        assert row["gt_best_baseline"] in json.loads(row["gt_baselines"]) and 0 <= row["gt_mean_purity"] <= 1
        margin = row["gt_mean_best_auroc"] - row["gt_baseline_mean_best_auroc"]
        assert row["gt_margin_auroc"] == pytest.approx(margin)
    video = [r for r in table if r["model"] == "test-videomae-cls"]
    assert any(json.loads(r["gt_detail"]) and "direction=" in r["gt_detail"] for r in video), "video ground truth"
    assert all(r["gt_image_units"] > 0 and r["gt_image_values"] > 0 for r in table)
    assert all(r["gt_track_units"] > 0 and "direction=" in r["gt_track_detail"] for r in video), "tracks"
    assert all(r["stability"] is None for r in table), "no two checkpoints differ only in seed yet"
    page = (workspace / "out" / "leaderboard.html").read_text()
    assert page.count("<tr>") == 13 and all(r["checkpoint"] in page for r in table)
    assert "<th>gt_margin_auroc</th>" in page and "<th>gt_best_baseline</th>" in page
    line = next(x for x in summary.format().splitlines() if x.startswith("ground truth best "))
    assert "of the factor values (AUROC >= 0.95)" in line and "; baselines: mean best AUROC " in line
    assert line.endswith(" detected)") and " (margin " in line
    plots = sorted(p.name for p in (workspace / "out" / "plots").iterdir())
    assert plots == [f"{m}__{HOOK}.png" for m in MODELS]
    assert all((workspace / "out" / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    # three models: the leaderboard across models and the cross-model page beside the leaderboard
    assert summary.cross_model == f"{workspace / 'out'}/cross_model.html"
    assert f"cross-model  {summary.cross_model}" in summary.format().splitlines()
    board = pq.read_table(workspace / "out" / "cross_model.parquet").to_pylist()
    assert [(r["model"], r["checkpoints"]) for r in board] == [(m, 4) for m in MODELS]
    assert all(r["best_explained_variance"] is not None and r["gt_fraction_detected"] is not None for r in board)
    pairs = {
        (p["model_a"], p["model_b"]): p
        for p in pq.read_table(workspace / "out" / "cross_model_pairs.parquet").to_pylist()
    }
    assert sorted(pairs) == [(a, b) for i, a in enumerate(MODELS) for b in MODELS[i + 1 :]]
    assert (
        pairs["test-vit-reg", "test-vit-tiny"]["images"] > 0
        and pairs["test-videomae-cls", "test-vit-reg"]["images"] == 0
    )
    assert all(p["decoder_cosine"] is not None for p in pairs.values()), "equal widths: 32"
    assert "Shared features" in (workspace / "out" / "cross_model.html").read_text()

    # resume: a new checkpoint of one model, and one whose result was lost, are all that run again
    save_topk(workspace / "ckpts", "test-vit-tiny", 4, seed=1)
    lost = next((workspace / "out" / "results").iterdir())
    lost_model = pq.read_table(lost).column("model")[0].as_py()
    lost.unlink()
    again = run_sweep(sweep_config(workspace))
    assert (again.found, again.evaluated, again.skipped) == (13, 2, 11)
    assert again.model_loads == {m: 1 for m in {"test-vit-tiny", lost_model}}
    rows = pq.read_table(workspace / "out" / "metrics.parquet").to_pylist()
    assert len(rows) == 13
    seeded = {r["name"]: r["stability"] for r in rows if r["model"] == "test-vit-tiny" and r["k"] == 4}
    assert set(seeded) == {"topk-4-s0", "topk-4-s1"} and seeded["topk-4-s0"] == seeded["topk-4-s1"] is not None
    assert sum(r["stability"] is not None for r in rows) == 2, "the new seed and its sibling only"
    done = run_sweep(sweep_config(workspace))
    assert (done.evaluated, done.skipped, done.model_loads) == (0, 13, {})

    changed = sweep_config(workspace)
    changed.evaluation.max_tokens = 128
    with pytest.raises(ValueError, match="different evaluation config .*max_tokens"):
        run_sweep(changed)


@pytest.mark.slow
def test_failing_checkpoints_are_recorded_and_retried(ray_local, workspace, tmp_path, capsys):
    d = Dictionary(
        DictionaryConfig(architecture="relu", d_sae=64),
        Sites(inputs=(Site(name="blocks.1.hook_mlp_out", width=32, model="test-vit-tiny"),)),
    )
    write_files(export_files(d), str(tmp_path / "ckpts" / "no-store"))
    save_topk(tmp_path / "ckpts", "test-vit-tiny", 2)
    cfg = sweep_config(workspace, checkpoints=[str(tmp_path / "ckpts")], output=str(tmp_path / "out"))
    summary = run_sweep(cfg)
    assert summary.evaluated == 1
    assert [f["checkpoint"] for f in summary.failed] == [str(tmp_path / "ckpts" / "no-store")]
    assert "blocks.1.hook_mlp_out/test/manifest.json" in summary.failed[0]["error"]
    assert json.loads((tmp_path / "out" / "errors.json").read_text()) == summary.failed
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["sweep", str(config)]) == 1, "the command fails while a checkpoint fails"
    out = capsys.readouterr().out
    assert "2 found, 0 evaluated, 1 already done, 1 failed" in out, "the failure is retried, the success kept"
    assert f"failed       {tmp_path / 'ckpts' / 'no-store'}: MissingInputError" in out


def test_bad_config_and_missing_uri_errors_are_clear(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"checkpoints": [str(tmp_path / "nowhere")], "output": str(tmp_path / "out")}))
    assert main(["sweep", str(config)]) == 2
    assert f"{tmp_path / 'nowhere'}: no such file or directory" in capsys.readouterr().err

    config.write_text(yaml.safe_dump({"checkpoints": ["x"], "evaluation": {"max_token": 5}}))
    assert main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Invalid config" in err and "evaluation.max_token" in err

    assert main(["sweep", str(config), "--set", "checkpoints=[]", "--set", "evaluation={}"]) == 2
    assert "checkpoints" in capsys.readouterr().err

    assert main(["sweep", "--set", 'checkpoints=["s3://b/{model}"]']) == 2
    assert "holds {model} but no `models` are selected" in capsys.readouterr().err

    (tmp_path / "ckpts").mkdir()
    with pytest.raises(MissingInputError, match="no checkpoints"):
        run_sweep(SweepConfig(checkpoints=[str(tmp_path / "ckpts")], output=str(tmp_path / "out")))
