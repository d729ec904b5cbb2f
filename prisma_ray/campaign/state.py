"""Which stages of a campaign's model are finished, read from what the stages themselves write (store manifests,
dictionary checkpoints, the sweep's result files, the dashboard's index), and the campaign's status file: each
model's stage reached, seconds, peak memory and error (`campaign.json`; it records failures, it decides
nothing: a rerun reads the stores again)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from .. import storage
from ..evaluate.results import ResultStore, result_key
from ..storage import StorageOptions
from ..store import store_uri
from .plan import ModelPlan

STAGES = ("extract", "train", "evaluate", "dashboard")
STATUS_FILE = "campaign.json"


def _exists(uri: str, options: StorageOptions) -> bool:
    fs, path = storage.resolve(uri, options)
    return fs.get_file_info(path).type == pafs.FileType.File


def checkpoints(plan: ModelPlan) -> list[str]:
    """The URIs of every dictionary checkpoint `plan` trains (`<output>/<dictionary name>`)."""
    return [storage.join(storage.absolute(t.output_uri), d.display_name()) for t in plan.trains for d in t.dictionaries]


def dashboard_uri(plan: ModelPlan) -> str:
    """The index of `plan`'s dashboard, under its root."""
    return storage.join(plan.root, "dashboard", plan.name, "index.html")


def finished(plan: ModelPlan, root: str, options: StorageOptions) -> dict[str, bool]:
    """Whether each stage of `plan` is done: extract (every store has its manifest), train (every dictionary
    has its cfg.json), evaluate (every dictionary has a result in the campaign's sweep), dashboard (its index;
    `stages.dashboard_current` then checks that it was drawn from the interpretation pass asked for now)."""
    stores = [store_uri(e.output, plan.name, hook, e.split) for e in plan.extracts for hook in e.hooks]
    done = ResultStore(plan.sweep.output, options).done()
    uris = checkpoints(plan)
    return {
        "extract": all(_exists(storage.join(s, "manifest.json"), options) for s in stores),
        "train": all(_exists(storage.join(u, "cfg.json"), options) for u in uris),
        "evaluate": all(result_key(u) in done for u in uris),
        "dashboard": _exists(dashboard_uri(plan), options),
    }


@dataclass
class Outcome:
    """What one model's run did: the last stage finished (`reached`, "" for none), the stages it ran this time
    and skipped as finished, seconds per stage run (wall clock, and `cpu_seconds`: the actor process's CPU time,
    all its threads, which other work on a shared machine inflates far less), the process's peak resident memory
    while it ran (MiB; GPU: peak allocated), the best checkpoint, and the error that stopped it ("" when none)."""

    model: str
    reached: str = ""
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_mib: float = 0.0
    gpu_peak_mib: float = 0.0
    best: str = ""
    dashboard: str = ""
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.reached == STAGES[-1]


def with_earlier_seconds(outcome: Outcome, earlier: Outcome | None) -> Outcome:
    """`outcome` with the seconds `earlier` (the status file's outcome of the same model) recorded for the stages
    that `outcome` did not run (skipped as finished, or not reached: a run refused or failed before them keeps the
    record of the runs that did them): the seconds of a model's stages across the runs that did them."""
    if earlier is not None:
        kept = {stage: s for stage, s in earlier.seconds.items() if stage not in outcome.ran}
        outcome.seconds = {**kept, **outcome.seconds}
        kept = {stage: s for stage, s in earlier.cpu_seconds.items() if stage not in outcome.ran}
        outcome.cpu_seconds = {**kept, **outcome.cpu_seconds}
    return outcome


def read_status(root: str, options: StorageOptions) -> dict[str, Outcome]:
    """The status file under `root` (empty when there is none)."""
    uri = storage.join(root, STATUS_FILE)
    if not _exists(uri, options):
        return {}
    return {m: Outcome(**o) for m, o in json.loads(storage.read_bytes(uri, options)).items()}


def write_status(root: str, outcomes: dict[str, Outcome], options: StorageOptions) -> str:
    """Write every model's outcome to `root/campaign.json`; return its URI."""
    uri = storage.join(root, STATUS_FILE)
    data = {m: asdict(o) for m, o in sorted(outcomes.items())}
    storage.write_bytes(uri, json.dumps(data, indent=1).encode(), options)
    return uri


def lost_outcome(plan: ModelPlan, root: str, options: StorageOptions, cause: str) -> Outcome:
    """The outcome of `plan`'s model whose actor died (`cause`: why, in words, e.g. `runtime.pool.loss_cause`): the
    last stage finished (`reached`) and the stage it died in, read from what the stages wrote (`finished`)."""
    done = finished(plan, root, options)
    reached = ""
    for stage in STAGES:
        if not done[stage]:
            break
        reached = stage
    during = next((f"during {s}" for s in STAGES if not done[s]), "after its last stage")
    error = (
        f"ActorDied: the actor running {plan.name} died {during}: {cause}; the campaign went on with a fresh actor "
        "(a rerun resumes this model; give each actor more memory, or fewer actors per node, if it runs out again)"
    )
    return Outcome(model=plan.label, reached=reached, error=error)  # the entry's name, as `run_model` records it


def outcome_table(outcomes: list[Outcome]) -> list[str]:
    """One line per model: name, stage reached, stages run this time, seconds, peak memory (MiB: the actor's
    resident memory, or the GPU memory allocated where larger) and error; the header first."""
    width = max([24, *(len(o.model) for o in outcomes)])
    lines = [f"{'model':<{width}} {'reached':<9} {'ran':<28} {'seconds':>8} {'peak MiB':>9}  error"]
    for o in outcomes:
        lines.append(
            f"{o.model:<{width}} {o.reached or '-':<9} {','.join(o.ran) or '-':<28} {sum(o.seconds.values()):>8.1f} "
            f"{max(o.peak_mib, o.gpu_peak_mib):>9.0f}  {o.error}"
        )
    return lines
