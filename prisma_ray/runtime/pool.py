"""The one actor pool every stage runs its plain worker class on, its one sizing policy, and the one
`resources` block of the job configs that size it.

    items --(shard stages on cuda: one read task each, `read_cpus` CPUs)--> worker actors (`actors` x
    `cpus_per_actor` CPUs, one GPU each on cuda; at most `in_flight_per_actor` calls queued on each;
    shard stages on CPU: each decodes its own shards on a thread, `ShardDecoder`)
    --> each item's result, yielded as it finishes

A shard stage whose pool would be one CPU actor on a Ray of one node that the driver runs on (a laptop or
workstation) runs that worker in the driver instead (`shard_pool`, `runs_in_driver`, `run_here`;
`ShardResources.run_in`): an actor there would only add a fresh process's start-up (torch, torchvision and timm
imported and the model built again: seconds, a third of a 512-image run on 2 CPUs) and Ray's round trips.

Users: extraction and interpretation (`stream_shards`: shard items decoded by
`prisma_ray.data.shards.decode_batch` in CPU tasks or in the actors, then `ExtractionWorker` /
`LatentWorker`), the
sweep (`SweepWorker`, one call per model group, so an actor loads a group's models once) and
explanation (`Pipeline`, one call per batch of latents). `size_pool` decides the device, the number
of actors, their CPUs and torch threads from the cluster's resources (a pure function).

Why Ray core actors and not Ray Data's `ActorPoolStrategy`: explanation feeds its batches lazily (the
evidence of each latent is decoded on demand; Ray Data needs every item up front); after a failed call
the pool sends nothing new, still yields the calls in flight (the caller writes them), then re-raises
(Ray Data aborts the whole execution and drops what is in flight); results are any Python object (a
sweep report, explanation records) with no Arrow round trip; the sweep needs one group per actor at a
time, so no group queues behind a long one while another actor idles; when a node is lost (spot
preemption) the pool itself replaces its actors, only as many as what is left of the cluster holds beside
a read task, and sends their calls again, counting both for the run's summary (`PoolStats`). Reads overlap the forward pass
all the same: each shard's read task is submitted with its actor call (whose argument is the task's
result), and `in_flight_per_actor=2` keeps the next shard reading while the current one runs; at most
actors x `in_flight_per_actor` decoded shards exist at a time, which bounds the object store's load.
On CPU the actors decode their own shards instead (`ShardResources.decode`): a read task is a process of its
own that competes with the forward pass for the node's cores (and imports its own modules), and each decoded
shard is serialised, put in the object store and copied into the actor; on a 2-CPU node that cost the steady
state and the start-up (README, Extraction; `benchmarks/extract_throughput.py --decode task`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import json
import logging
import math
import pickle
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from ..data.shards import InputFormat, decode_batch
from ..data.sources import DatasetSpec
from ..errors import InvalidRequest, PrismaRayError
from .devices import Device, placement_line
from .session import RayOptions, ensure_ray, machine_resources, single_node_here

log = logging.getLogger(__name__)

MAX_CPU_ACTORS = 8
# CPUs per CPU actor by default: each actor pays a model's start-up (process, imports, weights) and memory, and
# a forward pass on 2 torch threads runs nearly twice as fast as on 1; on a 2-CPU node one 2-thread actor beat
# two 1-thread actors (with the decode tasks beside them) end to end, start-up halved (README, Extraction;
# benchmarks/extract_throughput.py --pool 2x1)
CPUS_PER_CPU_ACTOR = 2
RESTARTS = 3  # a call whose actor, node or read result is lost (spot preemption, out of memory) is retried this often
STALL_S = 5.0  # while a replacement actor runs, the pool checks at least this often that the cluster holds it


class Resources(BaseModel):
    """`resources:` of a job that runs a plain worker class on a pool of Ray actors (sweep, explain)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    actors: int | None = Field(
        None,
        ge=1,
        description="worker actors (default: one per GPU; on CPU one per 2 CPUs, at most 8, or as many of "
        "`cpus_per_actor` as fit; never more than there are items to run)",
    )
    cpus_per_actor: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per actor (default: up to 1; shard stages leave room for their read tasks)",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per CPU actor (default: the cluster's CPUs / actors)"
    )
    in_flight_per_actor: int | None = Field(
        None,
        ge=1,
        description="calls queued on each actor at a time, which bounds the work in memory (default: the "
        "stage's: 2 where the next item can be read or sent while one runs, 1 for the sweep's model groups)",
    )


