"""A dashboard rendered by headless Chromium (file:// only) shows its images: a screenshot of a latent page and of
the index differ a lot from the same pages with their images removed, and hold many colourful pixels."""

import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from prisma_ray.data.shards import decode_shard
from prisma_ray.data.sources import list_refs
from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
from prisma_ray.interpret.dashboard import write_dashboard
from prisma_ray.interpret.results import needed_samples, read_results, write_results

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, tmp_path, name: str) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1000,900",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB")).astype(np.int16)


def colourful(shot: np.ndarray) -> int:
    """Pixels far from grey (text and the page are grey or black; the shapes and heatmaps are not)."""
    return int(((shot.max(-1) - shot.min(-1)) > 80).sum())


def without_images(page, name: str) -> str:
    bare = page.parent / f"{name}-bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", page.read_text()))
    return bare.as_uri()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_dashboard_pages_show_their_images(toy_sae, tmp_path):
    dataset = dict(
        type="synthetic",
        uri=str(tmp_path / "shapes"),
        generator=dict(name="shapes", n_images=24, image_size=32, n_objects=[1, 1], size_range=[0.25, 0.4]),
    )
    cfg = InterpretConfig(checkpoint=toy_sae.checkpoint, dataset=dataset, output=str(tmp_path / "site"), k=4)
    plan = plan_interpret(cfg)
    data = decode_shard(list_refs(plan.spec), plan.spec, plan.fmt)
    record, _ = LatentWorker(plan.job(torch_threads=1)).process(data)
    crops = {s: p for s, p in zip(data.sample_ids.tolist(), data.pixels) if s in needed_samples(record)}
    write_results(cfg.output, record, plan.layout, plan.description(), crops)
    write_dashboard(read_results(cfg.output), per_latent=4, max_latents=6)
    site = tmp_path / "site"
    for page in (site / "latents" / sorted(p.name for p in (site / "latents").glob("*.html"))[0], site / "index.html"):
        shot = screenshot(page.as_uri(), tmp_path, page.stem)
        bare = screenshot(without_images(page, page.stem), tmp_path, f"{page.stem}-bare")
        changed = (np.abs(shot - bare).max(-1) > 30).mean()
        assert changed > 0.03, f"{page}: the images change only {changed:.1%} of the screenshot"
        assert colourful(shot) > 5 * max(colourful(bare), 200), f"{page}: too few colourful pixels"
