"""A multi-node Ray cluster on one machine, in a Ray job of its own (a subprocess), for the node-loss tests.

The test runs `python -m <module> ARGS...` with `run_job`; the module's `__main__` builds its cluster with
`local_cluster()` (a head that holds no CPU, as `cluster.yaml`'s, and a GCS that declares a silent node dead
within a second), adds worker nodes, kills one (`remove_node(node, allow_graceful=False)`: raylet, actors,
tasks and the objects in its store) and prints one `report(...)` line that the test reads back with
`read_report`. Ray's temporary files and address file live under a directory of its own (`RAY_TMPDIR`), so no
other Ray on the machine sees this cluster.
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
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORT = "node-loss report: "


def run_job(module: str, *args: str, timeout: float) -> tuple[int | None, str]:
    """Run `python -m module args...` with a Ray of its own; its return code (-9 if it hung past `timeout`
    seconds and was killed) and its output (stdout and stderr)."""
    ray_tmp = tempfile.mkdtemp(prefix="rnl-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray keeps the loopback address instead of rewriting 127.0.0.1 to the
    # machine's address (which this machine's GCS is not reached at).
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": path}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    job = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the job and the Ray processes it starts: killed together if it hangs
    )
    output = None
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # whatever of its Ray is left
        if output is None:
            output = f"the disturbed run hung ({timeout:.0f} s); its output ends:\n" + job.communicate()[0]
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return job.returncode, output


@contextlib.contextmanager
def local_cluster() -> Iterator[Any]:
    """A `ray.cluster_utils.Cluster` on loopback whose head holds no CPU, with this process connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    # The GCS declares a silent node dead after 3 missed health checks of 200 ms (default: 5 of 3 s).
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200, "health_check_failure_threshold": 3}
    head = dict(num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=False, _system_config=health)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def report(value: dict[str, Any]) -> None:
    """Print the job's report line."""
    print(REPORT + json.dumps(value), flush=True)


def read_report(output: str) -> dict[str, Any]:
    """The report line a job printed."""
    return json.loads(next(line[len(REPORT) :] for line in output.splitlines() if line.startswith(REPORT)))


class Background:
    """`run()` in a thread (Ray's nodes are added from the main thread: they install signal handlers)."""

    def __init__(self, run: Callable[[], Any]) -> None:
        self.done: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(run,), daemon=True)
        self.thread.start()

    def _run(self, run: Callable[[], Any]) -> None:
        try:
            self.done["result"] = run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.done["error"] = exc

    def result(self, timeout: float, what: str) -> Any:
        """What `run()` returned; if it failed or is still running after `timeout` seconds, say so and end the
        job with status 3 (no `ray.shutdown()`: the thread would start a new Ray; the test kills the rest)."""
        self.thread.join(timeout=timeout)
        if "result" not in self.done:
            if "error" in self.done:
                traceback.print_exception(self.done["error"])
            print(f"{what} did not finish: {self.done.get('error', f'still running after {timeout:.0f} s')!r}")
            sys.stdout.flush()
            os._exit(3)
        return self.done["result"]
