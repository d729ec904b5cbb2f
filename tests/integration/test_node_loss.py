"""Losing a spot node mid-extraction: the run completes with exactly the rows of an undisturbed run, and its
summary says what was lost and retried.

The disturbed run is a Ray job of its own (`python -m tests.integration.test_node_loss ROOT`, not the session's
`ray_local`): a `ray.cluster_utils.Cluster` whose head holds no CPU (as `cluster.yaml`'s) and one 3-CPU
worker node ("spot") where both extraction actors and the read tasks run. When the first shard is written the
worker node's processes are killed (`remove_node(allow_graceful=False)`: raylet, actors, read tasks and the
decoded shards in its object store), then a smaller 2-CPU node joins, as an autoscaler replaces a preempted
node: it holds one actor beside a read task, not two. Ray's temporary files and address file live under a
directory of its own (`RAY_TMPDIR`), so no other Ray on the machine sees this cluster (`tests.multinode`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prisma_ray import store
from prisma_ray.data.shards import decode_shard
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.pipeline import finalize_stores
from prisma_ray.extract.plan import plan_extract
from prisma_ray.extract.worker import ExtractionWorker
from tests.multinode import Background, local_cluster, read_report, report, run_job
from tests.tiny_models import tiny_vit

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
SHARDS = 24


def extraction(root: Path, output: str) -> ExtractConfig:
    """24 shards of 2 images on 2 actors of 1 CPU each (one torch thread: the rows do not depend on the pool), each
    shard decoded in a read task as on GPU clusters (`decode: task`), so the lost node also takes decoded shards."""
    return ExtractConfig(
        model=tiny_vit(),
        hooks=HOOKS,
        tokens=dict(mode="random", k=4, seed=3),
        dataset=dict(
            type="synthetic",
            uri=str(root / "shapes"),
            generator=dict(name="shapes", n_images=2 * SHARDS, image_size=32),
        ),
        output=str(root / output),
        shard_size=2,
        batch_size=2,
        resources=dict(actors=2, cpus_per_actor=1.0, read_cpus=0.5, torch_threads=1, decode="task"),
        progress=False,
    )


def undisturbed(cfg: ExtractConfig) -> dict[str, str]:
    """Run `cfg` without Ray (the plain worker over every shard in turn); the store URI of each hook point."""
    plan = plan_extract(cfg)
    worker = ExtractionWorker(plan.job("cpu", cfg.resources.torch_threads))
    for index in sorted(plan.pending):
        worker.process(index, decode_shard(plan.shards[index], plan.spec, plan.fmt), plan.pending[index])
    assert finalize_stores(plan)
    return {hook: w.uri for hook, w in plan.writers.items()}


def rows(uri: str) -> pa.Table:
    """Every stored row of a store, sorted by its key."""
    files = sorted(Path(uri).glob("part-*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return table.sort_by([(key, "ascending") for key in store.KEYS])


@pytest.mark.slow
def test_losing_a_node_mid_extraction_keeps_exactly_the_undisturbed_rows(tmp_path, one_torch_thread):
    returncode, output = run_job("tests.integration.test_node_loss", str(tmp_path), timeout=180)
    log = output[-4000:]
    assert returncode == 0, f"the disturbed run failed:\n{log}"
    report = read_report(output)
    assert report["killed_after_shards"] < SHARDS, f"the node was lost after the run finished:\n{log}"
    assert report["complete"] and report["shards_run"] == SHARDS, log
    lost = report["lost"]
    assert lost["actors_lost"] == 2, f"both actors ran on the lost node:\n{log}"
    assert lost["actors_replaced"] == 1, "the 2-CPU node holds one 1-CPU actor beside a 0.5-CPU read task, not two"
    assert lost["retried"] >= 2, "the shards in flight on the lost node were sent again"
    assert "2 actors lost (node lost or process killed), 1 replaced;" in report["summary"]
    assert f"{lost['retried']} shards retried" in report["summary"]

    reference = undisturbed(extraction(tmp_path, "reference"))
    for hook in HOOKS:
        got, want = rows(report["stores"][hook]), rows(reference[hook])
        keys = got.select(store.KEYS)
        assert len(set(zip(*(keys.column(k).to_pylist() for k in store.KEYS)))) == got.num_rows, "no duplicates"
        assert keys.equals(want.select(store.KEYS)), "exactly the undisturbed run's (sample_id, frame, token) keys"
        dtype = store.store_dtype(got.schema)
        np.testing.assert_allclose(
            store.decode_acts(got.column("act"), dtype),
            store.decode_acts(want.column("act"), dtype),
            rtol=1e-3,
            atol=1e-3,
        )
        manifest, expected = store.read_manifest(report["stores"][hook]), store.read_manifest(reference[hook])
        assert (manifest.n_samples, manifest.n_tokens, manifest.shards) == (
            expected.n_samples,
            expected.n_tokens,
            expected.shards,
        )
        assert not list(Path(report["stores"][hook]).rglob(".tmp-*")), "no half-written shard is left"


def disturbed_run(root: Path) -> None:
    """The Ray job: extract on a one-worker-node cluster, lose that node at the first shard, print the summary."""
    from prisma_ray.extract.pipeline import run_extract

    with local_cluster() as cluster:
        spot = cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
        cfg = extraction(root, "out")
        first_store = Path(cfg.output) / cfg.model.name / HOOKS[0] / "train"
        job = Background(lambda: run_extract(cfg))
        while job.thread.is_alive() and not list(first_store.glob("part-*.parquet")):
            time.sleep(0.01)
        killed_after = len(list(first_store.glob("part-*.parquet")))
        cluster.remove_node(spot, allow_graceful=False)
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        summary = job.result(timeout=150, what="the extraction")
        report(
            {
                "killed_after_shards": killed_after,
                "complete": summary.complete,
                "shards_run": summary.shards_run,
                "stores": summary.stores,
                "lost": asdict(summary.lost),
                "summary": summary.format(),
            }
        )


if __name__ == "__main__":
    disturbed_run(Path(sys.argv[1]))
