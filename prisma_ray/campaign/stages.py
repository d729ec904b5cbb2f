"""One model's stages, in the calling process (no Ray of its own): what a campaign actor runs for each model in
turn. Each stage is the library's own job run with `runtime.pool.inline` (its pool's worker runs here, so the
actor's start-up is paid once per actor, not once per stage and model) and `models.reuse.reuse_models` (the model
is built once for all of its stages, and dropped before the next model's); finished stages are skipped
(`state.finished`); an error stops this model only and is recorded in its `Outcome`.

    extract (train + test split, every hook point) -> train (the dictionary grid per hook point, Ray Train's
    local mode) -> evaluate (the sweep of its dictionaries into the campaign's sweep output) -> dashboard of the
    dictionary with the best held-out explained variance
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import psutil
import torch

from .. import storage
from ..evaluate.results import ResultStore
from ..evaluate.sweep import run_sweep
from ..extract.pipeline import run_extract
from ..extract.plan import plan_extract
from ..interpret.collect import plan_interpret
from ..interpret.dashboard import write_dashboard
from ..interpret.pipeline import changed_from_results, run_interpret
from ..interpret.results import read_results
from ..models.reuse import reuse_models
from ..runtime.pool import inline
from ..train.job import run_training
from .config import CampaignConfig
from .explain import explain_latents
from .plan import ModelPlan, plan_model
from .state import STAGES, Outcome, checkpoints, dashboard_uri, finished

log = logging.getLogger(__name__)

# What a stage's sizing sees inside a campaign actor: room for its one worker and one read, run in this process.
INLINE_CPUS = 2.0


class StageFailed(RuntimeError):
    """A stage finished without doing all of its work (a store incomplete, a checkpoint not evaluated)."""


def extract(cfg: CampaignConfig, plan: ModelPlan) -> None:
    for job in plan.extracts:
        summary = run_extract(job)
        if not summary.complete:
            raise StageFailed(f"extraction of the {job.split} split left stores incomplete")


def check_extracted(plan: ModelPlan) -> None:
    """Refuse finished stores as `extract` would refuse them (`plan_extract`: a store written by another config,
    e.g. other data, or inputs that are gone), so that their manifests alone do not skip the model's stages and
    keep the old dictionaries and leaderboard."""
    for job in plan.extracts:
        plan_extract(job)


def train(cfg: CampaignConfig, plan: ModelPlan) -> None:
    for job in plan.trains:
        run_training(job)


def evaluate(cfg: CampaignConfig, plan: ModelPlan) -> None:
    summary = run_sweep(plan.sweep)
    if summary.failed:
        raise StageFailed("; ".join(f"{f['checkpoint']}: {f['error']}" for f in summary.failed))


def best_row(cfg: CampaignConfig, plan: ModelPlan) -> dict:
    """`plan`'s leaderboard row with the best held-out explained variance in its sweep's results."""
    mine = set(checkpoints(plan))
    rows = [
        r for r in ResultStore(plan.sweep.output, cfg.storage.resolved()).table().to_pylist() if r["checkpoint"] in mine
    ]
    if not rows:
        raise StageFailed(f"no evaluated dictionary of {plan.name} in {plan.sweep.output}")
    return max(rows, key=lambda r: r["explained_variance"] or 0.0)


def best_checkpoint(cfg: CampaignConfig, plan: ModelPlan) -> str:
    """`plan`'s checkpoint with the best held-out explained variance in its sweep's results."""
    return best_row(cfg, plan)["checkpoint"]


def dashboard(cfg: CampaignConfig, plan: ModelPlan, device: str, threads: int | None) -> str:
    """The dashboard of `plan`'s best dictionary over its dashboard data (explained first where the entry says
    `explain`); return its index URI."""
    best = best_row(cfg, plan)
    summary = run_interpret(plan.interpret(cfg, best["checkpoint"], device, threads))
    options, latents = cfg.storage.resolved(), plan.settings.dashboard_latents
    results = read_results(summary.output, options)
    if plan.settings.explain:
        explain_latents(results, best, latents, options)
    return write_dashboard(results, storage.join(plan.root, "dashboard", plan.name), options, max_latents=latents)


def dashboard_current(cfg: CampaignConfig, plan: ModelPlan, device: str, threads: int | None) -> bool:
    """Whether `plan`'s dashboard was drawn from the interpretation pass this config asks for now: its results
    under `<root>/interpret/<model>` are of the best checkpoint (which further training or dictionaries change),
    the dashboard data, the model as extracted and `k` (`interpret.pipeline.changed_from_results`). Its index
    alone does not say so; a stale dashboard is drawn again (the interpretation pass replaced). The number of
    latents drawn (`dashboard_latents`) and `explain` are not compared."""
    job = plan.interpret(cfg, best_checkpoint(cfg, plan), device, threads)
    earlier = changed_from_results(plan_interpret(job), storage.absolute(job.output))
    return earlier is not None and not earlier[0]


class MemoryPeak:
    """The peak resident memory of this process (MiB, sampled every `every` s) and the peak CUDA memory allocated
    (MiB) while the block runs."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak_mib, self.gpu_peak_mib = every, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak_mib = max(self.peak_mib, process.memory_info().rss / 2**20)
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> MemoryPeak:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.gpu_peak_mib = torch.cuda.max_memory_allocated() / 2**20


