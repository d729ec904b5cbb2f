"""A campaign entry's explain step (`Entry.explain`): the offline explainer on the latents its dashboard shows and
on its detector latents (those whose ground truth says they detect a factor value), and how often the explanations
name the value detected (`interpret.autointerp.scoring.agreement`). Runs in the calling process (no Ray)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..interpret.autointerp.run import ExplainConfig, run_explain
from ..interpret.autointerp.scoring import agreement
from ..interpret.dashboard import shown_latents
from ..interpret.evidence import read_explanations
from ..interpret.results import Results
from ..storage import StorageOptions


def detector_values(row: dict, vocabulary: Sequence[str]) -> list[tuple[int, str]]:
    """`(latent, value)` for each detector latent of a leaderboard row's dictionary (`gt_detectors`, from the sweep's
    ground truth: a latent whose best factor value reaches AUROC >= the sweep's `detect_auroc`, counted once with
    that value, `evaluate.ground_truth.detector_latents`) whose value is a word of `vocabulary`."""
    found = json.loads(row.get("gt_detectors") or "[]")
    return [(int(d["latent"]), d["value"]) for d in found if d["value"] in vocabulary]


def explain_config(results: Results, row: dict, max_latents: int, options: StorageOptions) -> ExplainConfig:
    """The offline explainer (vocabulary of shapes and colours, in this process) on the first `max_latents` latents
    that a dashboard of `results` shows, then the detector latents of `row` (the dictionary's leaderboard row)."""
    explain = ExplainConfig(evidence=results.uri, storage=options, use_ray=False)
    shown = shown_latents(results, max_latents)  # explained: the latents with a page, not every one that fired
    extra = sorted({latent for latent, _ in detector_values(row, explain.vocabulary)} - set(shown))
    return explain.model_copy(update={"latents": shown + extra})


def explain_latents(results: Results, row: dict, max_latents: int, options: StorageOptions) -> None:
    """Explain the latents of `explain_config` into `results`' explanations.jsonl (those already explained are
    skipped), before the dashboard is written, so that its pages show them."""
    run_explain(explain_config(results, row, max_latents, options))


def explained_agreement(evidence: str, row: dict, options: StorageOptions) -> tuple[float, int]:
    """The fraction of `row`'s detector latents whose explanation (in `evidence`'s explanations.jsonl) names the
    value they detect, and the count of detector latents (NaN and 0 without any)."""
    vocabulary = ExplainConfig().vocabulary
    detectors = detector_values(row, vocabulary)
    texts = {latent: r.explanation for latent, r in read_explanations(evidence, options).items()}
    return agreement(detectors, texts, vocabulary), len(detectors)


def agreement_line(agreed: float, detectors: int, detect_auroc: float) -> str:
    """The summary's line on the offline explanations of the dashboard's dictionary, whose detector latents reach
    AUROC >= `detect_auroc` (the sweep's `EvalConfig.detect_auroc`)."""
    if not detectors:
        return f"no detector latents to check them against (no shape or colour value at AUROC >= {detect_auroc:g})"
    return (
        f"name the detected value of {agreed:.2f} of {detectors} detector latents "
        f"(AUROC >= {detect_auroc:g}; ground truth)"
    )
