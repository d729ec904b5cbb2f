"""The cross-model page of a sweep over several models (`write_cross_model_page`; no Ray).

Written beside the sweep's leaderboard:
  cross_model.html           the leaderboard across models, the Pareto fronts of every model side by side and
                             overlaid, and which models' dictionaries share features
  cross_model.parquet        the leaderboard across models (`cross_model.leaderboard_across_models`)
  cross_model_pairs.parquet  one row per compared pair of dictionaries (`cross_model.comparable_pairs`):
                             decoder alignment (equal widths; `shared_init`: one initialisation seed, so one
                             initial decoder) and co-firing on shared held-out images

Co-firing inputs: the first `images` complete images of each (model, hook)'s held-out store (the sweep's
`evaluation.stores` and `split`: the rows the sweep scored, in store order), patch tokens only (class and
register tokens differ between models), every latent mean-pooled over an image's patch tokens; two
dictionaries are compared on the images both stores hold (same `sample_id` and frame, stores extracted from
one dataset: same dataset URI). A pair with fewer than `min_images` shared images gets a note instead of a figure.

Memory is bounded whatever the number of models: at most `MEMORY_BUDGET` bytes of decoders and pooled latents are
held at once (estimated from each dictionary's width), the pairs compared block by block (`cross_model.pair_order`).
"""

from __future__ import annotations

import html
import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prisma_ray.errors import PrismaRayError

from .. import storage
from ..sae import load_dictionary
from ..sae.io import WEIGHTS_FILE, read_checkpoint_info, read_tensors
from .checkpoint import EvalConfig
from .cross_model import (
    COFIRE_THRESHOLD,
    cofiring,
    comparable_pairs,
    decoder_alignment,
    groups_of,
    image_means,
    leaderboard_across_models,
    pair_order,
    shared_images,
    shared_init,
)
from .heldout import StoreSource, read_held_out
from .metrics import pareto_front
from .pooled_truth import image_index, patch_tokens_per_sample
from .report import PANELS, column_numbers, front_plots, l0_axis, page_html, plot_name, table_html
from .results import MARKER, ResultStore
from .stability import STABILITY_THRESHOLD

log = logging.getLogger(__name__)

IMAGES = 256
MIN_IMAGES = 16
# The most bytes of decoders and pooled latents the page holds at once (`pair_rows`): e.g. 20 dictionaries of
# 16,384 latents on 1,024-wide models (64 MiB decoder + 16 MiB pooled each) in one block, more in several passes
MEMORY_BUDGET = 2 * 2**30
PAIR_COLUMNS = [
    "model_a",
    "hook_a",
    "model_b",
    "hook_b",
    "architecture",
    "k",
    "d_in_a",
    "d_in_b",
    "d_sae_a",
    "d_sae_b",
    "decoder_matched",
    "decoder_cosine",
    "decoder_bound",
    "shared_init",
    "images",
    "cofire_fraction",
    "cofire_mean_max_corr",
    "cofire_chance",
    "cofire_live",
    "note",
    "checkpoint_a",
    "checkpoint_b",
]


def sweep_models(table: pa.Table) -> list[str]:
    """The single models (not crosscoders across models) a sweep's metrics table covers."""
    if "model" not in table.column_names:
        return []
    return sorted({m for m in table.column("model").to_pylist() if m and "+" not in m})


