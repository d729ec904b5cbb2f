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

DETECTOR_AUROC = 0.95


def detector_values(row: dict, vocabulary: Sequence[str], threshold: float = DETECTOR_AUROC) -> list[tuple[int, str]]:
    """`(latent, value)` for each factor value of `vocabulary` that a leaderboard row's dictionary detects: its
    best latent (`gt_detail`, from the sweep's ground truth) reaches AUROC >= `threshold`."""
    detail = json.loads(row.get("gt_detail") or "{}")
    pairs = [(int(d["latent"]), name.split("=", 1)[-1]) for name, d in detail.items() if d["auroc"] >= threshold]
    return [(latent, value) for latent, value in pairs if latent >= 0 and value in vocabulary]


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


def agreement_line(agreed: float, detectors: int) -> str:
    """The summary's line on the offline explanations of the dashboard's dictionary."""
    if not detectors:
        return "no detector latents to check them against (no shape or colour value at AUROC >= 0.95)"
    return f"name the detected value of {agreed:.2f} of {detectors} detector latents (AUROC >= 0.95; ground truth)"
