"""Token maps drawn over the input (each frame for video) and matplotlib figures, as PNG bytes. Pure functions."""

from __future__ import annotations

import html
import io
from base64 import b64encode

import numpy as np

from ..interpret.heatmaps import frame_overlays, overlay, patch_grid, strip
from ..models.spec import TokenLayout


def token_overlay(pixels: np.ndarray, values: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """`uint8`: the patch tokens' `values [T]` over the image, or over each frame side by side for a clip."""
    grid = patch_grid(np.asarray(values, dtype=np.float32), layout)
    if pixels.ndim == 3:
        return overlay(pixels, grid[0])
    return strip(frame_overlays(pixels, grid, layout.tubelet))


def overlay_grid(cells: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str], title: str) -> bytes:
    """PNG of a table of overlay images with row and column labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(cells), len(cells[0])
    aspect = cells[0][0].shape[1] / cells[0][0].shape[0]
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols * aspect + 0.6, 1.6 * rows + 0.6), squeeze=False)
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def matrix_png(values: np.ndarray, row_labels: list[str], col_labels: list[str], title: str, cbar: str) -> bytes:
    """PNG heat map of `values [rows, cols]` (diverging colours centred at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = np.abs(values[np.isfinite(values)])  # NaN/inf cells are drawn as missing (blank), not as colours
    top = float(finite.max()) if finite.size else 1.0
    top = top or 1.0
    fig, ax = plt.subplots(figsize=(min(2 + 0.12 * values.shape[1], 24), 1 + 0.35 * values.shape[0]))
    im = ax.imshow(values, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    step = max(1, len(col_labels) // 32)
    ax.set_xticks(range(0, len(col_labels), step), col_labels[::step], fontsize=6, rotation=90)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar)
    return _png(fig)


def lines_png(series: dict[str, np.ndarray], x_labels: list[str], title: str, ylabel: str) -> bytes:
    """PNG line plot of named series over `x_labels` (e.g. layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(x_labels), 3))
    for name, ys in series.items():
        ax.plot(range(len(ys)), ys, marker="o", label=name)
    ax.set_xticks(range(len(x_labels)), x_labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def token_labels(layout: TokenLayout) -> list[str]:
    """A short label per token position: prefix kind, or `t/r/c` of the patch."""
    prefix = [kind.name.lower() for kind in layout.prefix]
    patches = [f"{t}/{r}/{c}" if layout.time > 1 else f"{r}/{c}" for t, r, c in layout.patch_positions()]
    return prefix + patches


def html_page(title: str, sections: list[tuple[str, bytes]], facts: dict[str, object]) -> str:
    """A self-contained HTML page: a table of `facts`, then each `(caption, png)` inline."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{b64encode(png).decode()}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>"
        for caption, png in sections
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:1em}th{text-align:left;padding-right:1em}img{max-width:100%}"
        f"</style></head><body><h1>{html.escape(title)}</h1><table>{rows}</table>{figures}</body></html>"
    )


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
