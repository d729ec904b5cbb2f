"""What a job prints: its own progress (one bar or line per stage) and summary; Ray's own logs go to the
session's log folder (`<temp dir>/session_latest/logs`, by default under /tmp/ray) and come back with the
CLI's `-v`.

One place for every knob (Ray 2.60), set by `configure` before Ray starts:

- `ray.init(log_to_driver=False)` (`ray_init_options`): the output of Ray's worker processes (our actors and
  tasks, Ray Train's controller and workers, its placement-group cleaner with its "Failed to query Ray Train
  Controller actor state", the `E ... core_worker.cc` lines of worker processes) stays in
  `logs/worker-*.out|err`.
- `ray.init(logging_level=ERROR)` and the `ray` logger at ERROR: the driver's Ray messages ("Started a local
  Ray instance", "Token authentication is enabled ...") are not printed.
- `RAY_DATA_LOGGING_CONFIG` (`prisma_ray/assets/ray-data-logging.yaml`): Ray Data's console handler at ERROR,
  its file handler (`logs/ray-data.log`) as Ray's default; no "Progress bars disabled", no execution plans.

Environment variables already set by the user win (`setdefault`).
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from typing import Any

RAY_DATA_LOGGING = "RAY_DATA_LOGGING_CONFIG"
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")

_verbose = False


def configure(verbose: bool) -> None:
    """Set up this process's console: with `verbose`, Ray's logs come back to it (and our debug lines); without,
    Ray's Python loggers print errors only and Ray's processes keep their output in the session's log folder.
    Call it before Ray starts (the CLI's `main` does)."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    import ray  # noqa: F401 - importing ray sets up its loggers, which must come first

    os.environ.setdefault(RAY_DATA_LOGGING, str(resources.files("prisma_ray") / "assets" / "ray-data-logging.yaml"))
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def ray_init_options() -> dict[str, Any]:
    """The `ray.init` keyword arguments of the console `configure` set up (default: quiet)."""
    if _verbose:
        return {"log_to_driver": True, "logging_level": logging.INFO}
    return {"log_to_driver": False, "logging_level": logging.ERROR}
