"""A sweep's report: the sortable HTML leaderboard and, per model and hook point, PNG plots of
L0 against explained variance and against loss recovered with the Pareto front marked."""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Collection
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import pareto_front

COLUMNS = [
    "model",
    "hook",
    "kind",
    "name",
    "architecture",
    "d_sae",
    "l0",
    "explained_variance",
    "cosine",
    "mse",
    "dead_fraction",
    "dense_fraction",
    "loss_recovered",
    "kl",
    "top1_delta",
    "gt_fraction_detected",
    "gt_mean_best_auroc",
    "gt_mean_ap",
    "gt_mean_purity",
    "gt_mean_coverage",
    "gt_best_baseline",
    "gt_margin_auroc",
    "gt_margin_detected",
    "gt_image_fraction_detected",
    "gt_image_mean_best_auroc",
    "gt_track_fraction_detected",
    "gt_track_mean_best_auroc",
    "seed",
    "stability",
    "trained_tokens",
    "checkpoint",
]
PANELS = [("explained_variance", "explained variance"), ("loss_recovered", "loss recovered")]

_SORT_SCRIPT = """
document.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const up = th.dataset.dir !== "asc";
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.dir);
  th.dataset.dir = up ? "asc" : "desc";
  const key = td => { const v = td.dataset.v; const n = parseFloat(v); return isNaN(n) ? v : n; };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a.cells[col]), y = key(b.cells[col]);
    if (x === "" || y === "") return (x === "") - (y === "");
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
  });
  rows.forEach(r => body.appendChild(r));
}));
"""
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #eee; cursor: pointer; position: sticky; top: 0; }
th[data-dir=asc]::after { content: " \\25B2"; } th[data-dir=desc]::after { content: " \\25BC"; }
td.text { text-align: left; } img { max-width: 48%; margin: 4px; }
"""


def plot_name(model: str, hook: str) -> str:
    """The file name of the plot of `(model, hook)`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}__{hook}") + ".png"


def _cell(value: Any) -> tuple[str, str]:
    """`(sort value, shown text)` of a table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", ""
    if isinstance(value, float):
        return repr(value), f"{value:.4g}"
    return str(value), str(value)


def best_ground_truth(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the largest fraction of factor values detected (then the highest mean best AUROC); None when
    no row has ground truth."""
    scored = [r for r in rows if _number(r.get("gt_mean_best_auroc")) is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (_number(r.get("gt_fraction_detected")) or 0.0, r["gt_mean_best_auroc"]))


def ground_truth_line(row: dict[str, Any], detect_auroc: float = 0.95) -> str:
    """One line on a row's ground-truth recovery and its margin over the best baselines, e.g. `m topk-8 detects
    0.500 of the factor values (AUROC >= 0.95), mean best AUROC 0.912; baselines: mean best AUROC 0.904 (raw),
    detected 0.250 (margin +0.008 AUROC, +0.250 detected)`."""

    def fmt(key: str, sign: str = "") -> str:
        value = _number(row.get(key))
        return "-" if value is None else f"{value:{sign}.3f}"

    line = (
        f"{row['model']} {row['name']} detects {fmt('gt_fraction_detected')} of the factor values "
        f"(AUROC >= {detect_auroc:g}), mean best AUROC {fmt('gt_mean_best_auroc')}"
    )
    if row.get("gt_best_baseline"):
        line += (
            f"; baselines: mean best AUROC {fmt('gt_baseline_mean_best_auroc')} ({row['gt_best_baseline']}), "
            f"detected {fmt('gt_baseline_fraction_detected')} (margin {fmt('gt_margin_auroc', '+')} AUROC, "
            f"{fmt('gt_margin_detected', '+')} detected)"
        )
    return line


def _number(value: Any) -> float | None:
    """`value` as a float; None when it is missing or NaN."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def table_html(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A sortable HTML table of `rows` (one `<tr>` per row) with `columns` as headers (a page with
    `page_html` sorts it on a header click)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            key, text = _cell(value)
            cls = "" if isinstance(value, (int, float)) else ' class="text"'
            cells.append(f'<td{cls} data-v="{html.escape(key)}">{html.escape(text)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page_html(title: str, body: str) -> str:
    """A self-contained HTML page titled `title` around `body` (HTML), its tables sortable by a header click."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        f"<script>{_SORT_SCRIPT}</script></body></html>"
    )


def leaderboard_html(table: pa.Table, plots: list[str], title: str = "prisma-ray sweep") -> str:
    """A self-contained HTML page: the metrics table (click a header to sort) and the plots."""
    columns = [c for c in COLUMNS if c in table.column_names]
    rows = table.select(columns).to_pylist()
    images = "".join(f'<img src="{html.escape(p)}" alt="{html.escape(p)}">' for p in plots)
    return page_html(
        title,
        f"<p>{len(rows)} checkpoints. Click a column header to sort.</p>{table_html(rows, columns)}"
        f"<h2>L0 against explained variance and loss recovered</h2>{images}",
    )


def column_numbers(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    """`float64[len(rows)]`: each row's `key` as a number (missing: NaN)."""
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=float)


def l0_axis(ax: Any, l0: np.ndarray) -> None:
    """Label the x axis of `ax` as L0, on a log scale where the finite positive `l0` values span over 20x."""
    finite = l0[np.isfinite(l0) & (l0 > 0)]
    if len(finite) and finite.max() / finite.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")


def front_plots(table: pa.Table, only: Collection[tuple[str, str]] | None = None) -> dict[str, bytes]:
    """`{file name: PNG bytes}`: one figure per (model, hook point) (of `only`, where given), L0 on the x axis
    against explained variance and loss recovered, coloured by architecture, the Pareto front joined and ringed."""
    if "l0" not in table.column_names:
        return {}
    rows = table.to_pylist()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if only is None or (row["model"], row["hook"]) in only:
            groups.setdefault((row["model"], row["hook"]), []).append(row)
    out = {}
    for (model, hook), members in sorted(groups.items()):
        fig = Figure(figsize=(10, 4), dpi=90)
        FigureCanvasAgg(fig)
        l0 = column_numbers(members, "l0")
        architectures = sorted({r["architecture"] for r in members})
        for ax, (key, label) in zip(fig.subplots(1, 2), PANELS):
            value = column_numbers(members, key)
            for arch in architectures:
                mine = np.array([r["architecture"] == arch for r in members])
                ax.scatter(l0[mine], value[mine], label=arch, s=28, alpha=0.8)
            front = pareto_front(l0, value)
            if front.any():
                order = np.argsort(l0[front])
                ax.plot(
                    l0[front][order], value[front][order], "k--", lw=1, drawstyle="steps-post", label="Pareto front"
                )
                ax.scatter(l0[front], value[front], s=90, facecolors="none", edgecolors="k")
            elif np.isnan(value).all():
                ax.text(0.5, 0.5, f"no {label}", ha="center", va="center", transform=ax.transAxes)
            l0_axis(ax, l0)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{model}  {hook}", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out[plot_name(model, hook)] = buf.getvalue()
    return out
