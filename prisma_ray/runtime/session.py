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
    address = ray_address(opts)
    if address:
        ray.init(address=address, **ray_init_options())
    else:
        num_cpus = opts.num_cpus or os.cpu_count()
        log.info("starting a local Ray with %d CPUs", num_cpus)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **ray_init_options())


def ray_address(opts: RayOptions) -> str | None:
    """The cluster `ensure_ray` connects to when this process has no Ray yet: `opts.address`, else `$RAY_ADDRESS`
    (which `ray job submit` sets for its entrypoint); None: it would start a new local Ray."""
    return opts.address or os.environ.get("RAY_ADDRESS") or None


def machine_resources(opts: RayOptions) -> dict[str, float]:
    """This machine as a new local Ray would see it (`{"CPU": n, "GPU": m}`), without starting one: `opts.num_cpus`
    or all its CPUs, and the GPUs torch sees."""
    import torch  # imported here: Ray's side of the runtime does not need it

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(opts.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def single_node_here(opts: RayOptions) -> dict[str, float] | None:
    """The resources of the Ray a job runs on (`ensure_ray`) when it is one node, with CPUs, that this process runs
    on (a laptop's or workstation's local Ray, a one-node cluster's head running the `ray job submit` entrypoint);
    None otherwise (more nodes, a head with no CPUs of its own as in `cluster.yaml`, or Ray Client, whose driver
    runs elsewhere). Where this process has no Ray and no address, the local Ray it would start is not started:
    its resources are `machine_resources`."""
    if not ray.is_initialized() and ray_address(opts) is None:
        return machine_resources(opts)
    ensure_ray(opts)
    if ray.util.client.ray.is_connected():
        return None
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) != 1 or nodes[0]["NodeID"] != ray.get_runtime_context().get_node_id():
        return None
    return dict(nodes[0]["Resources"]) if nodes[0]["Resources"].get("CPU", 0) >= 1 else None