class ShardResources(Resources):
    """`resources:` of a job that runs a model over dataset shards (extract, interpret): also where the
    model runs and what each shard's read-and-decode task reserves."""

    device: Device = Field(
        "auto", description="cpu, cuda (one GPU per actor) or auto (cuda where the cluster has GPUs)"
    )
    read_cpus: float = Field(0.5, gt=0, description="CPUs reserved per task that reads and decodes an input shard")
    decode: Literal["auto", "actor", "task"] = Field(
        "auto",
        description="where input shards are read and decoded: task (one task each, `read_cpus` CPUs, on any node "
        "with free CPUs), actor (in the model actor, on a thread beside its forward pass: no task processes, no "
        "decoded shard copied between processes) or auto: actor on CPU, task on cuda (a GPU's forward pass "
        "outruns one actor's decoding)",
    )
    run_in: Literal["auto", "driver", "actors"] = Field(
        "auto",
        description="where the model runs: actors (Ray actors, as sized above; an actor lost to a dead node or a "
        "killed process is replaced and its shards sent again), driver (this process, one worker, its shards "
        "decoded on a thread beside the forward pass: no actor's start-up of a fresh process, its imports and "
        "model build again, and no Ray started where none runs; a killed process stops the run, and running the "
        "same config again resumes at the shards not yet written) or auto: driver where the pool would be one "
        "CPU actor that decodes its own shards on a Ray of one node that this process runs on (a laptop or "
        "workstation; with no Ray and no address, the local Ray is then not started), else actors",
    )


