"""The Ray Train job (orchestration only; the step itself is `prisma_ray.sae.Trainer`).

    stores --one read task per piece of a shard (`read_piece`), READ_AHEAD in flight per worker-->
    TorchTrainer workers (one GPU each and DDP over NCCL on cuda; DDP over gloo on CPU): batches in pinned
    host memory on cuda, Trainer.train_step per batch --> ray.train.report: metrics every `log_every` steps,
    checkpoints every `checkpoint_every`; rank 0's progress line (step, loss, tokens/s, ETA) to the driver

Where the run trains is `plan_placement`, a pure function of the config and the cluster's resources.

Each worker reads its own part of the run's row order (`train.data.Schedule`: a pure function of
the shuffle seed, the shard list, the data position, the world size and the rank), exactly
`worker_batch` rows per step for every step, so all workers take the same number of steps: nothing
can leave a DDP all-reduce waiting. Every checkpoint saves the data position (`data_position.json`:
the rows not trained on yet); a (re)started worker group restores the latest checkpoint and goes on
from that position, training exactly the rows an uninterrupted run would; a relaunch with the same
`name` and `runs` does the same (Ray Train V2 finds the checkpoint).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import ray
import ray.train
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer, get_device, prepare_model
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from prisma_ray.errors import InvalidRequest, PrismaRayError

from .. import storage
from ..runtime.console import counted, train_progress_line
from ..runtime.devices import local_device, placement_line
from ..runtime.pool import Resources, cluster_resources, inlined, size_pool
from ..runtime.session import ensure_ray
from ..sae import DictionaryConfig, Normalization, Sites, Trainer
from ..sae.dictionary import check_shape
from ..sae.io import (
    CFG_FILE,
    checkpoint_files,
    dictionary_files,
    latest_checkpoint_state,
    restore_checkpoint,
    write_files,
)
from ..sae.trainer import check_same_run
from ..storage import StorageOptions
from .config import TrainConfig
from .data import DataPlan, DataPosition, Piece, Reader, RowOrder, Schedule, plan_data, read_piece, worker_batches

log = logging.getLogger(__name__)

POSITION_FILE = "data_position.json"  # in every checkpoint: the rows not trained on yet (`DataPosition`)
RESTARTS_FILE = "restarts.json"  # in every checkpoint: how often the run's workers started again from a checkpoint
READ_AHEAD = 2  # pieces each worker has read (or reading) ahead of the one it trains on
PROGRESS_METRICS = ("/loss", "/explained_variance", "/l0")  # each dictionary's metrics on the progress line


class LoopSpec(BaseModel):
    """Everything a training worker needs, as plain data (it travels in `train_loop_config`)."""

    model_config = ConfigDict(extra="forbid")

    dictionaries: list[DictionaryConfig]
    sites: Sites
    norm: dict[str, list[float]]
    total_steps: int
    worker_batch: int
    log_every: int
    checkpoint_every: int
    output: str
    storage: StorageOptions
    torch_threads: int | None
    reader: Reader
    order: RowOrder
    read_cpus: float
    device: Literal["cpu", "cuda"]  # cuda: each worker trains on the GPU Ray Train gives it (`get_device()`)
    autocast: bool
    token_kinds: list[str] | None = None

    def metadata(self) -> dict[str, Any]:
        """What the exported dictionaries record about their training data."""
        return {} if self.token_kinds is None else {"token_kinds": self.token_kinds}

    def normalization(self) -> Normalization:
        keys = ("in_mean", "in_scale", "out_mean", "out_scale")
        return Normalization(*(torch.tensor(self.norm[k]) for k in keys))  # host: the Trainer moves it


@dataclass
class TrainSummary:
    """What a run did and where its results are. `restarts`: how often its workers started again from a
    checkpoint (counted along the chain of checkpoints the result comes from: two losses before the same
    checkpoint count once); `resumed_from`: the step the last start began at (0: never restarted)."""

    name: str
    steps: int
    tokens: int
    metrics: dict[str, Any]
    checkpoint: str | None
    output: str
    dictionaries: list[str]
    resumed_from: int = 0
    restarts: int = 0
    placement: str = ""

    def lost(self) -> str:
        """One line on what the run lost and redid ("" when its workers never restarted from a checkpoint)."""
        if not self.restarts:
            return ""
        return (
            f"restarted {self.restarts} time(s) from a checkpoint (a worker or node lost, or the run relaunched); "
            f"the last start resumed from step {self.resumed_from} and trained the steps after it again"
        )

    def format(self) -> str:
        lines = [f"run {self.name}: {self.steps} steps, {self.tokens} tokens"]
        if self.placement:
            lines.append(f"trained on {self.placement}")
        if self.lost():
            lines.append(self.lost())
        for name in self.dictionaries:
            parts = {k.split("/", 1)[1]: v for k, v in self.metrics.items() if k.startswith(f"{name}/")}
            shown = ", ".join(
                f"{k} {v:.4g}" for k, v in parts.items() if k in ("loss", "explained_variance", "l0", "dead_fraction")
            )
            lines.append(f"  {name}: {shown}")
        lines.append(f"dictionaries: {self.output}/<name>  (cfg.json + sae_weights.safetensors + sparsity.safetensors)")
        if self.checkpoint:
            lines.append(f"latest checkpoint: {self.checkpoint}")
        return "\n".join(lines)


def total_steps(cfg: TrainConfig, plan: DataPlan) -> int:
    """Steps of the run: `steps`, else `tokens / batch_size`, else `epochs` passes over the data."""
    if cfg.steps is not None:
        return cfg.steps
    tokens = cfg.tokens if cfg.tokens is not None else int(cfg.epochs * plan.total_rows)
    steps = tokens // cfg.batch_size
    if steps < 1:
        raise InvalidRequest(
            f"{tokens} training tokens make no batch of batch_size={cfg.batch_size}; lower batch_size or raise "
            "tokens/epochs"
        )
    return steps


@dataclass(frozen=True)
class Placement:
    """Where a run trains: `device` (cuda | cpu, resolved), `scaling` (the `ScalingConfig` keyword arguments:
    `num_workers`, `use_gpu`, `resources_per_worker`), `backend` (torch.distributed's: nccl on cuda, gloo on
    CPU), `autocast` (bf16 autocast on or off) and `line`, what the run got ("8 train workers on 8 GPUs, bf16
    autocast")."""

    device: str
    scaling: dict[str, Any]
    backend: str
    autocast: bool
    line: str


def plan_placement(cfg: TrainConfig, cluster: Mapping[str, float]) -> Placement:
    """The placement of `cfg` on a Ray cluster of `cluster` resources (`{"CPU": n, "GPU": m}`); no Ray calls.

    `resources.device` auto is cuda where the cluster has a GPU: each of the `workers` Ray Train workers then
    reserves one GPU and `resources.cpus_per_actor` CPUs. `workers: 0` trains in the driver process (Ray Train's
    local mode), where auto means the driver's machine's GPU. Raises `InvalidRequest` when the workers (on cuda,
    one GPU each) plus one read task do not fit the cluster, naming `workers` and `resources.device`; or when
    `workers: 0` asks for cuda and the driver's machine has no GPU.
    """
    res = cfg.resources
    if cfg.workers:  # Ray Train would wait for workers that cannot be placed, and retry, without end
        fit = Resources(actors=cfg.workers, cpus_per_actor=res.cpus_per_actor)
        device = size_pool(
            fit, cluster, None, device=res.device, read_cpus=res.read_cpus, actors_field="workers"
        ).device
        line = placement_line(cfg.workers, "train worker", device, res.torch_threads)
    else:
        device = local_device(res.device, "resources.device").type
        line = placement_line(1, "train process (the driver)", device)
    cuda = device == "cuda"
    autocast = cuda if cfg.autocast is None else cfg.autocast
    per_worker = {"CPU": res.cpus_per_actor, **({"GPU": 1} if cuda else {})}
    return Placement(
        device=device,
        scaling=dict(num_workers=cfg.workers, use_gpu=cuda and cfg.workers > 0, resources_per_worker=per_worker),
        backend="nccl" if cuda else "gloo",
        autocast=autocast,
        line=line + (", bf16 autocast" if autocast else ""),
    )


def check_free_output(cfg: TrainConfig) -> None:
    """Refuse a new run (no checkpoint of its own yet) whose `output` already holds a dictionary of one of its
    names: another run's, which training would overwrite at its end."""
    output = storage.absolute(cfg.output_uri)
    for d in cfg.dictionaries:
        uri = storage.join(output, d.display_name())
        if not storage.exists(storage.join(uri, CFG_FILE), cfg.storage):
            continue
        raise InvalidRequest(
            f"{uri} holds a dictionary already, and the run {cfg.name!r} has no checkpoint under {cfg.runs}: it "
            "is another run's, which this one would overwrite. Set output (or name) to a new folder, or delete "
            "it first."
        )


def run_training(cfg: TrainConfig) -> TrainSummary:
    """Check the config and the stores, then train with Ray Train and return a summary."""
    plan = plan_data(cfg.data, cfg.storage)
    steps = total_steps(cfg, plan)
    for d in cfg.dictionaries:
        check_shape(d, plan.sites)
    resumed = latest_checkpoint_state(storage.join(storage.absolute(cfg.runs), cfg.name), cfg.storage)
    if resumed is not None:  # refused here, not after Ray Train has started its workers (minutes)
        check_same_run(resumed[1], cfg.dictionaries, plan.sites, where=resumed[0])
    else:
        check_free_output(cfg)
    ensure_ray(cfg.ray)
    placement = plan_placement(cfg, cluster_resources())
    norm = plan.normalization
    spec = LoopSpec(
        dictionaries=cfg.dictionaries,
        sites=plan.sites,
        norm={k: getattr(norm, k).tolist() for k in ("in_mean", "in_scale", "out_mean", "out_scale")},
        total_steps=steps,
        worker_batch=cfg.batch_size // max(cfg.workers, 1),
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        output=storage.absolute(cfg.output_uri),
        storage=cfg.storage.resolved(),
        torch_threads=cfg.resources.torch_threads,
        reader=plan.reader,
        order=plan.order,
        read_cpus=cfg.resources.read_cpus,
        token_kinds=cfg.data.kinds,
        device=placement.device,
        autocast=placement.autocast,
    )
    fs, path = storage.resolve(storage.absolute(cfg.runs), cfg.storage)
    log.info(
        "training %s for %d steps of %d tokens on %s",
        counted(len(cfg.dictionaries), "dictionary", "dictionaries"),
        steps,
        cfg.batch_size,
        placement.line,
    )
    with _progress(cfg.name, steps, cfg.batch_size, local=cfg.workers == 0) as progress:
        trainer = TorchTrainer(
            functools.partial(train_loop, progress=progress),
            train_loop_config=spec.model_dump(mode="json"),
            scaling_config=ScalingConfig(**placement.scaling),
            torch_config=TorchConfig(backend=placement.backend),
            run_config=RunConfig(
                name=cfg.name,
                storage_path=path,
                storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            ),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            cause = user_error(exc)
            if cause is None:
                raise
            raise cause from exc
    metrics = dict(result.metrics or {})
    return TrainSummary(
        name=cfg.name,
        steps=int(metrics.get("step", 0)),
        tokens=int(metrics.get("tokens", 0)),
        metrics=metrics,
        checkpoint=result.checkpoint.path if result.checkpoint and cfg.workers else None,
        output=spec.output,
        dictionaries=[d.display_name() for d in cfg.dictionaries],
        resumed_from=int(metrics.get("resumed_from", 0)),
        restarts=int(metrics.get("restarts", 0)),
        placement=placement.line,
    )


def user_error(exc: TrainingFailedError) -> PrismaRayError | None:
    """The error a user's input caused on every failed worker (e.g. a resumed run whose checkpoint holds other
    dictionaries), so that it is reported as such rather than as Ray Train's failure; None if any worker failed
    otherwise."""
    failures = list(getattr(exc, "worker_failures", {}).values())
    found = []
    for failure in failures:
        cause = failure
        while cause is not None and not isinstance(cause, PrismaRayError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        found.append(cause)
    return found[0] if found and all(found) else None


@contextlib.contextmanager
def _progress(name: str, total: int, batch_size: int, local: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Within this block, where the rank-0 worker sends its progress (a dict of `train_loop`'s `_report`), printed
    here as `console.train_progress_line`s. `local` (Ray Train's local mode: the loop runs in this process): the
    lines are printed as sent. Else through a Ray queue (an actor of 0 CPUs) read by a thread of this process while
    `fit` runs: Ray keeps its workers' own output in their log files (`runtime.console`), so the driver prints it."""

    def show(record: dict[str, Any]) -> None:
        log.info(train_progress_line(name, total, batch_size, **record))

    if local:
        yield show
        return
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})  # on the driver's node: lost with it
    stop = threading.Event()

    def follow() -> None:
        while True:
            try:
                show(queue.get(timeout=0.5))
            except Empty:
                if stop.is_set():
                    return
            except Exception:  # noqa: BLE001 - the queue's actor or Ray gone: progress is not worth failing for
                log.debug("training progress: the queue is gone", exc_info=True)
                return

    thread = threading.Thread(target=follow, name="train-progress", daemon=True)
    thread.start()
    try:
        yield functools.partial(send_progress, queue)
    finally:
        stop.set()
        thread.join()
        queue.shutdown()


def send_progress(queue: Any, record: dict[str, Any]) -> None:
    """Put a progress `record` on the driver's `queue` (`_progress`), never failing the training: a queue whose actor
    is gone (its node lost, the driver gone) drops the record. A node lost in the middle of a run used to fail rank
    0's report with `ActorDiedError` instead of letting Ray Train restore from the last checkpoint."""
    try:
        queue.put(record)
    except Exception:  # noqa: BLE001 - progress is not worth failing a training step for
        log.debug("training progress: the queue is gone; record dropped", exc_info=True)


def train_loop(config: dict[str, Any], progress: Callable[[dict[str, Any]], None] | None = None) -> None:
    """The function every Ray Train worker runs; rank 0 sends its progress to `progress` every report (see
    `_progress`)."""
    spec = LoopSpec.model_validate(config)
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    cuda = spec.device == "cuda"
    trainer = _trainer(spec, world, get_device() if cuda else torch.device("cpu"))
    position, restarts = DataPosition(), 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restore_checkpoint(trainer, directory)
            position = _restore_position(directory, checkpoint.path, spec, trainer.step, world)
            restarts = _restarts(directory) + 1
    start = trainer.step
    schedule = Schedule(
        position=position, start=start, steps=spec.total_steps, batch_size=spec.worker_batch * world, world=world
    )
    began = time.perf_counter()

    def tell(metrics: dict[str, Any]) -> None:
        if rank == 0 and progress is not None:
            shown = {k: float(v) for k, v in metrics.items() if k.endswith(PROGRESS_METRICS)}
            progress(dict(step=trainer.step, start=start, seconds=time.perf_counter() - began, metrics=shown))

    report = functools.partial(_report, trainer, spec, rank, schedule, restarts, tell)
    if start < spec.total_steps:
        prepared = False
        read = functools.partial(_read_ahead, reader=spec.reader, cpus=spec.read_cpus)
        for x, y in worker_batches(schedule, rank, spec.order, read, pin=cuda):
            if not prepared:
                if start == 0:
                    trainer.initialize(x, y)
                if world > 1:  # on cuda, DDP over the worker's device (`device_ids`), where the trainer built the net
                    trainer.wrap(lambda net: prepare_model(net, move_to_device=False))
                prepared = True
            trainer.train_step(x, y)
            _maybe_report(trainer.step, spec, report)
    else:
        report(checkpoint=False)
    if rank == 0:
        write_files(dictionary_files(trainer, spec.metadata()), spec.output, spec.storage)


def _trainer(spec: LoopSpec, world: int, device: torch.device) -> Trainer:
    """The worker's trainer, built on `device`; with several workers, firing counts are summed over them by
    `dist.all_reduce` (on the device's tensors: NCCL on cuda, gloo on CPU)."""
    return Trainer(
        spec.dictionaries,
        spec.sites,
        spec.total_steps,
        spec.normalization(),
        world_size=world,
        all_reduce=dist.all_reduce if world > 1 else None,
        device=device,
        autocast=spec.autocast,
    )


def _restore_position(directory: str, where: str, spec: LoopSpec, step: int, world: int) -> DataPosition:
    """The data position saved in a checkpoint; for a checkpoint without one (written before positions were
    saved), where a run of `world` workers that started fresh stood at `step`."""
    path = os.path.join(directory, POSITION_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return DataPosition.from_json(f.read(), spec.order, where)
    fresh = Schedule(
        position=DataPosition(), start=0, steps=spec.total_steps, batch_size=spec.worker_batch * world, world=world
    )
    return fresh.position_at(step)


def _restarts(directory: str) -> int:
    """How often the run that wrote a checkpoint had started again from a checkpoint (0 for checkpoints written
    before this was saved)."""
    path = os.path.join(directory, RESTARTS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["restarts"])


def _read_ahead(pieces: Iterable[Piece], reader: Reader, cpus: float) -> Iterator[dict[str, Any]]:
    """The rows of `pieces` in order, each read by a Ray task of `cpus` CPUs, READ_AHEAD tasks in flight (within
    `runtime.pool.inline`: read here, in order)."""
    if inlined():
        yield from (read_piece(p, reader) for p in pieces)
        return
    task = ray.remote(read_piece).options(num_cpus=cpus)
    reader_ref = ray.put(reader)
    todo = iter(pieces)
    running = deque(task.remote(p, reader_ref) for p in itertools.islice(todo, READ_AHEAD))
    while running:
        rows = ray.get(running.popleft())
        running.extend(task.remote(p, reader_ref) for p in itertools.islice(todo, 1))
        yield rows


def _maybe_report(step: int, spec: LoopSpec, report: functools.partial[None]) -> None:
    if step == spec.total_steps or step % spec.checkpoint_every == 0:
        report(checkpoint=True)
    elif step % spec.log_every == 0:
        report(checkpoint=False)


def _report(
    trainer: Trainer,
    spec: LoopSpec,
    rank: int,
    schedule: Schedule,
    restarts: int,
    tell: Callable[[dict[str, Any]], None],
    checkpoint: bool,
) -> None:
    """Report metrics from every worker (a barrier), with a checkpoint (its data position and the run's number of
    restarts from a checkpoint) written by rank 0, and tell the driver the progress (`tell`). `resumed_from`: the
    step this worker group started at."""
    metrics = {**trainer.metrics(), "resumed_from": schedule.start, "restarts": restarts}
    tell(metrics)
    if not checkpoint or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        position = schedule.position_at(trainer.step).to_json(spec.order)
        files = {POSITION_FILE: position.encode(), RESTARTS_FILE: json.dumps({"restarts": restarts}).encode()}
        write_files({**checkpoint_files(trainer, spec.metadata()), **files}, directory)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_{trainer.step:09d}",
        )