class _Latents:
    """Per checkpoint, while held (until `release`): its decoder and its latents mean-pooled per held-out image (or
    why not)."""

    def __init__(self, evaluation: EvalConfig, images: int):
        self.evaluation = evaluation
        self.options = evaluation.storage.resolved()
        self.images = images
        self._decoders: dict[str, np.ndarray | str] = {}
        self._pooled: dict[str, tuple[list[tuple], np.ndarray] | str] = {}

    def release(self, uri: str) -> None:
        """Drop what `uri` holds (its decoder and pooled latents; read again if asked again)."""
        self._decoders.pop(uri, None)
        self._pooled.pop(uri, None)

    def decoder(self, uri: str) -> np.ndarray | str:
        if uri not in self._decoders:
            try:
                self._decoders[uri] = read_tensors(storage.join(uri, WEIGHTS_FILE), self.options)["W_dec"].numpy()
            except (PrismaRayError, OSError) as exc:
                self._decoders[uri] = f"{uri}: {exc}"
        return self._decoders[uri]

    @torch.inference_mode()
    def pooled(self, uri: str) -> tuple[list[tuple], np.ndarray] | str:
        if uri not in self._pooled:
            try:
                self._pooled[uri] = self._read(uri)
            except (PrismaRayError, OSError) as exc:
                log.warning("co-firing: %s: %s", uri, exc)
                self._pooled[uri] = f"{uri}: {exc}"
        return self._pooled[uri]

    def _read(self, uri: str) -> tuple[list[tuple], np.ndarray]:
        info = read_checkpoint_info(uri, self.options)
        if len(info.sites.inputs) != 1:
            raise PrismaRayError(
                f"reads {len(info.sites.inputs)} hook points; co-firing compares one-site dictionaries"
            )
        store_uri = self.evaluation.store_uri(info.sites.inputs[0])
        source = StoreSource.open(store_uri, self.options)
        layout = source.layout  # a multimodal LM's store has no image grid: InvalidRequest
        per_image = patch_tokens_per_sample(layout, source.manifest.token_selection)
        held = read_held_out([store_uri], [], self.images * per_image, self.options, ["patch"])
        index, images = image_index(held.keys, layout, per_image)
        d = load_dictionary(info, self.options).eval()
        dataset = source.manifest.dataset.get("uri")  # two datasets may both hold `images/000000.png`
        keys = [(dataset, sample, frame) for sample, frame in images]
        return keys, image_means(index, len(images), held.x, d.encode, self.evaluation.batch_size)


def held_bytes(row: dict[str, Any], images: int) -> int | None:
    """What a checkpoint holds while compared (bytes, estimated from its metrics row): its float32 decoder
    `[d_sae, d_in]` and its latents pooled per image `[images, d_sae]`; None where the row lacks a width."""
    d_sae, d_in = row.get("d_sae"), row.get("d_in")
    return 4 * int(d_sae) * (int(d_in) + images) if d_sae and d_in else None


def pair_rows(
    rows: list[dict[str, Any]],
    latents: _Latents,
    min_images: int = MIN_IMAGES,
    threshold: float = STABILITY_THRESHOLD,
    cofire_threshold: float = COFIRE_THRESHOLD,
    budget: int | None = None,
) -> list[dict[str, Any]]:
    """One row per `comparable_pairs` pair: decoder alignment where the decoders have one shape, co-firing where
    both have enough shared images; `note` says what was not measured and why. At most `budget` bytes (default
    `MEMORY_BUDGET`) of decoders and pooled latents are held at once (`cross_model.pair_order`; a checkpoint whose
    row gives no width counts as the whole budget), whatever the number of models."""
    budget = MEMORY_BUDGET if budget is None else budget
    pairs = comparable_pairs(rows)
    uris = [(a["checkpoint"], b["checkpoint"]) for a, b in pairs]
    sizes = {r["checkpoint"]: held_bytes(r, latents.images) or budget for pair in pairs for r in pair}
    out: list[dict[str, Any]] = [{} for _ in pairs]
    for step, what in pair_order(uris, sizes, budget):
        if step == "release":
            latents.release(what)
        else:
            out[what] = _pair_row(*pairs[what], latents, min_images, threshold, cofire_threshold)
    return out


