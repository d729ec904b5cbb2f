"""`ray start --head` on 127.0.0.1, `ray job submit --working-dir .` of the quickstart, outputs checked, cluster stopped."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
SMALL_QUICKSTART = [
    "--set",
    "models=[{name: prisma-toy-vit-shapes, hook: blocks.2.hook_resid_post, train_samples: 128, "
    "test_samples: 32, epochs: 2}]",
    "--set",
    "dictionaries=[{architecture: topk, k: 4, expansion_factor: 4, lr: 0.001}, "
    "{architecture: topk, k: 8, expansion_factor: 4, lr: 0.001}]",
    "--set",
    "batch_size=512",
    "--set",
    "dashboard_latents=4",
    "--set",
    "real=null",  # the real part has its own slow test (tests/integration/test_quickstart_real.py)
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A Ray head started with `ray start --head --block` in its own process group; killed with the group.

    Its temp dir is short: Ray's socket paths live under it and must fit the 107-byte AF_UNIX limit."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp_dir = tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")
    gcs, dashboard, agent = _free_port(), _free_port(), _free_port()
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        # the agent's default port (52365) is taken by any other Ray on this machine; then no job can be submitted
        f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None, "ray start --head exited:\n" + head.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_quickstart_submitted_as_a_ray_job_succeeds_and_writes_its_outputs(head_node, tmp_path):
    address, env = head_node
    output = tmp_path / "quickstart"
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--submission-id",
        "quickstart-e2e",
        "--runtime-env-json",
        json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}}),
        "--",
        sys.executable,
        "jobs/quickstart.py",
        "--set",
        f"output={output}",
        *SMALL_QUICKSTART,
    ]
    deadline = time.time() + 120
    while True:  # the head answers `ray job list` before its node's dashboard agent can take a submission
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=1200)
        if "No available agent to submit job" not in done.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert JobSubmissionClient(address).get_job_status("quickstart-e2e") == JobStatus.SUCCEEDED
    assert "leaderboard (held-out test split)" in done.stdout and "ground-truth recovery" in done.stdout
    metrics = pq.read_table(output / "sweep" / "metrics.parquet").to_pylist()
    assert sorted(r["name"] for r in metrics) == ["topk-k-4", "topk-k-8"]
    assert all(r["explained_variance"] > 0 for r in metrics)
    assert (output / "sweep" / "leaderboard.html").is_file()
    assert (output / "dashboard" / "index.html").is_file()
