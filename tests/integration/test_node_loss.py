"""Losing a spot node mid-extraction: the run completes with exactly the rows of an undisturbed run, and its
summary says what was lost and retried.

The disturbed run is a Ray job of its own (`python -m tests.integration.test_node_loss ROOT`, not the session's
`ray_local`): a `ray.cluster_utils.Cluster` whose head holds no CPU (as `cluster.yaml`'s) and one 3-CPU
worker node ("spot") where both extraction actors and the read tasks run. When the first shard is written the
worker node's processes are killed (`remove_node(allow_graceful=False)`: raylet, actors, read tasks and the
decoded shards in its object store), then a smaller 2-CPU node joins, as an autoscaler replaces a preempted
node: it holds one actor beside a read task, not two. Ray's temporary files and address file live under a
directory of its own (`RAY_TMPDIR`), so no other Ray on the machine sees this cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
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
from tests.tiny_models import tiny_vit

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
SHARDS = 24
REPORT = "node-loss report: "


def extraction(root: Path, output: str) -> ExtractConfig:
    """24 shards of 2 images on 2 actors of 1 CPU each (one torch thread: the rows do not depend on the pool)."""
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
        resources=dict(actors=2, cpus_per_actor=1.0, read_cpus=0.5, torch_threads=1),
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
    ray_tmp = tempfile.mkdtemp(prefix="rnl-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray keeps the loopback address instead of rewriting 127.0.0.1 to the
    # machine's address (which this machine's GCS is not reached at).
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": path}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    job = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_node_loss", str(tmp_path)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the job and the Ray processes it starts: killed together if it hangs
    )
    try:
        output, _ = job.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        output = None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # whatever of its Ray is left
        if output is None:
            output = "the disturbed run hung (180 s); its output ends:\n" + job.communicate()[0]
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = output[-4000:]
    assert job.returncode == 0, f"the disturbed run failed:\n{log}"
    report = json.loads(next(line[len(REPORT) :] for line in output.splitlines() if line.startswith(REPORT)))
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
    import ray
    from ray.cluster_utils import Cluster

    from prisma_ray.extract.pipeline import run_extract

    # The GCS declares a silent node dead after 3 missed health checks of 200 ms (default: 5 of 3 s).
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200, "health_check_failure_threshold": 3}
    head = dict(num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=False, _system_config=health)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    spot = cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
    cfg = extraction(root, "out")
    first_store = Path(cfg.output) / cfg.model.name / HOOKS[0] / "train"
    done: dict = {}

    def extract() -> None:  # in a thread: Ray's nodes are added from the main thread (they install signal handlers)
        try:
            done["summary"] = run_extract(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            done["error"] = exc

    job = threading.Thread(target=extract, daemon=True)
    try:
        job.start()
        while job.is_alive() and not list(first_store.glob("part-*.parquet")):
            time.sleep(0.01)
        killed_after = len(list(first_store.glob("part-*.parquet")))
        cluster.remove_node(spot, allow_graceful=False)
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        job.join(timeout=150)
        if "summary" not in done:
            if "error" in done:
                traceback.print_exception(done["error"])
            print(f"the extraction did not finish: {done.get('error', 'still running after 150 s')!r}", flush=True)
            os._exit(3)  # no ray.shutdown(): the extraction's thread would start a new Ray; the test kills the rest
        summary = done["summary"]
        report = {
            "killed_after_shards": killed_after,
            "complete": summary.complete,
            "shards_run": summary.shards_run,
            "stores": summary.stores,
            "lost": asdict(summary.lost),
            "summary": summary.format(),
        }
        print(REPORT + json.dumps(report), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    disturbed_run(Path(sys.argv[1]))
