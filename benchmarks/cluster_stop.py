"""Seconds `make cluster-stop` takes to stop the head `make cluster` started: as before (Ray's 30 s SIGTERM drain,
`CLUSTER_DRAIN_S=30`, and a 60 s grace before SIGKILL) and with the Makefile's defaults (no drain, `ray stop`'s
16 s grace), interleaved in one run, and their ratio. Each head gets its own free ports and temp dir (as tests/e2e/test_job_submit.py); no other Ray on
the machine is touched."""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_seconds(drain_s: int, grace_s: int) -> float:
    """Start a one-CPU head with `make cluster`, then time `make cluster-stop` (raises if either fails)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-stop-", dir="/tmp")
    make = [
        "make",
        f"VENV={VENV}",
        f"CLUSTER_DIR={temp_dir}",
        f"CLUSTER_PORT={_free_port()}",
        f"CLUSTER_DASHBOARD_PORT={_free_port()}",
        f"CLUSTER_AGENT_PORT={_free_port()}",
        "CLUSTER_CPUS=1",
        f"CLUSTER_DRAIN_S={drain_s}",
        f"CLUSTER_STOP_GRACE_S={grace_s}",
    ]
    try:
        subprocess.run([*make, "cluster"], cwd=REPO, check=True, capture_output=True, timeout=300)
        start = time.perf_counter()
        subprocess.run([*make, "cluster-stop"], cwd=REPO, check=True, capture_output=True, timeout=120)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    settings = {"before (30 s drain, 60 s grace)": (30, 60), "now (no drain, 16 s grace)": (0, 16)}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, (drain, grace) in settings.items():
            times[name].append(stop_seconds(drain, grace))
    for name, runs in times.items():
        print(f"make cluster-stop {name:<32} {statistics.median(runs):5.1f} s  runs {[round(t, 1) for t in runs]}")
    before, now = (statistics.median(runs) for runs in times.values())
    print(f"ratio: {before / now:.1f}x faster")


if __name__ == "__main__":
    main()
