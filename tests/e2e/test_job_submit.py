"""The README's cluster how-to as a new user runs it, from an empty environment (`env -i PATH=/usr/bin:/bin
HOME=...`: no virtualenv activated, no Ray variables): `make cluster`, `.venv/bin/ray job submit --working-dir .
-- python jobs/quickstart.py`, `make cluster-stop`; the job's outputs checked."""

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parents[1]  # the project's environment, as `make cluster`'s VENV
SMALL_QUICKSTART = [
    "--set",
    "entries.prisma-toy-video-moving-shapes=null",  # the toy ViT only, on less data and training
    "--set",
    "entries.prisma-toy-vit-shapes.data.train.generator.n_images=128",
    "--set",
    "entries.prisma-toy-vit-shapes.data.test.generator.n_images=32",
    "--set",
    "entries.prisma-toy-vit-shapes.epochs=2",
    "--set",
    "entries.prisma-toy-vit-shapes.dashboard_latents=4",
    "--set",
    "dictionaries=[{architecture: topk, k: 4, expansion_factor: 4, lr: 0.001}, "
    "{architecture: topk, k: 8, expansion_factor: 4, lr: 0.001}]",
    "--set",
    "batch_size=512",
    "--set",
    "real=null",  # the real part has its own slow test (tests/integration/test_quickstart_real.py)
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_shell(*cmd: str, timeout: float, home: Path | None = None) -> subprocess.CompletedProcess:
    """`cmd` in the repository as from a new login: only PATH=/usr/bin:/bin and HOME (no venv on PATH)."""
    env = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={home or Path.home()}"]
    return subprocess.run([*env, *cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def head_node():
    """`make cluster` on free ports with its own temp dir (short: Ray's socket paths under it must fit the
    107-byte AF_UNIX limit), from a home of its own: the cluster's token is in its temp dir, nothing is written
    under ~/.ray; `make cluster-stop` afterwards, which stops the head without Ray's 30 s drain. Yields the
    dashboard address and the token file."""
    temp_dir = tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")
    home = Path(tempfile.mkdtemp(prefix="ray-e2e-home-", dir="/tmp"))
    make = [
        f"VENV={VENV}",
        f"CLUSTER_DIR={temp_dir}",
        f"CLUSTER_PORT={_free_port()}",
        f"CLUSTER_DASHBOARD_PORT={(dashboard := _free_port())}",
        f"CLUSTER_AGENT_PORT={_free_port()}",
        "CLUSTER_CPUS=2",
    ]
    try:
        up = _fresh_shell("make", "cluster", *make, timeout=300, home=home)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        token = Path(temp_dir) / "auth_token"
        assert token.is_file() and not (home / ".ray" / "auth_token").exists(), "the token is the cluster's own"
        yield f"http://127.0.0.1:{dashboard}", token
    finally:
        down = _fresh_shell("make", "cluster-stop", *make, timeout=120, home=home)
        log = Path(temp_dir, "head.log").read_text(errors="replace") if Path(temp_dir, "head.log").exists() else ""
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    assert down.returncode == 0 and "Ray head stopped" in down.stdout, down.stdout + down.stderr
    assert "Draining for up to" not in log, "the head drained before stopping:\n" + log[-2000:]


@pytest.mark.slow
def test_quickstart_submitted_as_a_ray_job_from_a_fresh_shell_succeeds(head_node, tmp_path):
    output = tmp_path / "quickstart"
    address, token = head_node
    submit = [
        str(VENV / "bin" / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        ".",
        "--",
        "python",  # the head's python: make cluster put the project's .venv first on its PATH
        "jobs/quickstart.py",
        "--set",
        f"output={output}",
        *SMALL_QUICKSTART,
    ]
    deadline = time.time() + 120
    while True:  # the head answers `ray job list` before its node's dashboard agent can take a submission
        done = _fresh_shell("env", "RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN_PATH={token}", *submit, timeout=1200)
        if "No available agent to submit job" not in done.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout and "ModuleNotFoundError" not in done.stdout
    assert "leaderboard (held-out test split)" in done.stdout and "ground-truth recovery" in done.stdout
    metrics = pq.read_table(output / "sweep" / "metrics.parquet").to_pylist()
    assert sorted(r["name"] for r in metrics) == ["topk-k-4", "topk-k-8"]
    assert all(r["explained_variance"] > 0 for r in metrics)
    assert (output / "sweep" / "leaderboard.html").is_file()
    assert (output / "dashboard" / "prisma-toy-vit-shapes" / "index.html").is_file()


def test_make_cluster_refuses_a_port_in_use_naming_it_and_starts_nothing(tmp_path):
    """Another Ray's dashboard on 8265 made `make cluster` start a head that failed later, its cause deep in the
    head's log: a port in use is now refused before anything starts, naming the port and the variables."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        make = [f"VENV={VENV}", f"CLUSTER_DIR={tmp_path / 'c'}", f"CLUSTER_DASHBOARD_PORT={port}"]
        make += [f"CLUSTER_PORT={_free_port()}", f"CLUSTER_AGENT_PORT={_free_port()}"]
        up = _fresh_shell("make", "-s", "cluster", *make, timeout=60)
    assert up.returncode != 0
    assert f"port {port} on 127.0.0.1 is in use" in up.stdout and "CLUSTER_DASHBOARD_PORT=" in up.stdout
    assert not (tmp_path / "c").exists(), "nothing was started"


def test_make_cluster_stop_stops_the_head_and_keeps_the_folder_and_its_logs(tmp_path):
    """`make cluster-stop` ran `rm -rf $(CLUSTER_DIR)`: the head's and the jobs' logs went with it, and so would a
    user's files in a CLUSTER_DIR of theirs. It now stops the head's process group and removes only the token and
    the pid file that `make cluster` wrote (a sleeping process group stands in for the head)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    head = subprocess.Popen(["sleep", "60"], start_new_session=True)
    reaped = threading.Thread(target=head.wait)  # reaped at once: a zombie would still answer `kill -0`
    reaped.start()
    (folder / "head.pid").write_text(f"{head.pid}\n")
    for name in ("auth_token", "head.log", "results.parquet"):
        (folder / name).write_text("x")
    down = _fresh_shell("make", "-s", "cluster-stop", f"VENV={VENV}", f"CLUSTER_DIR={folder}", timeout=60)
    assert down.returncode == 0 and "Ray head stopped" in down.stdout, down.stdout + down.stderr
    reaped.join(timeout=10)
    assert head.returncode == -signal.SIGTERM, "the head's process group was stopped"
    assert sorted(p.name for p in folder.iterdir()) == ["head.log", "results.parquet"]
