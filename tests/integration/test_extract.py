"""The extraction pipeline on one local Ray (and moto S3): equality with an in-process forward pass,
resuming after a crash, bad inputs, video models, failing fast."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from prisma_ray import storage, store
from prisma_ray.cli import main
from prisma_ray.data import list_refs
from prisma_ray.data.errors import read_errors_table
from prisma_ray.data.shards import InputFormat, decode_shard, plan_shards
from prisma_ray.data.sources import with_resolved_storage
from prisma_ray.extract import pipeline as extract_pipeline
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.pipeline import run_extract
from prisma_ray.models import TokenKind, UnknownHookPoint, UnknownModel
from prisma_ray.models.inputs import PixelInputs
from prisma_ray.models.loading import load_model
from prisma_ray.runtime import pool
from tests.conftest import IMAGE_ZOO_MAX_PIXELS
from tests.tiny_models import tiny_videomae, tiny_vit
from tests.unit.test_evaluate_checkpoint import extract_in_process

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = tiny_vit()
TINY_VIDEOMAE = tiny_videomae("test-videomae-tiny", "VideoMAEModel", use_mean_pooling=False)
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def shapes(uri: str, n: int = 20, **extra) -> dict:
    return dict(type="synthetic", uri=uri, generator=dict(name="shapes", n_images=n, image_size=32), **extra)


def cls_config(model: dict, output: str, dataset: dict, shard_size: int) -> dict:
    """An extraction of the CLS token at the first hook point on one actor."""
    return dict(
        model=model,
        hooks=HOOKS[:1],
        tokens=dict(mode="cls"),
        output=output,
        shard_size=shard_size,
        resources=dict(actors=1),
        dataset=dataset,
    )


def read_store(uri: str, options=None) -> pa.Table:
    """Every row of a store, read with plain pyarrow, sorted by (sample_id, token)."""
    fs, path = storage.resolve(uri, options)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.endswith(".parquet"))
    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in files)
    return table.sort_by([("sample_id", "ascending"), ("token", "ascending")])


def acts_of(table: pa.Table) -> np.ndarray:
    column = table.column("act").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), -1)


def in_process(cfg: ExtractConfig) -> dict[str, dict[str, np.ndarray]]:
    """`{hook: {sample_id: float32[tokens, d]}}` from a direct `run_with_cache` on the decoded shards."""
    model = load_model(cfg.model, cfg.pretrained, seed=cfg.seed)
    spec = with_resolved_storage(cfg.dataset)
    out = {h: {} for h in cfg.hooks}
    fmt, inputs = InputFormat.create(spec, model.preprocess), PixelInputs(model)
    for refs in plan_shards(list_refs(spec), spec, 64):
        good = decode_shard(refs, spec, fmt)
        with torch.inference_mode():
            _, cache = model.run_with_cache(inputs.pixels(good.pixels), cfg.hooks)
        for hook in cfg.hooks:
            out[hook].update({sid: cache[hook][i].numpy() for i, sid in enumerate(good.sample_ids)})
    return out


def assert_matches(table: pa.Table, reference: dict[str, np.ndarray], tol: float) -> None:
    expected = np.stack(
        [reference[s][t] for s, t in zip(table.column("sample_id").to_pylist(), table.column("token").to_pylist())]
    )
    np.testing.assert_allclose(acts_of(table), expected, rtol=tol, atol=tol)


def wait_until_unchanged(snapshot, quiet: float = 2.0, limit: float = 60.0) -> None:
    """Return once `snapshot()` has not changed for `quiet` seconds (actors of a killed driver may
    still finish a shard until Ray reaps them)."""
    last, since, deadline = snapshot(), time.monotonic(), time.monotonic() + limit
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()


def files_under(uri: str, options=None) -> list[str]:
    fs, path = storage.resolve(uri, options)
    return [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]


@pytest.mark.slow
def test_s3_pipeline_equals_in_process_forward_and_resumes_idempotently(ray_local, s3):
    cfg = ExtractConfig(
        model=TINY_VIT,
        hooks=HOOKS,
        tokens=dict(mode="random", k=4, seed=3),
        dataset=shapes(s3.uri("data/shapes"), storage=s3.options),
        output=s3.uri("acts"),
        storage=s3.options,
        shard_size=6,
        batch_size=4,
        resources=dict(actors=1),
        progress=False,
    )
    partial = run_extract(cfg.model_copy(update={"max_shards": 3}))
    assert not partial.complete and (partial.shards_run, partial.samples) == (3, 18)
    assert not [f for f in files_under(s3.uri("acts"), s3.options) if f.endswith("manifest.json")]

    summary = run_extract(cfg)
    assert summary.complete and (summary.shards_run, summary.shards_skipped) == (1, 3)
    assert (summary.samples, summary.tokens, summary.errors) == (2, 8, 0)
    assert summary.bytes > 0 and summary.values == 8 * 32 * 2
    reference = in_process(cfg)
    for hook in HOOKS:
        uri = summary.stores[hook]
        assert uri == s3.uri("acts", "test-vit-tiny", hook, "train")
        table = read_store(uri, s3.options)
        assert table.num_rows == 20 * 4, "samples x selected tokens"
        assert table.schema.field("act").type == pa.list_(pa.float16(), 32)
        assert set(table.column("kind").to_pylist()) == {TokenKind.PATCH} and set(
            table.column("frame").to_pylist()
        ) == {-1}
        assert_matches(table, reference[hook], tol=2e-3)
        manifest = store.read_manifest(uri, s3.options)
        assert (manifest.n_samples, manifest.n_tokens, manifest.n_errors, manifest.d_model) == (20, 80, 0, 32)
        assert manifest.dtype == "float16" and manifest.shards == [f"part-{i:05d}.parquet" for i in range(4)]
        np.testing.assert_allclose(manifest.mean, acts_of(table).mean(0), atol=2e-3)
        np.testing.assert_allclose(manifest.std, acts_of(table).std(0, ddof=1), rtol=1e-2, atol=2e-3)
    assert not [f for f in files_under(s3.uri("acts"), s3.options) if ".tmp-" in f], "no temporary objects left"

    again = run_extract(cfg.model_copy(update={"batch_size": 7}))
    assert (again.shards_run, again.shards_skipped, again.samples) == (0, 4, 0) and again.complete
    assert read_store(summary.stores[HOOKS[0]], s3.options).num_rows == 80

    with pytest.raises(store.StoreConfigMismatch, match="Changed: dtype"):
        run_extract(cfg.model_copy(update={"dtype": "float32"}))


def test_the_driver_runs_the_model_itself_without_ray_and_stores_the_same_rows(tmp_path, monkeypatch):
    """`resources.run_in: driver` (what auto picks for one CPU worker on the driver's own machine): no actor, no
    Ray started, the rows those of an in-process forward pass, and a partial run resumed as on actors."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(pool, "ensure_ray", lambda opts: pytest.fail("Ray was started"))
    monkeypatch.setattr(pool, "run_pool", lambda *args, **kwargs: pytest.fail("an actor pool was started"))
    cfg = ExtractConfig(
        model=TINY_VIT,
        hooks=HOOKS,
        dataset=shapes(str(tmp_path / "shapes"), n=10),
        output=str(tmp_path / "out"),
        shard_size=4,
        batch_size=3,
        resources=dict(run_in="driver"),
        progress=False,
    )
    partial = run_extract(cfg.model_copy(update={"max_shards": 2}))
    assert not partial.complete and (partial.shards_run, partial.samples) == (2, 8)
    summary = run_extract(cfg)
    assert summary.complete and (summary.shards_run, summary.shards_skipped, summary.samples) == (1, 2, 2)
    reference = in_process(cfg)
    for hook in HOOKS:
        table = read_store(summary.stores[hook])
        assert table.num_rows == 10 * len(next(iter(reference[hook].values())))
        assert_matches(table, reference[hook], tol=2e-3)
        assert store.read_manifest(summary.stores[hook]).n_samples == 10


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    """A run in one go of a registry model (random weights) on two actors: its config, and its rows and
    manifest per hook."""
    root = tmp_path_factory.mktemp("resume")
    cfg = dict(
        model="timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k",
        hooks=["blocks.3.hook_attn_out", "blocks.11.hook_resid_post"],
        tokens=dict(mode="random", k=8),
        dataset=shapes(str(root / "shapes"), n=24),
        output=str(root / "reference"),
        shard_size=2,
        batch_size=2,
        resources=dict(actors=2),
        progress=False,
    )
    summary = run_extract(ExtractConfig(**cfg))
    assert summary.complete and summary.shards_run == 12
    stores = {hook: (read_store(uri), store.read_manifest(uri)) for hook, uri in summary.stores.items()}
    for rows, manifest in stores.values():
        acts = acts_of(rows)
        np.testing.assert_allclose(manifest.mean, acts.mean(0), atol=1e-2)
        np.testing.assert_allclose(manifest.std, acts.std(0, ddof=1), rtol=1e-2, atol=1e-2)
        assert manifest.mean_norm == pytest.approx(np.linalg.norm(acts, axis=1).mean(), rel=1e-2)
    return cfg, stores


@pytest.mark.slow
def test_killed_job_resumes_to_exactly_the_uninterrupted_rows(uninterrupted, ray_local, tmp_path):
    cfg, reference = uninterrupted
    cfg = {
        **cfg,
        "output": str(tmp_path / "out"),
        "resources": {"actors": 1},
    }  # the actor count does not change the rows
    config = tmp_path / "extract.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = tmp_path / "job.log"
    with log.open("wb") as out:
        job = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "extract_activations.py"), str(config)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    hooks = cfg["hooks"]
    stores = {h: tmp_path / "out" / cfg["model"] / h / "train" for h in hooks}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None and not list(stores[hooks[1]].glob("part-*.parquet")):
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    wait_until_unchanged(lambda: sorted(str(p) for s in stores.values() for p in s.rglob("*")))
    written = sorted(stores[hooks[1]].glob("part-*.parquet"))
    assert 0 < len(written) < 12, (
        f"the job was killed midway ({len(written)} of 12 shards written); its log ends:\n"
        + log.read_text(errors="replace")[-3000:]
    )
    # What a writer killed mid-shard leaves behind: its statistics and a half-written temporary shard.
    assert not (stores[hooks[1]] / "part-00011.parquet").exists()
    half = written[0].read_bytes()[: written[0].stat().st_size // 2]
    (stores[hooks[1]] / ".tmp-0123abcd-part-00011.parquet").write_bytes(half)
    (stores[hooks[1]] / "_stats" / "part-00011.json").write_text('{"count": 5, "mean": [0], "m2": [0], "norm_sum": 0}')
    (stores[hooks[0]] / written[0].name).unlink()

    resumed = run_extract(ExtractConfig(**cfg))
    assert resumed.complete and resumed.shards_run >= 12 - len(written) + 1
    for hook in hooks:
        rows, manifest = reference[hook]
        assert read_store(resumed.stores[hook]).equals(rows), "the uninterrupted run's rows, bit for bit"
        resumed_manifest = store.read_manifest(resumed.stores[hook])
        assert (resumed_manifest.n_samples, resumed_manifest.n_tokens) == (24, 24 * 8)
        assert resumed_manifest.model_dump() == manifest.model_dump(), "same statistics, counts and shards"
    assert not [f for f in files_under(str(tmp_path / "out")) if ".tmp-" in f], "temporary files are cleaned up"


@pytest.mark.slow
def test_bad_inputs_go_to_the_errors_table_and_the_run_completes(ray_local, tmp_path, image_zoo, capsys):
    for name, (data, _) in image_zoo.items():
        (tmp_path / "zoo" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "zoo" / name).write_bytes(data)
    config = tmp_path / "extract.yaml"
    zoo = dict(type="images", uri=str(tmp_path / "zoo"), max_pixels=IMAGE_ZOO_MAX_PIXELS)
    config.write_text(yaml.safe_dump(cls_config(TINY_VIT, str(tmp_path / "out"), zoo, shard_size=5)))
    assert main(["extract", str(config)]) == 0
    bad = {name: reason for name, (_, reason) in image_zoo.items() if reason}
    good = len(image_zoo) - len(bad)
    captured = capsys.readouterr()
    assert "extract: 100%" in captured.err and "3/3" in captured.err, "a progress bar over the 3 shards"
    for line in (
        rf"samples +{good} +\({len(bad)} bad",
        rf"tokens +{good} per hook point",
        r"written +[\d.]+ MiB +\([\d.]+ bytes per activation value\)",
        r"time +[\d.]+ s +\(.* tokens/s",
    ):
        assert re.search(rf"^{line}", captured.out, re.MULTILINE), f"summary line {line!r}"
    uri = str(tmp_path / "out" / "test-vit-tiny" / HOOKS[0] / "train")
    errors = read_errors_table(uri)
    assert dict(zip(errors.column("sample_id").to_pylist(), errors.column("reason").to_pylist())) == bad
    table = read_store(uri)
    assert sorted(table.column("sample_id").to_pylist()) == sorted(set(image_zoo) - set(bad))
    assert set(table.column("kind").to_pylist()) == {TokenKind.CLS}
    assert store.read_manifest(uri).n_errors == len(bad)


@pytest.mark.slow
def test_video_model_writes_frame_indexed_tokens(ray_local, tmp_path):
    cfg = ExtractConfig(
        model=TINY_VIDEOMAE,
        hooks=["blocks.1.hook_resid_post"],
        output=str(tmp_path / "out"),
        shard_size=2,
        resources=dict(actors=1),
        dataset=dict(
            type="synthetic",
            uri=str(tmp_path / "clips"),
            generator=dict(name="moving-shapes", n_clips=4, image_size=32, num_frames=8),
        ),
        progress=False,
    )
    summary = run_extract(cfg)
    assert summary.complete and (summary.samples, summary.tokens) == (4, 4 * 32)
    table = read_store(summary.stores["blocks.1.hook_resid_post"])
    frames = np.asarray(table.column("frame").to_pylist()).reshape(4, 32)
    np.testing.assert_array_equal(frames, np.repeat([[0] * 16 + [2] * 16], 4, axis=0))
    assert set(table.column("kind").to_pylist()) == {TokenKind.PATCH}
    assert_matches(table, in_process(cfg)["blocks.1.hook_resid_post"], tol=2e-3)
    manifest = store.read_manifest(summary.stores["blocks.1.hook_resid_post"])
    assert manifest.token_layout["time"] == 2 and manifest.dataset["frame_sampling"]["num_frames"] == 4


@pytest.mark.slow
def test_activations_beyond_float16_fail_the_run_before_any_shard_is_committed(ray_local, tmp_path, capsys):
    """A residual stream of ~1e6 (LayerScale of 1e8 on random weights): float16 fails naming the store, hook
    point, samples and magnitude, with no shard written; bfloat16 holds it and its manifest's statistics are
    those of the stored values (that run without Ray: the same worker and manifest code as on the pool)."""
    massive = tiny_vit(name="test-vit-massive", init_values=1e8)
    config = {**cls_config(massive, str(tmp_path / "f16"), shapes(str(tmp_path / "shapes"), n=8), 4), "progress": False}
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(config))
    assert main(["extract", str(tmp_path / "extract.yaml")]) == 2
    err = capsys.readouterr().err
    uri = str(tmp_path / "f16" / "test-vit-massive" / HOOKS[0] / "train")
    assert f"error: store {uri} (hook point {HOOKS[0]} of test-vit-massive, input shard" in err
    assert re.search(r"activations of samples '.*' reach magnitude [\d.e+]+, beyond float16's largest value", err)
    assert "bfloat16 holds them" in err
    assert not [f for f in files_under(uri) if f.endswith(".parquet") or "/_stats/" in f], "no shard committed"

    bf16 = ExtractConfig(**{**config, "dtype": "bfloat16", "output": str(tmp_path / "bf16")})
    uri = extract_in_process(bf16)[HOOKS[0]]
    acts = store.read_acts(uri).astype(np.float64)
    assert np.isfinite(acts).all() and np.abs(acts).max() > 65504
    manifest, expected = store.read_manifest(uri), store.RunningStats.of(acts)
    np.testing.assert_allclose(manifest.mean, expected.mean, rtol=1e-9)
    np.testing.assert_allclose(manifest.std, np.sqrt(expected.var), rtol=1e-9)
    assert manifest.mean_norm == pytest.approx(expected.mean_norm, rel=1e-9)


