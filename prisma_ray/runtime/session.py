"""Which Ray a job runs on: the one of this process, a cluster address, or a new local one."""

from __future__ import annotations

import logging
import os

import ray
from pydantic import BaseModel, ConfigDict, Field

from .console import ray_init_options

log = logging.getLogger(__name__)


class RayOptions(BaseModel):
    """Which Ray to use: the one already initialised in this process, else `address` (or `$RAY_ADDRESS`),
    else a new local one with `num_cpus` CPUs (default: all of this machine's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str | None = Field(
        None, description="address of a running Ray cluster, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS)"
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a new local Ray (default: all of this machine's); ignored when connecting"
    )


def ensure_ray(opts: RayOptions) -> None:
    """Use the Ray of this process, else connect to `opts.address` / `$RAY_ADDRESS`, else start a local one (its
    console output as `console.configure` set it up: Ray's own logs stay in its session folder unless verbose)."""
    if ray.is_initialized():
        return
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_init_options())
    else:
        num_cpus = opts.num_cpus or os.cpu_count()
        log.info("starting a local Ray with %d CPUs", num_cpus)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **ray_init_options())