class TrainResources(BaseModel):
    """`resources:` of `prisma-ray train` (the number of data-parallel workers is `workers`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Device = Field(
        "auto",
        description="cpu, cuda (one GPU per Ray Train worker, NCCL between them) or auto (cuda where the cluster "
        "has GPUs; with `workers: 0`, where the driver's machine has one)",
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker (an actor)")
    read_cpus: float = Field(0.5, gt=0, description="CPUs reserved per task that reads activation-store shards")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker (default: Ray's choice)")


@dataclass(frozen=True)
class PoolSize:
    """A pool sized for a cluster: `device` (cpu | cuda), `actors`, CPUs reserved per actor and per read task,
    torch threads per actor (None: torch's default), calls queued per actor."""

    device: str
    actors: int
    cpus_per_actor: float
    read_cpus: float
    torch_threads: int | None
    in_flight_per_actor: int


def size_pool(
    res: Resources,
    cluster: Mapping[str, float],
    items: int | None,
    *,
    device: Device = "cpu",
    read_cpus: float = 0.0,
    in_flight: int = 1,
    default_actors: int | None = None,
    field: str = "resources",
    device_field: str = "resources.device",
    actors_field: str | None = None,
) -> PoolSize:
    """The pool `res` asks for on a cluster of `cluster` resources (`{"CPU": n, "GPU": m}`), for `items`
    calls (None: not known; the actors are then not capped).

    `device` auto is cuda when the cluster has a GPU. Actors by default: one per GPU on cuda; on CPU
    one per `CPUS_PER_CPU_ACTOR` CPUs (at least one, at most `MAX_CPU_ACTORS`), or as many of
    `res.cpus_per_actor` as fit beside a read task;
    never more than `items`. CPUs per actor by default: up to 1, sharing what the read tasks (`read_cpus`
    each; 0 where there are none) leave. Torch threads on CPU by default: the cluster's CPUs / actors
    (every CPU's thread on some actor).
    `in_flight` is the stage's default of `res.in_flight_per_actor`, `default_actors` its default of
    `res.actors` where it has its own (explanation: 1, since a chat explainer's load on its server is
    `chat.concurrency` per actor). `field`, `device_field` and `actors_field` (default `<field>.actors`)
    are the config names errors cite. Raises `InvalidRequest` when the GPU actors, or the actors plus one
    read task, do not fit the cluster.
    """
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    device = device if device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    if res.actors or default_actors:
        wanted = res.actors or default_actors
    elif device == "cuda":
        wanted = int(gpus)
    elif res.cpus_per_actor:
        wanted = min(math.floor((cpus - read_cpus) / res.cpus_per_actor + 1e-9), MAX_CPU_ACTORS)
    else:
        wanted = min(max(1, int(cpus) // CPUS_PER_CPU_ACTOR), MAX_CPU_ACTORS)
    actors = max(1, wanted if items is None else min(wanted, items))
    actors_name = actors_field or f"{field}.actors"
    if device == "cuda" and actors > gpus:
        raise InvalidRequest(
            f"{device_field}=cuda with {actors} GPU actor(s), but the Ray cluster has {gpus:g} GPUs; "
            + (f"lower {actors_name}, or set {device_field}=cpu." if gpus >= 1 else f"set {device_field}=cpu or auto.")
        )
    per_actor = res.cpus_per_actor or min(1.0, (cpus - read_cpus) / actors)
    if per_actor <= 0 or actors * per_actor + read_cpus > cpus + 1e-9:
        reads = f" plus {read_cpus:g} CPUs for a read task" if read_cpus else ""
        names = f"{actors_name} or {field}.cpus_per_actor" + (f" or {field}.read_cpus" if read_cpus else "")
        raise InvalidRequest(
            f"{actors} actor(s) x {max(per_actor, 0):g} CPUs{reads} do not fit the Ray cluster's {cpus:g} CPUs"
            f"{', so reading could never run' if read_cpus else ''}; lower {names}."
        )
    threads = res.torch_threads or (max(1, int(cpus // actors)) if device == "cpu" else None)
    return PoolSize(device, actors, per_actor, read_cpus, threads, res.in_flight_per_actor or in_flight)


class _Inline:
    resources: dict[str, float] | None = None  # process-wide: Ray Train's local mode runs its loop in another thread


_INLINE = _Inline()


@contextlib.contextmanager
def inline(resources: Mapping[str, float]) -> Iterator[None]:
    """Within this block (in this process) `run_pool` runs its worker in the calling process, one instance per
    pool, reads included, and `cluster_resources` is `resources` (`{"CPU": n, "GPU": m}`: what the caller holds).
    A long-lived actor runs whole stages this way (`prisma_ray.campaign`): the stage functions stay as they are
    and pay no actor start-up of their own."""
    previous = _INLINE.resources
    _INLINE.resources = dict(resources)
    try:
        yield
    finally:
        _INLINE.resources = previous


def inlined() -> bool:
    """Whether pools run in this process (`inline`)."""
    return _INLINE.resources is not None


def cluster_resources() -> dict[str, float]:
    """The resources of the Ray this process is connected to (`{"CPU": n, "GPU": m, ...}`), or within `inline`
    the resources given there."""
    if inlined():
        return dict(_INLINE.resources)
    return ray.cluster_resources()


_END = object()


@dataclass
class PoolStats:
    """What a pool lost and redid: `actors_lost` (actors that died: their node was lost, or their process was
    killed, e.g. out of memory), `actors_replaced` (of those, replaced by a new actor; the others were not,
    since what was left of the cluster could not hold one beside a read task) and `retried` (calls sent again
    because their actor or their read task's result was lost)."""

    actors_lost: int = 0
    actors_replaced: int = 0
    retried: int = 0

    def format(self, unit: str = "call") -> str:
        """One line for a run's summary, calls counted as `unit`s ("" when nothing was lost)."""
        if not (self.actors_lost or self.retried):
            return ""
        return (
            f"{self.actors_lost} actor{'s' if self.actors_lost != 1 else ''} lost (node lost or process killed), "
            f"{self.actors_replaced} replaced; {self.retried} {unit}{'s' if self.retried != 1 else ''} retried"
        )


def _lost(exc: Exception) -> bool:
    """Whether a call failed because Ray lost what ran it (its actor, its node, its read task's result; a process
    killed out of memory), not because the worker raised."""
    if isinstance(exc, ray.exceptions.RayActorError):
        return not exc.actor_init_failed
    return isinstance(
        exc,
        (
            ray.exceptions.ObjectLostError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError,
        ),
    )


# What Ray 2.60 says of a process it killed for memory (its memory monitor), and of one that died otherwise (the
# raylet's "Some common causes include: (1) the process was killed by the OOM killer due to high memory usage")
_MONITOR_KILL = re.compile(r"memory pressure|running low on memory|OOM kill reason", re.IGNORECASE)
_OOM_KILLER = re.compile(r"OOM killer", re.IGNORECASE)


def loss_cause(exc: Exception) -> str:
    """Why Ray lost a call, in words, from the error Ray raised: out of memory where Ray says so (its memory monitor
    killed the process), likely out of memory where Ray names the kernel's OOM killer as the common cause of a
    process that died (Ray cannot tell it from a crash: `os._exit`, SIGSEGV, SIGKILL read the same), a lost node,
    or a worker crash."""
    text = str(exc)
    if isinstance(exc, ray.exceptions.OutOfMemoryError) or _MONITOR_KILL.search(text):
        return "out of memory (Ray's memory monitor killed its process)"
    if isinstance(exc, ray.exceptions.NodeDiedError) or getattr(exc, "preempted", False):
        return "its node was lost (preempted or down)"
    if _OOM_KILLER.search(text):
        return (
            "its process died, likely out of memory (Ray names the kernel's OOM killer as the common cause) or crashed"
        )
    return f"its process died ({type(exc).__name__})"


@dataclass
class _Call:
    item: Any
    slot: int
    actor: Any
    attempt: int


def run_pool(
    items: Iterable[Any],
    worker: type,
    worker_kwargs: dict[str, Any],
    size: PoolSize,
    *,
    method: str = "__call__",
    read: Callable[..., Any] | None = None,
    read_kwargs: dict[str, Any] | None = None,
    stats: PoolStats | None = None,
    retries: int = RESTARTS,
    on_lost: Callable[[Any, Exception], Any] | None = None,
    concurrency: int = 1,
) -> Iterator[Any]:
    """Run `worker(**worker_kwargs).<method>(item)` for every item on `size.actors` actors and yield each
    result as it finishes (any order).

    Items are taken from `items` lazily, at most `size.in_flight_per_actor` calls per actor at a time,
    each to the least busy actor. With `read`, each item first goes through a task
    `read(item, **read_kwargs)` of `size.read_cpus` CPUs and the actor gets its result. After a call
    fails no new item is sent; the calls in flight are still yielded, then the first error is raised (a
    `PrismaRayError` a worker raised as itself, not wrapped in Ray's `RayTaskError`).
    A call whose actor, node or read result Ray lost (a spot node preempted, a process killed) is read
    and sent again, at most `retries` times per item, so the worker's calls must be idempotent; a lost
    actor is replaced where the cluster still holds it beside a read task (else the pool goes on with
    fewer actors, never none). A call still lost after that stops the pool as a failed call does, or, with
    `on_lost`, counts as that item's result: `on_lost(item, error)` is yielded and the pool goes on (a
    campaign records the model as failed; `loss_cause` says why in words). Every call queued on an actor that
    died is lost with it: with more than one call in flight per actor, `on_lost` may see an item that was
    only waiting behind the one that killed it. `stats` (if given) counts what was lost, replaced and retried.
    `concurrency` > 1 runs that many calls of an actor at a time, on threads (`max_concurrency`; the worker
    must be thread-safe, as `ShardDecoder` is).
    The actors start with the first item and are killed when the iteration ends (also when the caller
    stops early); no items, no actors. Within `inline` one worker runs every item in this process, in order.
    """
    if inlined():
        yield from _run_inline(items, worker, worker_kwargs, method, read, read_kwargs or {})
        return
    pending = iter(items)
    first = next(pending, _END)
    if first is _END:
        return
    pending = itertools.chain([first], pending)
    stats = stats if stats is not None else PoolStats()
    # Ray restarts no actor and retries no call itself: the pool does, so that it can count them, and size
    # the replacements to what is left of the cluster (two actors restarted onto one smaller node would
    # leave no CPU to their read tasks and wait for ever).
    options = dict(num_cpus=size.cpus_per_actor, num_gpus=1 if size.device == "cuda" else 0, max_restarts=0)
    if concurrency > 1:
        options["max_concurrency"] = concurrency
    remote = ray.remote(worker).options(**options)
    actors: list[Any] = [remote.remote(**worker_kwargs) for _ in range(size.actors)]
    reader = ray.remote(read).options(num_cpus=size.read_cpus) if read is not None else None
    load = [0] * len(actors)
    in_flight: dict[Any, _Call] = {}
    retry: collections.deque[tuple[Any, int]] = collections.deque()
    error: Exception | None = None

    def send(item: Any, attempt: int) -> None:
        slot = min((i for i, a in enumerate(actors) if a is not None), key=load.__getitem__)
        arg = item if reader is None else reader.remote(item, **(read_kwargs or {}))
        in_flight[getattr(actors[slot], method).remote(arg)] = _Call(item, slot, actors[slot], attempt)
        load[slot] += 1

    replacements: set[int] = set()  # the slots holding a replacement actor

    def lose(slot: int, exc: Exception) -> None:
        ray.kill(actors[slot])
        actors[slot] = None
        replacements.discard(slot)
        stats.actors_lost += 1
        live = sum(a is not None for a in actors)
        if live == 0 or _fits(size, live + 1, cluster_resources()):
            actors[slot] = remote.remote(**worker_kwargs)
            replacements.add(slot)
            stats.actors_replaced += 1
        outcome = "replaced" if actors[slot] else "not replaced: the remaining cluster holds no more beside a read task"
        log.warning("%s actor %d lost (%s); %s", worker.__name__, slot, type(exc).__name__, outcome)

    def shed() -> None:
        """Stop replacement actors while the live ones and a read task do not fit the cluster (a view of it that
        still counted a lost node let the pool replace too many: placed, they would starve the reads)."""
        while replacements and (live := sum(a is not None for a in actors)) > 1:
            if _fits(size, live, cluster_resources()):
                return
            slot = replacements.pop()
            ray.kill(actors[slot])
            actors[slot] = None
            stats.actors_replaced -= 1
            log.warning(
                "%s actor %d stopped: the remaining cluster cannot hold it beside a read task", worker.__name__, slot
            )

    try:
        while True:
            while error is None and len(in_flight) < sum(a is not None for a in actors) * size.in_flight_per_actor:
                if retry:
                    send(*retry.popleft())
                    continue
                item = next(pending, _END)
                if item is _END:
                    break
                send(item, 0)
            if not in_flight:
                break
            if replacements:
                shed()
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=STALL_S)
            if not done:
                continue
            call = in_flight.pop(done[0])
            load[call.slot] -= 1
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - re-raised once the calls in flight are yielded
                again = call.attempt < retries
                if not _lost(exc) or not (again or on_lost is not None):
                    error = error or exc
                    continue
                if isinstance(exc, ray.exceptions.RayActorError) and actors[call.slot] is call.actor:
                    lose(call.slot, exc)
                if again:
                    stats.retried += 1
                    retry.append((call.item, call.attempt + 1))
                    continue
                log.info("%s: %s lost %d time(s): %s", worker.__name__, call.item, call.attempt + 1, loss_cause(exc))
                result = on_lost(call.item, exc)
            yield result
    finally:
        for actor in actors:
            if actor is not None:
                ray.kill(actor)
    if error is not None:
        cause = getattr(error, "cause", None)
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, PrismaRayError):
            raise cause from error  # a user's input: its own one-line message, not the actor's traceback
        raise error


def _run_inline(
    items: Iterable[Any],
    worker: type,
    worker_kwargs: dict[str, Any],
    method: str,
    read: Callable[..., Any] | None,
    read_kwargs: dict[str, Any],
) -> Iterator[Any]:
    """`run_pool` within `inline`: one `worker` built at the first item, every item read and run here in order."""
    instance = None
    for item in items:
        instance = instance or worker(**worker_kwargs)
        yield getattr(instance, method)(item if read is None else read(item, **read_kwargs))


def decodes_in_actor(decode: str, device: str) -> bool:
    """Whether a shard stage's actors decode their own shards (`ShardResources.decode` on a pool of `device`)."""
    return decode == "actor" or (decode == "auto" and device == "cpu")


def runs_in_driver(res: ShardResources, size: PoolSize, single_node_here: bool, field: str = "resources") -> bool:
    """Whether a shard stage of `res` sized as `size` runs its one worker in this process (`ShardResources.run_in`):
    `single_node_here` says whether its Ray is one node that this process runs on (`session.single_node_here`).

    Auto picks this process only for one CPU worker that decodes its own shards there: an actor would then only
    add a fresh process's start-up (its imports, its model built again) and Ray's round trips; anything larger
    (more actors, a GPU, other nodes) keeps the actors. Raises `InvalidRequest` naming `field` where `run_in:
    driver` meets more than one actor or `decode: task` (this process runs one worker and has no read tasks)."""
    if res.run_in == "driver":
        if size.actors > 1:
            raise InvalidRequest(
                f"{field}.run_in=driver runs one worker in this process, but {field}.actors={size.actors}; "
                f"drop {field}.actors, or set {field}.run_in=actors (or auto)."
            )
        if res.decode == "task":
            raise InvalidRequest(
                f"{field}.run_in=driver decodes the shards on a thread of this process, not in read tasks, but "
                f"{field}.decode=task; set {field}.decode=auto, or {field}.run_in=actors."
            )
        return True
    return (
        res.run_in == "auto"
        and single_node_here
        and size.actors == 1
        and size.device == "cpu"
        and decodes_in_actor(res.decode, size.device)
    )


def shard_pool(res: ShardResources, ray_options: RayOptions, items: int) -> tuple[PoolSize, bool]:
    """The pool of a shard stage (extract, interpret) for `items` shards, and whether it runs in this process
    (`runs_in_driver`). Ray is started or connected (`ensure_ray`) unless the stage runs here and this process
    has no Ray and no address; run here, the pool is sized for this machine (`session.machine_resources`), or
    for the one-node Ray this process runs on. Within `inline` the pool is the caller's, as before."""
    if res.run_in == "driver" and not inlined():
        cluster: Mapping[str, float] | None = machine_resources(ray_options)
        local = True
    else:
        cluster = single_node_here(ray_options) if res.run_in == "auto" and not inlined() else None
        local = cluster is not None
        if cluster is None:
            ensure_ray(ray_options)
            cluster = cluster_resources()
    size = size_pool(res, cluster, items, device=res.device, read_cpus=res.read_cpus, in_flight=2)
    here = runs_in_driver(res, size, local) and not inlined()
    if not here:
        ensure_ray(ray_options)
    return size, here


def shard_placement(size: PoolSize, here: bool, actor: str) -> str:
    """What a shard stage got, for its start line: `2 extraction actors on CPU (1 torch thread each)` (`actor` is
    the singular noun), or where it runs here (`shard_pool`) `in this process, no actors, 1 worker on CPU (2 torch
    threads each)`."""
    if here:
        return "in this process, no actors, " + placement_line(1, "worker", size.device, size.torch_threads)
    return placement_line(size.actors, actor, size.device, size.torch_threads)


class ShardDecoder:
    """A worker actor that reads and decodes its own shards (`ShardResources.decode`: actor).

    Each call decodes its shard in the calling thread (`decode_batch`; one shard at a time, so that the first is
    ready soonest), then runs it through the worker on a thread of the worker's own, one shard at a time; with
    `max_concurrency` = the calls in flight per actor the next shard decodes while this one runs the model (PIL,
    NumPy and torch release the GIL). The worker and its arguments come pickled (`build`:
    `ray.cloudpickle.dumps((worker, worker_kwargs))`) and are built on the worker's thread without blocking the
    constructor, so that the worker's imports (torch) and model build overlap the first shards' decoding; the
    worker's thread is also the one that set its torch threads. A construction error is raised by every call."""

    def __init__(self, build: bytes, spec: DatasetSpec, fmt: InputFormat):
        self._runner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-worker")
        self._worker = self._runner.submit(_unpickle_and_build, build)
        self._spec, self._fmt = spec, fmt
        self._decoding = threading.Lock()

    def __call__(self, item: dict[str, np.ndarray]) -> Any:
        with self._decoding:
            batch = decode_batch(item, self._spec, self._fmt)
        worker = self._worker.result()
        return self._runner.submit(worker, batch).result()

    def close(self) -> None:
        """Let the worker's thread end once its calls are done (an actor's ends with its process; in this
        process, `run_here`, the worker and its model are then freed)."""
        self._runner.shutdown(wait=False, cancel_futures=True)


def run_here(items: Iterable[Any], call: Callable[[Any], Any], concurrency: int) -> Iterator[Any]:
    """`call(item)` for every item on `concurrency` threads of this process, each result yielded as it finishes
    (any order), as `run_pool` does on actors: items are taken lazily, after a call fails no new item starts,
    the calls running are still yielded, then the first error is raised. Stopping the iteration early lets the
    calls running finish and starts no other."""
    pending = iter(items)
    running: set[concurrent.futures.Future] = set()
    error: BaseException | None = None
    threads = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="shard-call")
    try:
        while True:
            while error is None and len(running) < concurrency:
                item = next(pending, _END)
                if item is _END:
                    break
                running.add(threads.submit(call, item))
            if not running:
                break
            done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                if future.exception() is not None:
                    error = error or future.exception()
                else:
                    yield future.result()
    finally:
        threads.shutdown(wait=False, cancel_futures=True)
    if error is not None:
        raise error


def _unpickle_and_build(build: bytes) -> Any:
    worker, kwargs = pickle.loads(build)
    return worker(**kwargs)


def _fits(size: PoolSize, actors: int, cluster: Mapping[str, float]) -> bool:
    """Whether `actors` actors of `size` plus one read task fit a cluster of `cluster` resources."""
    gpus = actors if size.device == "cuda" else 0
    cpus = actors * size.cpus_per_actor + size.read_cpus
    return cpus <= float(cluster.get("CPU", 0.0)) + 1e-9 and gpus <= float(cluster.get("GPU", 0.0)) + 1e-9


def stream_shards(
    shards: Mapping[int, tuple[list[dict[str, Any]], list[str]]],
    spec: DatasetSpec,
    fmt: InputFormat,
    worker: type,
    worker_kwargs: dict[str, Any],
    size: PoolSize,
    progress: bool,
    desc: str,
    stats: PoolStats | None = None,
    decode: str = "task",
    here: bool = False,
) -> Iterator[dict[str, Any]]:
    """Read and decode each shard (`{index: (SampleRef fields, hook points)}`) in a task, or in the actors where
    `decodes_in_actor(decode, size.device)` (`ShardDecoder`), run it through the actors of
    `worker(**worker_kwargs)` (called on a one-row batch, as `decode_batch` returns it) and yield their rows as
    they finish (a progress bar if `progress`; `stats` as `run_pool`'s). With `here` (`shard_pool`) one
    `ShardDecoder` runs in this process instead of an actor, on `size.in_flight_per_actor` threads (`run_here`)."""
    items = (
        {
            "shard": np.array([shard]),
            "refs": np.array([json.dumps(refs)], dtype=object),
            "hooks": np.array([json.dumps(hooks)], dtype=object),
        }
        for shard, (refs, hooks) in shards.items()
    )
    read_kwargs = {"spec": spec, "fmt": fmt}
    decoder = None
    if (here or decodes_in_actor(decode, size.device)) and not inlined():
        build = {"build": ray.cloudpickle.dumps((worker, worker_kwargs)), **read_kwargs}
        concurrency = size.in_flight_per_actor
        if here:
            decoder = ShardDecoder(**build)
            results = run_here(items, decoder, concurrency)
        else:
            results = run_pool(items, ShardDecoder, build, size, stats=stats, concurrency=concurrency)
    else:
        results = run_pool(items, worker, worker_kwargs, size, read=decode_batch, read_kwargs=read_kwargs, stats=stats)
    try:
        with tqdm(total=len(shards), unit="shard", desc=desc, disable=not progress) as bar:
            for batch in results:
                bar.update(1)
                yield {key: column[0] for key, column in batch.items()}
    finally:
        if decoder is not None:
            results.close()
            decoder.close()