@pytest.mark.parametrize(
    "update,error,match",
    [
        (dict(model="vit-base-clip"), UnknownModel, "Closest names"),
        (dict(hooks=["blocks.7.hook_resid_post"]), UnknownHookPoint, "Unknown hook point"),
        (dict(tokens=dict(mode="random", k=99)), ValueError, "only 16 patch tokens"),
        (dict(dataset=dict(type="images", uri="/nonexistent/images")), storage.MissingInputError, "no such file"),
        (  # an image model reads a video folder frame by frame: which frames must be said
            dict(dataset=dict(type="videos", uri="{tmp}/clips")),
            ValueError,
            "videos need frame sampling",
        ),
    ],
)
def test_bad_configs_fail_before_any_work(tmp_path, monkeypatch, update, error, match):
    monkeypatch.setattr(
        extract_pipeline, "shard_pool", lambda *args: pytest.fail("no pool (nor Ray) before the checks")
    )
    if "{tmp}" in str(update):
        (tmp_path / "clips").mkdir()
        (tmp_path / "clips" / "a.mp4").write_bytes(b"not decoded before the config is checked")
        update = {"dataset": {**update["dataset"], "uri": update["dataset"]["uri"].format(tmp=tmp_path)}}
    cfg = ExtractConfig(
        model=TINY_VIT, hooks=HOOKS, dataset=shapes(str(tmp_path / "shapes")), output=str(tmp_path / "out")
    )
    with pytest.raises(error, match=match):
        run_extract(ExtractConfig(**{**cfg.model_dump(), **update}))
    assert not (tmp_path / "out").exists()


def test_missing_buckets_fail_before_any_work(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        extract_pipeline, "shard_pool", lambda *args: pytest.fail("no pool (nor Ray) before the checks")
    )
    cfg = ExtractConfig(
        model=TINY_VIT,
        dataset=shapes(s3.uri("data"), storage=s3.options),
        storage=s3.options,
        output="s3://no-such-output/acts",
        hooks=HOOKS,
    )
    with pytest.raises(storage.MissingInputError, match="bucket 'no-such-output' does not exist"):
        run_extract(cfg)
    assert not files_under(s3.uri(""), s3.options), "nothing generated or written"
    missing_input = cfg.model_copy(
        update={"dataset": cfg.dataset.model_copy(update={"uri": "s3://no-such-input/x"}), "output": s3.uri("acts")}
    )
    with pytest.raises(storage.MissingInputError, match="bucket 'no-such-input' does not exist"):
        run_extract(missing_input)
    assert main(["extract", "--set", "dataset.type=images", "--set", f"dataset.uri={tmp_path}/none"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
