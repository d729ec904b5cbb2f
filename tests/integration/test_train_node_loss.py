"""Losing a spot node mid-training: Ray Train restarts the worker group from the last checkpoint on the nodes
left and a replacement, the run finishes with the dictionaries of an undisturbed run, and its summary says what
was lost and retried.

The disturbed run is a Ray job of its own (`python -m tests.integration.test_train_node_loss ROOT`, see
`tests.multinode`): a head without CPUs and two worker nodes of 3 CPUs, each holding one of the two 2-CPU Ray
Train workers (they do not fit on one node). After the first checkpoint one worker node is killed with its
worker, read tasks and objects, and a node like it joins, as an autoscaler replaces a preempted node.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from prisma_ray.sae import load_dictionary
from prisma_ray.sae.synthetic import sparse_dictionary_data
from prisma_ray.train.config import TrainConfig
from tests.integration.test_train import write_store
from tests.multinode import Background, local_cluster, read_report, report, run_job

STEPS = 80
NODE_CPUS = 3  # one 2-CPU worker beside a 1-CPU read task (logical CPUs: Ray wants whole ones per node)


def config(root: Path, name: str) -> TrainConfig:
    """80 steps of 64 rows (32 per worker) of d=8, a checkpoint every 20 steps."""
    return TrainConfig.model_validate(
        {
            "name": name,
            "runs": str(root / "runs"),
            "data": {"inputs": [str(root / "acts")]},
            "dictionaries": [{"architecture": "topk", "k": 2, "d_sae": 16, "lr": 3e-3}],
            "batch_size": 64,
            "steps": STEPS,
            "log_every": 20,
            "checkpoint_every": 20,
            "workers": 2,
            "resources": {"cpus_per_actor": 2.0, "read_cpus": 1.0, "torch_threads": 1},
            "max_failures": 3,
        }
    )


@pytest.mark.slow
def test_losing_a_node_mid_training_resumes_from_the_last_checkpoint_and_matches_an_undisturbed_run(tmp_path):
    acts = sparse_dictionary_data(2048, 8, 24, 2, seed=1).acts.numpy()
    write_store(str(tmp_path / "acts"), acts, "blocks.0.hook_resid_post", n_shards=4)
    returncode, output = run_job("tests.integration.test_train_node_loss", str(tmp_path), timeout=240)
    log = output[-4000:]
    assert returncode == 0, f"the disturbed run failed:\n{log}"
    got = read_report(output)
    assert got["killed_at"] and max(got["killed_at"]) < STEPS, f"the node was lost after the run finished:\n{log}"
    disturbed, straight = got["disturbed"], got["straight"]
    assert disturbed["steps"] == STEPS and disturbed["tokens"] == STEPS * 64
    assert disturbed["restarts"] >= 1, "the worker group was restarted from a checkpoint"
    assert disturbed["resumed_from"] >= min(got["killed_at"]), "it resumed from the last checkpoint before the loss"
    assert f"restarted {disturbed['restarts']} time(s) from a checkpoint" in disturbed["summary"]
    assert f"resumed from step {disturbed['resumed_from']}" in disturbed["summary"]
    assert straight["restarts"] == 0 and "restarted" not in straight["summary"]
    # the same rows at every step on every worker as the run never disturbed: the same dictionary, to the bit
    want = load_dictionary(f"{straight['output']}/topk-k-2").state_dict()
    for name, value in load_dictionary(f"{disturbed['output']}/topk-k-2").state_dict().items():
        assert torch.equal(value, want[name]), name


def disturbed_run(root: Path) -> None:
    """The Ray job: train on two worker nodes, lose one after the first checkpoint, then train undisturbed."""
    from prisma_ray.train.job import run_training

    def outcome(summary) -> dict:
        return {k: getattr(summary, k) for k in ("steps", "tokens", "restarts", "resumed_from", "output")} | {
            "summary": summary.format()
        }

    with local_cluster() as cluster:
        spot = cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")
        cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")
        cfg = config(root, "disturbed")
        snapshot = root / "runs" / "disturbed" / "checkpoint_manager_snapshot.json"

        def checkpoints() -> list[int]:
            try:
                return [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
            except (FileNotFoundError, json.JSONDecodeError):
                return []

        began = time.perf_counter()
        job = Background(lambda: run_training(cfg))
        while job.thread.is_alive() and not checkpoints():
            time.sleep(0.01)
        killed_at = checkpoints()
        seconds = {"first checkpoint": time.perf_counter() - began}
        cluster.remove_node(spot, allow_graceful=False)
        cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")
        disturbed = job.result(timeout=150, what="the disturbed training")
        seconds["disturbed"] = time.perf_counter() - began
        straight = Background(lambda: run_training(config(root, "straight"))).result(timeout=90, what="the training")
        seconds["straight"] = time.perf_counter() - began - seconds["disturbed"]
        report(
            {"killed_at": killed_at, "disturbed": outcome(disturbed), "straight": outcome(straight), "seconds": seconds}
        )


if __name__ == "__main__":
    disturbed_run(Path(sys.argv[1]))