def run_model(cfg: CampaignConfig, name: str, device: str = "cpu", threads: int | None = None) -> Outcome:
    """Run every unfinished stage of model `name` here, on `device` with `threads` torch threads; return what it
    did. Any error stops this model and is returned in the outcome (`error`: its type and first line)."""
    outcome, options = Outcome(model=name), cfg.storage.resolved()
    resources = {"CPU": INLINE_CPUS, "GPU": 1.0 if device == "cuda" else 0.0}
    with MemoryPeak() as peak, inline(resources), reuse_models():
        try:
            plan = plan_model(cfg, name, device, threads)
            done = finished(plan, cfg.uri(), options)
            if done["extract"]:
                check_extracted(plan)
            for stage in STAGES:
                if stage == "dashboard" and done[stage]:
                    done[stage] = dashboard_current(cfg, plan, device, threads)
                if done[stage]:
                    outcome.skipped.append(stage)
                else:
                    start, cpu = time.perf_counter(), time.process_time()
                    if stage == "dashboard":
                        dashboard(cfg, plan, device, threads)
                    else:
                        {"extract": extract, "train": train, "evaluate": evaluate}[stage](cfg, plan)
                    outcome.seconds[stage] = round(time.perf_counter() - start, 2)
                    outcome.cpu_seconds[stage] = round(time.process_time() - cpu, 2)
                    outcome.ran.append(stage)
                outcome.reached = stage
            outcome.best = best_checkpoint(cfg, plan)
            outcome.dashboard = dashboard_uri(plan)
        except Exception as exc:  # noqa: BLE001 - recorded: one model's failure must not stop the campaign
            first = (str(exc).strip().splitlines() or [""])[0]
            outcome.error = f"{type(exc).__name__}: {first}"[:500]
            log.warning("%s failed after %s: %s", name, outcome.reached or "no stage", outcome.error, exc_info=True)
    outcome.peak_mib, outcome.gpu_peak_mib = round(peak.peak_mib, 1), round(peak.gpu_peak_mib, 1)
    return outcome


class ModelRunner:
    """A campaign actor: built once, it runs `run_model` for each model it is sent, in turn (the pool keeps it
    for the whole campaign); a plain class, called directly by tests."""

    def __init__(self, cfg: dict[str, Any], device: str, threads: int | None):
        self.cfg, self.device, self.threads = CampaignConfig.model_validate(cfg), device, threads
        if threads:
            torch.set_num_threads(threads)

    def run(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(run_model(self.cfg, name, self.device, self.threads))
