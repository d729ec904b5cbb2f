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

Progress that Ray keeps in its workers' logs is reported by the job itself: training's one line per `log_every`
steps (`train_progress_line`), sent by the rank-0 worker to the driver (`train.job`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
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


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """`count` and its noun for a person: `1 dictionary`, `3 dictionaries` (`plural` defaults to `singular` + s)."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def duration(seconds: float) -> str:
    """`seconds` for a person: `42s`, `3m05s`, `1h02m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def train_progress_line(
    name: str,
    total: int,
    batch_size: int,
    step: int,
    start: int,
    seconds: float,
    metrics: Mapping[str, float],
    shown: int = 3,
) -> str:
    """One line of a training run's progress: `train NAME: step S/T (P%)`, each dictionary's loss, explained
    variance and L0 (`metrics` keyed `<dictionary>/loss` etc., as `sae.Trainer.metrics` gives them; the first
    `shown`, then how many more), the throughput in tokens/s and the time left (ETA) at that pace.

    `start` is the step the run (or its latest restart) began at and `seconds` the time since then, so the pace
    is `(step - start) x batch_size / seconds`; before any step no pace or ETA is shown."""
    parts = [f"train {name}: step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    names = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in metrics if "/" in key))
    for dictionary in names[:shown]:
        values = [
            f"{label} {metrics[f'{dictionary}/{key}']:{spec}}"
            for key, label, spec in (("loss", "loss", ".4g"), ("explained_variance", "ev", ".3f"), ("l0", "l0", ".1f"))
            if f"{dictionary}/{key}" in metrics
        ]
        parts.append(" ".join([dictionary, *values]))
    if len(names) > shown:
        parts.append(counted(len(names) - shown, "more dictionary", "more dictionaries"))
    done = step - start
    if done > 0 and seconds > 0:
        rate = done * batch_size / seconds
        shown_rate = f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"
        parts.append(f"{shown_rate} tokens/s, ETA {duration((total - step) * seconds / done)}")
    return ", ".join(parts)
