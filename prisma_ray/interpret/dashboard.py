"""Feature dashboards: a static, self-contained HTML site rendered from the results of a top-activations pass.

    <output>/index.html               every latent: search box, columns sortable by frequency, activation, score
    <output>/latents/<latent>.html    top images with heatmap overlays and active-patch masks (videos: an
                                      animated overlay and a frame strip), activation histogram,
                                      explanation and scores (from `explanations.jsonl`, when present);
                                      multimodal language models: beside them the top text tokens, each
                                      in its prompt context with the image the prompt asked about;
                                      LLaVA-NeXT: each top image's high-resolution tiles with their heatmaps
    <output>/img/...                  the PNG/GIF files the pages show

No external resource is referenced: the site opens from disk, a bucket or any static web server.
"""

from __future__ import annotations

import html
import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import storage
from .evidence import ExplanationRecord, read_explanations
from .heatmaps import active_mask, frame_overlays, gif_bytes, mask_image, overlay, patch_grid, png_bytes, strip
from .results import KIND_NAMES, Results
from .texttop import IMAGE_PIECE, MARK
from .tiles import tile_images, tile_maps

log = logging.getLogger(__name__)

DISPLAY_PIXELS = 128
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
table{border-collapse:collapse}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#eee;user-select:none}img{image-rendering:pixelated;display:block}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #ddd;padding:6px;font-size:12px}
.card .row{display:flex;gap:4px}.tiles{margin-left:8px;display:flex;flex-direction:column;gap:2px}.context{font-family:monospace;white-space:pre-wrap;max-width:40em}
mark{background:#f5b041}.explanation{font-size:1.2em;margin:.5em 0}.muted{color:#777}
"""
_SORT_JS = """
function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),b=t.tBodies[0];
const asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const key=r=>{const c=r.children[i],v=c.dataset.v!==undefined?c.dataset.v:c.textContent;const n=parseFloat(v);return isNaN(n)?v:n};
[...b.rows].sort((x,y)=>{const a=key(x),c=key(y);return (a>c?1:a<c?-1:0)*(asc?1:-1)}).forEach(r=>b.appendChild(r))}
function filterRows(q){q=q.toLowerCase();for(const r of document.querySelectorAll('#latents tbody tr'))
r.style.display=r.textContent.toLowerCase().includes(q)?'':'none'}
"""


def _page(title: str, body: str, script: str = "") -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style><script>{script}</script></head><body>{body}</body></html>"
    )


def histogram_svg(values: np.ndarray, bins: int = 24, width: int = 360, height: int = 100) -> str:
    """An inline SVG bar chart of `values` (empty values: a note)."""
    if len(values) == 0:
        return "<p class='muted'>never fired</p>"
    counts, edges = np.histogram(values, bins=bins)
    bar = width / bins
    rects = "".join(
        f"<rect x='{i * bar:.1f}' y='{height - h:.1f}' width='{bar - 1:.1f}' height='{h:.1f}' fill='#c0392b'/>"
        for i, h in enumerate(counts / max(counts.max(), 1) * (height - 4))
    )
    axis = (
        f"<text x='0' y='{height + 14}' font-size='11'>{edges[0]:.3g}</text>"
        f"<text x='{width}' y='{height + 14}' font-size='11' text-anchor='end'>{edges[-1]:.3g}</text>"
    )
    return f"<svg width='{width}' height='{height + 18}' role='img'>{rects}{axis}</svg>"


def primary_score(record: ExplanationRecord | None) -> float | None:
    """The first score of an explanation that is not a baseline (the index's `score` column)."""
    if record is None:
        return None
    return next((v for k, v in record.scores.items() if not k.endswith("_baseline")), None)


class DashboardWriter:
    """Writes the site for `results` under `output` (default: the results' own directory)."""

    def __init__(
        self,
        results: Results,
        output: str | None = None,
        options: storage.StorageOptions | None = None,
        per_latent: int = 8,
        max_latents: int | None = None,
        progress: bool = False,
    ):
        self.results, self.options, self.per_latent, self.progress = results, options, per_latent, progress
        self.output = output or results.uri
        self.layout = results.layout
        self.explanations = read_explanations(results.uri, results.options)
        self.latents = shown_latents(results, max_latents)
        self.alive = len(shown_latents(results))
        self.rows = {int(r["latent"]): r for r in results.latents.to_pylist()}

    def write(self) -> str:
        """Render every page (with a progress bar over the latents where `progress`); return the URI of `index.html`.

        The index is written last, after every latent's page."""
        log.info(
            "dashboard: rendering %d latent pages (%d latents fired; max_latents shows fewer)",
            len(self.latents),
            self.alive,
        )
        pages = tqdm(self.latents, desc="dashboard", unit="latent", disable=not self.progress)
        thumbs = {latent: self._latent_page(latent) for latent in pages}
        self._write("index.html", self._index(thumbs).encode())
        log.info("dashboard of %d latents written to %s", len(self.latents), self.output)
        return storage.join(self.output, "index.html")

    def _write(self, rel: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.output, rel), data, self.options)

    def _index(self, thumbs: dict[int, str | None]) -> str:
        head = "".join(
            f"<th onclick='sortBy(this)'>{h}</th>"
            for h in ("latent", "top image", "explanation", "score", "frequency", "mean act.", "max act.", "top kinds")
        )
        rows = []
        for latent in self.latents:
            r, e = self.rows[latent], self.explanations.get(latent)
            score = primary_score(e)
            thumb = f"<img src='{thumbs[latent]}' width='48' height='48' alt=''>" if thumbs[latent] else ""
            rows.append(
                f"<tr><td data-v='{latent}'><a href='latents/{latent}.html'>{latent}</a></td><td>{thumb}</td>"
                f"<td>{html.escape(e.explanation) if e else ''}</td>"
                f"<td data-v='{score if score is not None else -1}'>{'' if score is None else f'{score:.3f}'}</td>"
                f"<td data-v='{r['frequency']}'>{r['frequency']:.2e}</td><td>{r['mean_activation']:.3g}</td>"
                f"<td>{r['max_activation']:.3g}</td><td>{self._kinds(r)}</td></tr>"
            )
        s = self.results.summary
        body = (
            f"<h1>{html.escape(s['model'])} · {html.escape(s['hook'])}</h1>"
            f"<p class='muted'>{html.escape(s['checkpoint'])} · {s['n_samples']} samples · "
            f"{self.alive} of {s['n_latents']} latents fired · {len(self.latents)} shown</p>"
            "<input id='q' placeholder='search latents, explanations' oninput='filterRows(this.value)' size='40'>"
            f"<table id='latents'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
        return _page(f"{s['model']} {s['hook']} latents", body, _SORT_JS)

    def _kinds(self, row: dict[str, Any]) -> str:
        parts = [f"{name} {row[f'top_{name}']:.0%}" for name in KIND_NAMES.values() if row[f"top_{name}"] > 0]
        return ", ".join(parts)

    def _latent_page(self, latent: int) -> str | None:
        """Write `latents/<latent>.html` and its images; return the index thumbnail's path (or None)."""
        r, e = self.rows[latent], self.explanations.get(latent)
        sections, thumb = [], None
        for ranking in ("max", "mean"):
            cards = []
            for row in self.results.top_rows(latent, ranking)[: self.per_latent]:
                files = self._images(latent, ranking, row)
                thumb = thumb or files[1]
                imgs = "".join(f"<img src='../{f}' alt='{k}'>" for k, f in zip(("image", "heatmap", "mask"), files))
                imgs += self._tiles(latent, ranking, row)
                cards.append(
                    f"<div class='card'><div class='row'>{imgs}</div>{html.escape(row['sample_id'])} · "
                    f"{ranking} {row['score']:.3g}</div>"
                )
            sections.append(f"<h2>Top samples by {ranking} activation</h2><div class='cards'>{''.join(cards)}</div>")
        sections.append(self._text_section(latent))
        _, values = self.results.values(latent)
        explanation = ""
        if e:
            scores = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in e.scores.items())
            explanation = (
                f"<p class='explanation'>{html.escape(e.explanation)}</p><p class='muted'>"
                f"explainer: {html.escape(e.explainer)}</p><table>{scores}</table>"
            )
        tokens = "image tokens" if self.results.text is not None else "tokens"  # the maps read no text token
        body = (
            f"<p><a href='../index.html'>all latents</a></p><h1>Latent {latent}</h1>{explanation}"
            f"<p>fires on {r['frequency']:.2%} of {tokens} and {r['sample_frequency']:.2%} of samples; mean "
            f"activation {r['mean_activation']:.3g} ({r['mean_when_firing']:.3g} when firing), max "
            f"{r['max_activation']:.3g}; top tokens: {self._kinds(r) or '-'}</p>"
            f"<h2>Activation histogram</h2>{self._histogram(latent, values)}{''.join(sections)}"
        )
        self._write(f"latents/{latent}.html", _page(f"latent {latent}", body).encode())
        return thumb

    def _histogram(self, latent: int, values: np.ndarray) -> str:
        """The histogram of the firing-value sample (image tokens); for a latent that fired on text tokens only,
        where that sample is empty, a line saying so with the count and range of its top text-token values."""
        texts = self.results.text_rows(latent)
        if len(values) == 0 and texts:
            scores = [row["score"] for row in texts]
            return (
                "<p class='muted'>fires on text tokens only: it fired on no image token (base view) and is among "
                f"the top text tokens of {len(texts)} samples (activation {min(scores):.3g} to {max(scores):.3g}; "
                "see Top text tokens below)</p>"
            )
        return f"<p class='muted'>max activation on {len(values)} random samples it fires on</p>{histogram_svg(values)}"

    def _tiles(self, latent: int, ranking: str, row: dict[str, Any]) -> str:
        """LLaVA-NeXT: one top sample's high-resolution tiles, each with its heatmap (padding patches blank), in
        their places on the canvas; "" for other models."""
        tiles = self.results.tiles
        if tiles is None or "crops_map" not in row:
            return ""
        where = f"latent {latent}, {ranking} rank {row['rank']}, sample {row['sample_id']!r}, crop view"
        maps = tile_maps(row["crops_map"], tiles)
        images = tile_images(self.results.image(row["sample_id"]), tiles)
        vmax = max(float(maps.max()), float(row["map"].max()))  # one scale with the base view's heatmap
        scale = max(1, DISPLAY_PIXELS // tiles.tile_px)
        cells = []
        for r in range(tiles.tiles[0]):
            line = []
            for c in range(tiles.tiles[1]):
                name = f"img/{latent}/{ranking}-{row['rank']}-tile-{r}-{c}.png"
                self._write(name, png_bytes(overlay(images[r, c], maps[r, c], vmax=vmax or None, where=where), scale))
                line.append(f"<img src='../{name}' alt='tile {r},{c}' title='tile {r},{c}'>")
            cells.append(f"<div class='row'>{''.join(line)}</div>")
        return f"<div class='tiles' title='high-resolution tiles'>{''.join(cells)}</div>"

    def _text_section(self, latent: int) -> str:
        """The top text tokens of `latent` (multimodal language models), each in its context beside the image
        its prompt asked about; "" for results without text tokens."""
        cards = []
        for row in self.results.text_rows(latent)[: self.per_latent]:
            crop = self.results.image(row["sample_id"])
            image = f"img/{latent}/text-{row['rank']}.png"
            self._write(image, png_bytes(crop, max(1, DISPLAY_PIXELS // crop.shape[-2])))
            cards.append(
                f"<div class='card'><div class='row'><img src='../{image}' alt='image'>"
                f"<div class='context'>{marked_context(row['context'])}</div></div>"
                f"{html.escape(row['sample_id'])} · token {html.escape(repr(row['token']))} at {row['position']} · "
                f"{row['score']:.3g}</div>"
            )
        if not cards:
            return ""
        return (
            "<h2>Top text tokens</h2><p class='muted'>each sample's most active prompt token, in its context "
            f"(the image's tokens read {html.escape(IMAGE_PIECE)})</p><div class='cards'>{''.join(cards)}</div>"
        )

    def _images(self, latent: int, ranking: str, row: dict[str, Any]) -> tuple[str, str, str]:
        """Write the image, heatmap overlay and mask of one top sample; return their paths."""
        crop = self.results.image(row["sample_id"])
        grid = patch_grid(row["map"], self.layout)
        where = f"latent {latent}, {ranking} rank {row['rank']}, sample {row['sample_id']!r}"
        stem = f"img/{latent}/{ranking}-{row['rank']}"
        scale = max(1, DISPLAY_PIXELS // crop.shape[-2])
        if crop.ndim == 4:
            overlays = frame_overlays(crop, grid, self.layout.tubelet, where=where)
            files = (f"{stem}-frames.png", f"{stem}-heatmap.gif", f"{stem}-mask.png")
            self._write(files[0], png_bytes(strip(list(overlays)), scale))
            self._write(files[1], gif_bytes(overlays, scale=scale))
            peak = np.unravel_index(grid.argmax(), grid.shape)[0]
            self._write(files[2], png_bytes(mask_image(active_mask(grid[peak]), crop.shape[1:3]), scale))
            return files
        files = (f"{stem}-image.png", f"{stem}-heatmap.png", f"{stem}-mask.png")
        self._write(files[0], png_bytes(crop, scale))
        self._write(files[1], png_bytes(overlay(crop, grid[0], where=where), scale))
        self._write(files[2], png_bytes(mask_image(active_mask(grid[0]), crop.shape[:2]), scale))
        return files


def marked_context(context: str) -> str:
    """A text token's context (`texttop`: the token between `[[` and `]]`) as HTML, the token in `<mark>`."""
    before, _, rest = context.partition(MARK[0])
    token, _, after = rest.rpartition(MARK[1])
    return f"{html.escape(before)}<mark>{html.escape(token)}</mark>{html.escape(after)}"


def shown_latents(results: Results, max_latents: int | None = None) -> list[int]:
    """The latents a dashboard of `results` has a page for: those that fired (multimodal language models: on an
    image token or, with top text tokens, on a text token), in index order, the first `max_latents` (None: all)."""
    alive = results.fired_latents()
    return alive[:max_latents] if max_latents else alive


def write_dashboard(
    results: Results,
    output: str | None = None,
    options: storage.StorageOptions | None = None,
    per_latent: int = 8,
    max_latents: int | None = None,
    progress: bool = False,
) -> str:
    """Render the dashboard of `results` (a progress bar over its latents where `progress`); return the URI of
    its `index.html`."""
    return DashboardWriter(results, output, options, per_latent, max_latents, progress).write()