def _pair_row(
    a: dict[str, Any],
    b: dict[str, Any],
    latents: _Latents,
    min_images: int,
    threshold: float,
    cofire_threshold: float,
) -> dict[str, Any]:
    """The row of one pair of checkpoints' metrics rows (see `pair_rows`)."""
    row: dict[str, Any] = {
        **{f"{key}_{side}": r.get(key) for side, r in (("a", a), ("b", b)) for key in ("model", "hook")},
        "architecture": a["architecture"],
        "k": a.get("k"),
        **{f"{key}_{side}": r.get(key) for side, r in (("a", a), ("b", b)) for key in ("d_in", "d_sae")},
        "checkpoint_a": a["checkpoint"],
        "checkpoint_b": b["checkpoint"],
    }
    notes = []
    wa, wb = latents.decoder(a["checkpoint"]), latents.decoder(b["checkpoint"])
    if isinstance(wa, str) or isinstance(wb, str):
        notes.append(f"decoder unreadable ({wa if isinstance(wa, str) else wb})")
    elif wa.shape != wb.shape:
        notes.append(f"decoders {list(wa.shape)} and {list(wb.shape)} differ: no decoder alignment")
    else:
        row.update(decoder_alignment(wa, wb, threshold), shared_init=shared_init(a, b))
    pooled_a, pooled_b = latents.pooled(a["checkpoint"]), latents.pooled(b["checkpoint"])
    if isinstance(pooled_a, str) or isinstance(pooled_b, str):
        notes.append(f"no co-firing ({pooled_a if isinstance(pooled_a, str) else pooled_b})")
    else:
        xa, xb = shared_images(pooled_a, pooled_b)
        row["images"] = len(xa)
        if len(xa) < min_images:
            notes.append(f"{len(xa)} shared held-out images (< {min_images}): no co-firing")
        else:
            try:
                row.update(cofiring(xa, xb, cofire_threshold))
            except PrismaRayError as exc:
                notes.append(str(exc))
    row["note"] = "; ".join(notes)
    return row


def fronts_png(table: pa.Table) -> bytes:
    """PNG: the Pareto front (L0 against explained variance, and against loss recovered) of every (model, hook)
    overlaid, one line each."""
    fig = Figure(figsize=(12, 4.5), dpi=90)
    FigureCanvasAgg(fig)
    groups = groups_of(table.to_pylist())
    for ax, (key, label) in zip(fig.subplots(1, 2), PANELS):
        for (model, hook), members in groups.items():
            l0, value = column_numbers(members, "l0"), column_numbers(members, key)
            front = pareto_front(l0, value)
            if front.any():
                order = np.argsort(l0[front])
                ax.plot(l0[front][order], value[front][order], marker="o", ms=3, drawstyle="steps-post")
                ax.lines[-1].set_label(f"{model} {hook}")
        l0_axis(ax, column_numbers(table.to_pylist(), "l0"))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def model_matrix(pairs: list[dict[str, Any]], models: list[str], key: str) -> np.ndarray:
    """`float[models, models]`: the best `key` over every pair of hook points of two models (symmetric; NaN
    where none was measured)."""
    at = {m: i for i, m in enumerate(models)}
    out = np.full((len(models), len(models)), np.nan)
    for p in pairs:
        value = p.get(key)
        if value is None:
            continue
        i, j = at[p["model_a"]], at[p["model_b"]]
        out[i, j] = out[j, i] = np.nanmax([out[i, j], value])
    return out


