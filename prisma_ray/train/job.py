"""The Ray Train job (orchestration only; the step itself is `prisma_ray.sae.Trainer`).

    stores --Ray Data: (epoch, shard) items -> read_items tasks--> streaming_split(equal=True)
    --> TorchTrainer workers (DDP over gloo on CPU, NCCL on GPU): Trainer.train_step per batch
    --> ray.train.report: metrics every `log_every` steps, checkpoints every `checkpoint_every`

The stream holds exactly `steps × batch_size` rows and every worker gets the same number of them
(equal split), so all workers take the same number of steps, each pass ending naturally: nothing
can leave a DDP all-reduce waiting. A (re)started worker group restores the latest checkpoint,
skips the batches already trained on and goes on; a relaunch with the same `name` and `runs`
does the same (Ray Train V2 finds the checkpoint).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer, prepare_model

from prisma_ray.errors import InvalidRequest, PrismaRayError

from .. import storage
from ..runtime.pool import Resources, cluster_resources, size_pool
from ..runtime.session import ensure_ray
from ..sae import DictionaryConfig, Normalization, Sites, Trainer
from ..sae.dictionary import check_shape
from ..sae.io import checkpoint_files, dictionary_files, restore_checkpoint, write_files
from ..storage import StorageOptions
from .config import TrainConfig
from .data import DataPlan, plan_data, read_items

log = logging.getLogger(__name__)


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
    token_kinds: list[str] | None = None

    def metadata(self) -> dict[str, Any]:
        """What the exported dictionaries record about their training data."""
        return {} if self.token_kinds is None else {"token_kinds": self.token_kinds}

    def normalization(self) -> Normalization:
        return Normalization(*(torch.tensor(self.norm[k]) for k in ("in_mean", "in_scale", "out_mean", "out_scale")))


@dataclass
class TrainSummary:
    """What a run did and where its results are."""

    name: str
    steps: int
    tokens: int
    metrics: dict[str, Any]
    checkpoint: str | None
    output: str
    dictionaries: list[str]

    def format(self) -> str:
        lines = [f"run {self.name}: {self.steps} steps, {self.tokens} tokens"]
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


def run_training(cfg: TrainConfig) -> TrainSummary:
    """Check the config and the stores, then train with Ray Train and return a summary."""
    plan = plan_data(cfg.data, cfg.storage)
    steps = total_steps(cfg, plan)
    workers = max(cfg.workers, 1)
    norm = plan.normalization
    spec = LoopSpec(
        dictionaries=cfg.dictionaries,
        sites=plan.sites,
        norm={k: getattr(norm, k).tolist() for k in ("in_mean", "in_scale", "out_mean", "out_scale")},
        total_steps=steps,
        worker_batch=cfg.batch_size // workers,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        output=storage.absolute(cfg.output_uri),
        storage=cfg.storage.resolved(),
        torch_threads=cfg.resources.torch_threads,
        token_kinds=cfg.data.kinds,
    )
    for d in cfg.dictionaries:
        check_shape(d, plan.sites)
    ensure_ray(cfg.ray)
    if cfg.workers:  # Ray Train would wait for workers that cannot be placed, and retry, without end
        fit = Resources(actors=cfg.workers, cpus_per_actor=cfg.resources.cpus_per_actor)
        size_pool(fit, cluster_resources(), None, read_cpus=cfg.resources.read_cpus, actors_field="workers")
    items = plan.items(plan.epochs_for(steps, cfg.batch_size))
    dataset = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(read_items, batch_size=1, fn_kwargs={"reader": plan.reader}, num_cpus=cfg.resources.read_cpus)
        .limit(steps * cfg.batch_size)
    )
    fs, path = storage.resolve(storage.absolute(cfg.runs), cfg.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=spec.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, resources_per_worker={"CPU": cfg.resources.cpus_per_actor}
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets={"train": dataset},
    )
    log.info(
        "training %d dictionaries for %d steps of %d tokens on %d worker(s)",
        len(cfg.dictionaries),
        steps,
        cfg.batch_size,
        workers,
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


def train_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    spec = LoopSpec.model_validate(config)
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    trainer = Trainer(
        spec.dictionaries,
        spec.sites,
        spec.total_steps,
        spec.normalization(),
        world_size=world,
        all_reduce=dist.all_reduce if world > 1 else None,
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restore_checkpoint(trainer, directory)
    start = trainer.step
    if start < spec.total_steps:
        prepared = False
        for x, y in _batches(ray.train.get_dataset_shard("train"), spec.worker_batch, skip=start):
            if not prepared:
                if start == 0:
                    trainer.initialize(x, y)
                if world > 1:
                    trainer.wrap(lambda net: prepare_model(net, move_to_device=False))
                prepared = True
            trainer.train_step(x, y)
            _maybe_report(trainer, spec, rank, start)
        if trainer.step < spec.total_steps:
            log.warning("the data ran out after %d of %d steps", trainer.step, spec.total_steps)
            _report(trainer, spec, rank, start, checkpoint=True)
    else:
        _report(trainer, spec, rank, start, checkpoint=False)
    if rank == 0:
        write_files(dictionary_files(trainer, spec.metadata()), spec.output, spec.storage)


def _batches(shard: Any, batch_size: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """`(x, y)` batches of this worker's shard after the first `skip` (trained before a restart)."""
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.float32)):
        if i >= skip:
            yield batch["x"], batch.get("y")


def _maybe_report(trainer: Trainer, spec: LoopSpec, rank: int, start: int) -> None:
    step = trainer.step
    if step == spec.total_steps or step % spec.checkpoint_every == 0:
        _report(trainer, spec, rank, start, checkpoint=True)
    elif step % spec.log_every == 0:
        _report(trainer, spec, rank, start, checkpoint=False)


def _report(trainer: Trainer, spec: LoopSpec, rank: int, start: int, checkpoint: bool) -> None:
    """Report metrics from every worker (a barrier), with a checkpoint written by rank 0."""
    metrics = {**trainer.metrics(), "resumed_from": start}
    if rank == 0:
        log.info("step %d/%d %s", trainer.step, spec.total_steps, _brief(metrics))
    if not checkpoint or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        write_files(checkpoint_files(trainer, spec.metadata()), directory)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_{trainer.step:09d}",
        )


def _brief(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.endswith(("/loss", "/explained_variance", "/l0")))
