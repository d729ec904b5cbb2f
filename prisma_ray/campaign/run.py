"""`prisma-ray campaign` on Ray (orchestration only; a model's stages are `stages.run_model`).

selected models --plan (driver: each model's data generated once)--> a pool of long-lived `ModelRunner`
actors (`runtime.pool.run_pool`; one GPU each where there are GPUs, <= 1 CPU each), each running every
stage of one model after another --> `campaign.json` (each model's outcome, written as it arrives; a model whose
actor died, e.g. out of memory, is recorded as failed and a fresh actor takes the next: `resources.retries`)
--> the sweep over every model's dictionaries: one leaderboard across models (nothing evaluated twice)
--> its cross-model page (the sweep writes it for two models or more)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from .. import storage
from ..data.sources import SyntheticSource, list_refs
from ..errors import PrismaRayError
from ..evaluate.discovery import find_checkpoints
from ..evaluate.sweep import run_sweep
from ..runtime.devices import placement_line
from ..runtime.pool import Resources, cluster_resources, loss_cause, run_pool, size_pool
from ..runtime.session import ensure_ray
from .config import CampaignConfig
from .plan import plan_campaign, plan_model, sweep_config
from .stages import ModelRunner
from .state import STAGES, Outcome, lost_outcome, outcome_table, read_status, with_earlier_seconds, write_status

log = logging.getLogger(__name__)


@dataclass
class CampaignSummary:
    """Each model's outcome, the campaign's status file, leaderboard and cross-model page ("" when none)."""

    outcomes: list[Outcome]
    status: str
    leaderboard: str
    cross_model: str
    seconds: float
    actors: int

    @property
    def failed(self) -> list[Outcome]:
        """The models stopped by an error."""
        return [o for o in self.outcomes if o.error]

    @property
    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    def format(self) -> str:
        """The table printed by `prisma-ray campaign`: one row per model, then the counts and URIs."""
        lines = outcome_table(self.outcomes)
        lines += [
            f"passed       {self.passed} of {len(self.outcomes)} models through every stage ({', '.join(STAGES)})",
            f"time         {self.seconds:.1f} s on {self.actors} model actor{'s' if self.actors != 1 else ''}",
            f"status       {self.status}",
            f"leaderboard  {self.leaderboard or '-'}",
        ]
        if self.cross_model:
            lines.append(f"cross-model  {self.cross_model}")
        return "\n".join(lines)


def prepare_data(cfg: CampaignConfig, names: list[str]) -> tuple[list[str], dict[str, Outcome]]:
    """Plan every model and generate each synthetic dataset they read, once, before any actor starts (two actors
    must not generate one dataset at once). Return the models to run and the outcomes of those that cannot."""
    ready, failed, generated = [], {}, set()
    for name in names:
        try:
            plan = plan_model(cfg, name)
            for spec in plan.data.values():
                if isinstance(spec, SyntheticSource) and spec.uri not in generated:
                    list_refs(spec)
                    generated.add(spec.uri)
        except PrismaRayError as exc:
            failed[name] = Outcome(model=name, error=f"{type(exc).__name__}: {exc}")
            continue
        ready.append(name)
    return ready, failed


def run_campaign(cfg: CampaignConfig) -> CampaignSummary:
    """Run every selected model's unfinished stages on a pool of long-lived actors, record each outcome in
    `campaign.json`, then sweep every model's dictionaries into one leaderboard; return the summary."""
    start = time.perf_counter()
    options = cfg.storage.resolved()
    storage.require_bucket(cfg.uri(), options)
    names, outcomes = prepare_data(cfg, plan_campaign(cfg))
    ensure_ray(cfg.ray)
    res = cfg.resources
    fit = Resources(actors=res.actors, cpus_per_actor=res.cpus_per_actor, torch_threads=res.torch_threads)
    size = size_pool(fit, cluster_resources(), max(len(names), 1), device=res.device, field="resources")
    log.info(
        "campaign of %d models: %s",
        len(names),
        placement_line(size.actors, "model actor", size.device, size.torch_threads),
    )
    status = read_status(cfg.uri(), options)
    status.update(outcomes)
    write_status(cfg.uri(), status, options)
    kwargs = {"cfg": cfg.model_dump(mode="json"), "device": size.device, "threads": size.torch_threads}

    def lost(name: str, exc: Exception) -> dict:  # its actor died (out of memory, node lost): this model failed
        return dataclasses.asdict(lost_outcome(plan_model(cfg, name), cfg.uri(), options, loss_cause(exc)))

    results = run_pool(names, ModelRunner, kwargs, size, method="run", retries=res.retries, on_lost=lost)
    for result in results:
        outcome = with_earlier_seconds(Outcome(**result), status.get(result["model"]))
        outcomes[outcome.model] = status[outcome.model] = outcome
        log.info("%s: %s", outcome.model, outcome.error or f"done ({', '.join(outcome.ran) or 'nothing to run'})")
        write_status(cfg.uri(), status, options)
    leaderboard = cross = ""
    if _has_checkpoints(cfg):
        swept = run_sweep(sweep_config(cfg, [cfg.uri("dictionaries")], size.torch_threads))
        leaderboard, cross = swept.leaderboard, swept.cross_model
    return CampaignSummary(
        outcomes=[outcomes[n] for n in sorted(outcomes)],
        status=storage.join(cfg.uri(), "campaign.json"),
        leaderboard=leaderboard,
        cross_model=cross,
        seconds=time.perf_counter() - start,
        actors=size.actors,
    )


def _has_checkpoints(cfg: CampaignConfig) -> bool:
    try:
        return bool(find_checkpoints(cfg.uri("dictionaries"), cfg.storage.resolved()))
    except storage.MissingInputError:
        return False