def matrix_html(values: np.ndarray, labels: list[str]) -> str:
    """A table of `values [n, n]` in [0, 1] (rows and columns `labels`), each cell shaded by its value (NaN:
    blank)."""
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    for label, row in zip(labels, values):
        cells = "".join(
            "<td></td>"
            if np.isnan(v)
            else f"<td style='background:rgba(192,57,43,{min(max(v, 0.0), 1.0):.2f})'>{v:.3f}</td>"
            for v in row
        )
        body.append(f"<tr><td class='text'>{html.escape(label)}</td>{cells}</tr>")
    return f"<table class='matrix'><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_cross_model_page(
    sweep_dir: str,
    out_dir: str | None = None,
    evaluation: EvalConfig | None = None,
    images: int = IMAGES,
    min_images: int = MIN_IMAGES,
) -> str:
    """Write `cross_model.html`, `cross_model.parquet` and `cross_model_pairs.parquet` to `out_dir` (default:
    `sweep_dir`) from the sweep output at `sweep_dir` (its `metrics.parquet`); return the page's URI.

    `evaluation` is the sweep's (where the held-out stores are, how to reach them); default: the one recorded in
    the sweep's `_sweep.json` with default storage options. Co-firing reads the first `images` complete images of
    each store. Raises `MissingInputError` when `sweep_dir` holds no `metrics.parquet`.
    """
    if evaluation is None:
        recorded = json.loads(storage.read_bytes(storage.join(sweep_dir, MARKER)))
        evaluation = EvalConfig.model_validate(recorded)
    options = evaluation.storage.resolved()
    table = ResultStore(sweep_dir, options).read_table()
    out = ResultStore(out_dir or sweep_dir, options)
    board = leaderboard_across_models(table)
    out.write_table(board, "cross_model.parquet")
    rows = table.to_pylist()
    pairs = pair_rows(rows, _Latents(evaluation, images), min_images)
    out.write_table(pa.Table.from_pylist(pairs) if pairs else pa.table({}), "cross_model_pairs.parquet")

    models = sweep_models(table)
    out.write_file("cross_model_fronts.png", fronts_png(table))
    matrices = ""
    for key, caption in (("cofire_fraction", "co-firing fraction"), ("decoder_matched", "decoder matched fraction")):
        matrix = model_matrix(pairs, models, key)
        if np.isfinite(matrix).any():
            matrices += f"<h3>Best {caption} over hook points</h3>{matrix_html(matrix, models)}"
    if out.uri != storage.absolute(sweep_dir):  # the sweep wrote the per-model plots beside its own leaderboard
        for name, png in front_plots(table).items():
            out.write_file(f"plots/{name}", png)

    aligned = sum(p.get("shared_init") is not None for p in pairs)
    same = sum(bool(p.get("shared_init")) for p in pairs)
    groups = sorted({(r["model"], r["hook"]) for r in rows})
    per_model = "".join(f'<img src="plots/{html.escape(plot_name(m, h))}" alt="{html.escape(m)}">' for m, h in groups)
    board_columns = board.column_names
    body = (
        f"<p>{len(models)} models, {len(groups)} (model, hook point) groups, {len(rows)} checkpoints "
        f"(<a href='leaderboard.html'>every checkpoint</a>). <code>ev_l0_le_B</code>: the best explained variance "
        "of the dictionaries with held-out L0 &lt;= B. Click a column header to sort.</p>"
        f"{table_html(board.to_pylist(), board_columns)}"
        "<h2>Pareto fronts, overlaid</h2><img src='cross_model_fronts.png' style='max-width:100%'>"
        f"<h2>Pareto fronts per model, side by side</h2>{per_model}"
        "<h2>Shared features</h2>"
        f"<p>For every two (model, hook point) groups of different models, the dictionary config (kind, architecture, "
        f"k) they share with the highest mean explained variance. <b>Decoder alignment</b> (equal decoder shapes): "
        f"unit decoder rows matched one to one (Hungarian), the fraction with cosine &gt;= {STABILITY_THRESHOLD}; "
        "meaningful where the models share coordinates (one derived from the other). "
        f"<b>shared_init</b>: both dictionaries were initialised from one seed ({same} of the {aligned} equal-shape pairs "
        "whose seeds are recorded): "
        "they started from the same decoder whatever their models, so a high alignment may only mean they were "
        "trained little; give each model's dictionaries their own seed to compare models. <b>Co-firing</b> (any widths): "
        f"on the first {images} complete held-out images ({html.escape(evaluation.split)} split) both stores hold, "
        "each latent mean-pooled over the image's patch tokens; the fraction of A's varying latents whose best "
        f"Pearson correlation with a latent of B is &gt;= {COFIRE_THRESHOLD} (Lan et al. 2024, arXiv:2410.06981; "
        "Bricken et al. 2023), against <code>cofire_chance</code>, the same with B's images shuffled.</p>"
        + matrices
        + table_html(pairs, PAIR_COLUMNS)
    )
    page = page_html(f"prisma-ray across models: {storage.absolute(sweep_dir)}", body)
    return out.write_file("cross_model.html", page.encode())
