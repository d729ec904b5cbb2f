"""`prisma-ray train` on a local Ray: SAE sweeps, crosscoders, transcoders, S3, failures and relaunches."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from ray.train import WorkerGroupError

from prisma_ray import store
from prisma_ray.cli import main
from prisma_ray.errors import InvalidRequest
from prisma_ray.sae import load_dictionary, load_sparsity
from prisma_ray.sae.synthetic import sparse_dictionary_data
from prisma_ray.storage import MissingInputError
from prisma_ray.train.config import TrainConfig, TrainData
from prisma_ray.train.data import plan_data
from prisma_ray.train.job import run_training, user_error

REPO = Path(__file__).resolve().parents[2]
D = 32
TOKENS_PER_SAMPLE = 4  # token 0 of every sample is its CLS token


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_store(uri, acts, hook, n_shards=2, shuffle_rows=False, options=None) -> str:
    """A finished float32 store of `acts` (row r: sample r // 4, token r % 4) in `n_shards` shards."""
    writer = store.StoreWriter(uri, options)
    bounds = np.linspace(0, len(acts), n_shards + 1).astype(int)
    for i in range(n_shards):
        rows = np.arange(bounds[i], bounds[i + 1])
        if shuffle_rows:
            rows = np.random.default_rng(i).permutation(rows)
        token = rows % TOKENS_PER_SAMPLE
        table = store.token_table(
            [f"s{r // TOKENS_PER_SAMPLE}" for r in rows],
            token,
            np.full(len(rows), -1),
            np.where(token == 0, 0, 2),
            acts[rows],
            "float32",
        )
        writer.write_shard(i, table, store.RunningStats.of(acts[rows]))
    stats = writer.merged_stats(set(range(n_shards)), acts.shape[1])
    writer.write_manifest(
        store.Manifest(
            model="toy",
            hook=hook,
            split="train",
            dtype="float32",
            d_model=acts.shape[1],
            token_selection={},
            token_layout={},
            dataset={},
            config_hash="test",
            n_samples=len(acts) // TOKENS_PER_SAMPLE,
            n_tokens=len(acts),
            shards=[store.shard_name(i) for i in range(n_shards)],
            mean=stats.mean.tolist(),
            std=np.sqrt(stats.var).tolist(),
            mean_norm=stats.mean_norm,
        )
    )
    return uri


@pytest.fixture(scope="module")
def acts() -> np.ndarray:
    return sparse_dictionary_data(8192, D, 48, 3, seed=1).acts.numpy()


def sweep_config(tmp_path, store_uri, **overrides) -> dict:
    cfg = {
        "name": "sweep",
        "runs": str(tmp_path / "runs"),
        "data": {"inputs": [store_uri]},
        "dictionaries": [
            {"architecture": "topk", "k": 3, "d_sae": 64, "lr": 3e-3},
            {"architecture": "relu", "l1_coefficient": 1.0, "d_sae": 64, "lr": 3e-3},
        ],
        "batch_size": 256,
        "steps": 150,
        "log_every": 50,
        "checkpoint_every": 50,
        "workers": 0,
        "resources": {"torch_threads": 1},
    }
    cfg.update(overrides)
    return cfg


def test_cli_trains_a_sweep_from_a_store(ray_local, tmp_path, acts, capsys):
    uri = write_store(str(tmp_path / "acts"), acts, "blocks.0.hook_resid_post")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(sweep_config(tmp_path, uri)))
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "run sweep: 150 steps, 38400 tokens" in out and "topk-k-3" in out and "relu-l1-1" in out
    for name in ("topk-k-3", "relu-l1-1"):
        exported = str(tmp_path / "runs" / "sweep" / "dictionaries" / name)
        d = load_dictionary(exported)
        x = torch.from_numpy(acts[-1024:])
        with torch.no_grad():
            explained = 1 - float((d(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert explained > 0.6, (name, explained)
        assert load_sparsity(exported).shape == (64,)


def test_token_kinds_select_rows(tmp_path, acts):
    uri = write_store(str(tmp_path / "acts"), acts, "blocks.0.hook_resid_post")
    options = TrainConfig().storage
    assert plan_data(TrainData(inputs=[uri]), options).total_rows == len(acts)
    patches = plan_data(TrainData(inputs=[uri], kinds=["patch"]), options)
    assert patches.total_rows == len(acts) * 3 // 4
    assert len(patches.reader.read(0, 0)["x"]) == patches.rows[0]


def test_crosscoder_trains_end_to_end(ray_local, tmp_path, acts):
    second = np.tanh(acts) * 2 + 1  # another "layer": the same samples, a different space
    a = write_store(str(tmp_path / "a"), acts, "blocks.0.hook_resid_post")
    b = write_store(str(tmp_path / "b"), second, "blocks.1.hook_resid_post")
    cfg = TrainConfig.model_validate(
        sweep_config(
            tmp_path,
            a,
            name="cross",
            data={"inputs": [a, b]},
            dictionaries=[{"architecture": "relu", "l1_coefficient": 1.0, "d_sae": 96, "lr": 3e-3}],
        )
    )
    summary = run_training(cfg)
    assert summary.steps == 150
    assert summary.metrics["relu-l1-1/explained_variance"] > 0.6
    d = load_dictionary(f"{summary.output}/relu-l1-1")
    assert [s.name for s in d.sites.inputs] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert d.sites.kind == "crosscoder" and d.W_dec.shape == (96, 2 * D)


def test_transcoder_trains_end_to_end_with_rows_matched_across_stores(ray_local, tmp_path, acts):
    gen = torch.Generator().manual_seed(3)
    mlp = torch.randn(D, 24, generator=gen) / D**0.5
    target = (torch.relu(torch.from_numpy(acts) @ mlp) + 0.5 * torch.from_numpy(acts)[:, :24]).numpy()
    a = write_store(str(tmp_path / "in"), acts, "blocks.0.hook_mlp_in")
    # the target store lists each shard's rows in another order: only matching by key can pair them
    b = write_store(str(tmp_path / "out"), target, "blocks.0.hook_mlp_out", shuffle_rows=True)
    cfg = TrainConfig.model_validate(
        sweep_config(
            tmp_path,
            a,
            name="transcoder",
            data={"inputs": [a], "targets": [b]},
            steps=200,
            dictionaries=[{"architecture": "topk", "k": 8, "d_sae": 64, "lr": 3e-3, "skip_connection": True}],
        )
    )
    summary = run_training(cfg)
    assert summary.metrics["topk-k-8/explained_variance"] > 0.8
    d = load_dictionary(f"{summary.output}/topk-k-8")
    assert d.sites.kind == "transcoder" and d.cfg.skip_connection
    x = torch.from_numpy(acts[:512])
    with torch.no_grad():
        error = (d(x) - torch.from_numpy(target[:512])).pow(2).sum() / (
            torch.from_numpy(target[:512]) - torch.from_numpy(target).mean(0)
        ).pow(2).sum()
    assert float(error) < 0.2


def test_missing_store_fails_before_ray_starts(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": {"inputs": [str(tmp_path / "nowhere")]}}))
    assert main(["train", str(config)]) == 2
    assert "nowhere/manifest.json" in capsys.readouterr().err
    with pytest.raises(MissingInputError):
        plan_data(TrainData(inputs=[str(tmp_path / "nowhere")]), TrainConfig().storage)


def test_workers_that_do_not_fit_the_cluster_are_refused_before_training(ray_local, tmp_path, acts, capsys):
    """Ray Train would wait for the workers, time out and retry without end (seen as a hang)."""
    uri = write_store(str(tmp_path / "acts"), acts, "blocks.0.hook_resid_post")
    for update in ({"workers": 1, "resources": {"cpus_per_actor": 10}}, {"workers": 3}):
        config = tmp_path / "train.yaml"
        config.write_text(yaml.safe_dump(sweep_config(tmp_path, uri, batch_size=258, **update)))
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert "do not fit the Ray cluster's 2 CPUs" in err and "lower workers or resources.cpus_per_actor" in err
    assert not (tmp_path / "runs").exists()


def test_a_run_name_holding_other_dictionaries_is_refused_before_ray_starts(tmp_path, acts, capsys, monkeypatch):
    """Relaunching a run name with other dictionaries was refused only by the Ray Train workers, after their
    start-up (about 4 minutes on the loaded 2-core machine); the driver now reads the latest checkpoint first.
    The same config passes the check (and goes on to start Ray)."""
    from prisma_ray.sae import Trainer
    from prisma_ray.sae.io import checkpoint_files, write_files
    from prisma_ray.train import job

    class RayStarted(Exception):
        pass

    def ensure_ray(_):
        raise RayStarted

    monkeypatch.setattr(job, "ensure_ray", ensure_ray)
    uri = write_store(str(tmp_path / "acts"), acts, "blocks.0.hook_resid_post")
    cfg = TrainConfig.model_validate(sweep_config(tmp_path, uri))
    trainer = Trainer(cfg.dictionaries, plan_data(cfg.data, cfg.storage).sites, 10)
    checkpoint = tmp_path / "runs" / "sweep" / "checkpoint_000000050"
    write_files(checkpoint_files(trainer), str(checkpoint))
    (tmp_path / "runs" / "sweep" / "checkpoint_000000100").mkdir()  # being written: no trainer state yet
    with pytest.raises(RayStarted):
        run_training(cfg)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(sweep_config(tmp_path, uri, dictionaries=[{"architecture": "topk", "k": 4}])))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint {checkpoint} was written by a run with other dictionaries or data" in err
    assert "(dictionaries ['relu-l1-1', 'topk-k-3'] there, ['topk-k-4'] now)" in err


def test_a_new_run_into_an_output_holding_another_runs_dictionary_is_refused(tmp_path, acts, monkeypatch):
    """`prisma-ray train --set name=photos2 --set output=runs/photos/dictionaries` with photos' grid overwrote
    photos' finished topk-k-8 without a word; a new run (no checkpoint of its own) is now refused before Ray starts,
    naming the folder. The run itself, relaunched (its checkpoint there), still writes its own dictionaries."""
    from prisma_ray.sae import Trainer
    from prisma_ray.sae.io import checkpoint_files, write_files
    from prisma_ray.train import job

    class RayStarted(Exception):
        pass

    monkeypatch.setattr(job, "ensure_ray", lambda _: (_ for _ in ()).throw(RayStarted()))
    uri = write_store(str(tmp_path / "acts"), acts, "blocks.0.hook_resid_post")
    cfg = TrainConfig.model_validate(sweep_config(tmp_path, uri, output=str(tmp_path / "runs" / "photos")))
    held = tmp_path / "runs" / "photos" / "relu-l1-1"
    held.mkdir(parents=True)
    (held / "cfg.json").write_text("{}")
    with pytest.raises(InvalidRequest, match=f"{held} holds a dictionary already, and the run 'sweep' .*new folder"):
        run_training(cfg)
    assert (held / "cfg.json").read_text() == "{}"
    trainer = Trainer(cfg.dictionaries, plan_data(cfg.data, cfg.storage).sites, 10)
    write_files(checkpoint_files(trainer), str(tmp_path / "runs" / "sweep" / "checkpoint_000000050"))
    with pytest.raises(RayStarted):
        run_training(cfg)


def test_a_user_error_on_the_workers_is_reported_as_such():
    refused = InvalidRequest("the checkpoint was written by a run with other dictionaries")
    assert user_error(WorkerGroupError("x", {0: refused, 1: refused})) is refused
    chained = RuntimeError("wrapped")
    chained.__cause__ = refused
    assert user_error(WorkerGroupError("x", {0: chained})) is refused
    assert user_error(WorkerGroupError("x", {0: refused, 1: ValueError("a bug")})) is None
    assert user_error(WorkerGroupError("x", {})) is None


def _train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in c for c in p.info["cmdline"] or [])]


@pytest.mark.slow
def test_two_workers_on_s3_survive_a_worker_kill_and_a_relaunch_and_match_one_worker(
    ray_local, s3, tmp_path, acts, caplog
):
    """One run, two failures: a worker is killed after the first checkpoint (Ray Train restarts the
    workers from it), then the driver is killed after a later one (relaunching resumes from it). The
    resumed run trains the same rows at every step on every worker as a run never killed."""
    uri = write_store(s3.uri("acts"), acts, "blocks.0.hook_resid_post", n_shards=4, options=s3.options)
    cfg = sweep_config(
        tmp_path,
        uri,
        name="two",
        runs=s3.uri("runs"),
        steps=300,
        log_every=50,
        checkpoint_every=50,
        workers=2,
        resources={"cpus_per_actor": 0.5, "torch_threads": 1},
        storage=s3.options.model_dump(),
        dictionaries=[{"architecture": "topk", "k": 3, "d_sae": 64, "lr": 3e-3}],
    )
    one = run_training(TrainConfig.model_validate({**cfg, "name": "one", "runs": str(tmp_path / "runs"), "workers": 0}))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "train_sae.py"), str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def checkpoints() -> list[dict]:
        try:
            body = s3.client.get_object(Bucket=s3.bucket, Key="runs/two/checkpoint_manager_snapshot.json")["Body"]
        except s3.client.exceptions.NoSuchKey:
            return []
        return [r["metrics"] for r in json.loads(body.read())["checkpoint_results"]]

    def wait_for(condition, what: str) -> None:
        deadline = time.time() + 300
        while not condition():
            assert driver.poll() is None, f"the first launch ended before {what}"
            assert time.time() < deadline, f"no {what} after 300 s"
            time.sleep(0.05)

    try:
        wait_for(checkpoints, "first checkpoint")
        worker = _train_workers()[-1]
        worker.send_signal(signal.SIGKILL)
        wait_for(lambda: any(m["resumed_from"] > 0 for m in checkpoints()), "checkpoint after the worker restart")
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    before = checkpoints()
    assert max(m["step"] for m in before) < 300, "the first launch finished before the driver was killed"
    two = run_training(TrainConfig.model_validate(cfg))
    assert two.steps == 300 and two.tokens == 300 * 256
    assert two.metrics["resumed_from"] in {m["step"] for m in before}, "the relaunch resumed from a checkpoint"
    assert two.checkpoint.endswith("checkpoint_000000300")
    ev_one, ev_two = one.metrics["topk-k-3/explained_variance"], two.metrics["topk-k-3/explained_variance"]
    assert min(ev_one, ev_two) > 0.85 and abs(ev_one - ev_two) < 0.05, (ev_one, ev_two)
    assert load_dictionary(f"{two.output}/topk-k-3", s3.options).n_latents == 64
    # the same rows at every step on every worker as a run never killed: the same dictionary, to the bit
    position = json.loads(
        s3.client.get_object(Bucket=s3.bucket, Key="runs/two/checkpoint_000000300/data_position.json")["Body"].read()
    )
    assert position["pending"] == [] and position["next"] == 300 * 256
    caplog.set_level(logging.INFO, logger="prisma_ray.train.job")
    straight = run_training(TrainConfig.model_validate({**cfg, "name": "straight", "runs": str(tmp_path / "runs")}))
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train straight: step ")]
    assert [line.split(",")[0] for line in progress] == [
        f"train straight: step {s}/300 ({100 * s / 300:.0f}%)" for s in (50, 100, 150, 200, 250, 300)
    ]
    assert "tokens/s, ETA" in progress[-1], "the workers' progress reaches the driver's console (Ray keeps theirs)"
    resumed = load_dictionary(f"{two.output}/topk-k-3", s3.options).state_dict()
    for name, value in load_dictionary(f"{straight.output}/topk-k-3").state_dict().items():
        assert torch.equal(resumed[name], value), name
