"""The Ray Data pipeline shared by the jobs that run a model over dataset shards (extract, interpret).

    shard items --decode_batch tasks--> decoded rows --model actors (ActorPoolStrategy)--> one row per shard

`actor_resources` sizes the actor pool for the cluster; `stream_shards` runs it and yields each
shard's result row as it finishes. What an actor does lives in its worker class, testable without Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Protocol

import ray
from ray.data import ActorPoolStrategy, DataContext
from tqdm.auto import tqdm

from ..data.shards import InputFormat, decode_batch
from ..data.sources import DatasetSpec

MAX_CPU_ACTORS = 8


class ActorOptions(Protocol):
    """The config fields that size a model-actor pool (shared by `ExtractConfig` and `InterpretConfig`)."""

    device: Literal["auto", "cpu", "cuda"]
    actors: int | None
    actor_num_cpus: float | None
    decode_num_cpus: float
    torch_threads: int | None


def actor_resources(cfg: ActorOptions, n_shards: int) -> tuple[str, int, float, int | None]:
    """`(device, actors, CPUs per actor, torch threads)` for this cluster, leaving CPUs for decoding.

    On CPU the default is one actor per CPU (at most `MAX_CPU_ACTORS`), each with CPUs / actors torch
    threads: separate single-threaded forward passes keep the cores busier than one multi-threaded one.
    No more actors start than there are shards to run.
    """
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    wanted = cfg.actors or (int(gpus) if device == "cuda" else min(int(cpus), MAX_CPU_ACTORS))
    if device == "cuda" and max(wanted, 1) > gpus:
        raise ValueError(
            f"device=cuda with {max(wanted, 1)} GPU actor(s), but the Ray cluster has {gpus:g} GPUs; "
            "lower actors, or set device=cpu."
        )
    actors = max(1, min(wanted, n_shards))
    actor_cpus = cfg.actor_num_cpus or min(1.0, (cpus - cfg.decode_num_cpus) / actors)
    if actor_cpus <= 0 or actors * actor_cpus + cfg.decode_num_cpus > cpus + 1e-9:
        raise ValueError(
            f"{actors} actor(s) x {actor_cpus:g} CPUs plus {cfg.decode_num_cpus:g} CPUs per decode task do not fit "
            f"the cluster's {cpus:g} CPUs, so decoding could never run; lower actors, actor_num_cpus or "
            "decode_num_cpus."
        )
    threads = cfg.torch_threads or (max(1, int(cpus // actors)) if device == "cpu" else None)
    return device, actors, actor_cpus, threads


def stream_shards(
    items: list[dict[str, Any]],
    spec: DatasetSpec,
    fmt: InputFormat,
    worker: type,
    worker_kwargs: dict[str, Any],
    resources: tuple[str, int, float, int | None],
    decode_cpus: float,
    progress: bool,
    desc: str,
) -> Iterator[dict[str, Any]]:
    """Decode each shard item (`shard`, `refs`, ...) in a Ray task, run it through an actor pool of
    `worker(**worker_kwargs)` and yield the actors' rows as they finish (a progress bar if `progress`)."""
    device, actors, actor_cpus, _ = resources
    ctx = DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = bars and progress
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            decode_batch, batch_size=1, batch_format="numpy", fn_kwargs={"spec": spec, "fmt": fmt}, num_cpus=decode_cpus
        )
        ds = ds.map_batches(
            worker,
            batch_size=1,
            batch_format="numpy",
            fn_constructor_kwargs=worker_kwargs,
            compute=ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus,
            num_gpus=1 if device == "cuda" else 0,
        )
        with tqdm(total=len(items), unit="shard", desc=desc, disable=not progress) as bar:
            for row in ds.iter_rows():
                bar.update(1)
                yield row
    finally:
        ctx.enable_progress_bars = bars
