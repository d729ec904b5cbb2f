"""LLaVA-NeXT's high-resolution crops read as tiles: the geometry against the model's own packing, the crop-view
maps kept beside the top images, and the dashboard's tiles with heatmaps."""

from pathlib import Path

import numpy as np
import pytest
import torch

from prisma_ray.data import list_refs
from prisma_ray.data.shards import decode_shard
from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
from prisma_ray.interpret.dashboard import write_dashboard
from prisma_ray.interpret.results import read_results, write_results
from prisma_ray.interpret.tiles import canvas_image, llava_next_tiles, tile_images, tile_maps
from prisma_ray.models import TokenKind
from prisma_ray.models.inputs import sample_prompt
from prisma_ray.models.loading import load_model
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, load_dictionary, write_files
from tests.lmm_tiny import tiny_entry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "lm.blocks.1.hook_resid_post"
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_a_square_image_on_llava_nexts_wide_canvas_straddles_two_tiles():
    tiles = llava_next_tiles((336, 336), LLAVA_NEXT_PINPOINTS, 336, 14)
    assert tiles.canvas_px == (336, 672) and tiles.tiles == (1, 2) and tiles.side == 24
    assert tiles.grid == (24, 24) and (tiles.row0, tiles.col0) == (0, 12), "the padding columns are removed"
    values = np.arange(24 * 24, dtype=np.float32) + 1
    maps = tile_maps(values, tiles)
    assert maps.shape == (1, 2, 24, 24)
    assert (maps[0, 0, :, :12] == 0).all() and (maps[0, 1, :, 12:] == 0).all(), "padding patches are blank"
    assert maps[0, 0, 0, 12] == 1 and maps[0, 1, 0, 0] == 13 and maps[0, 1, 23, 11] == 24 * 24
    image = np.full((336, 336, 3), 200, np.uint8)
    cut = tile_images(image, tiles)
    assert cut.shape == (1, 2, 336, 336, 3)
    assert (cut[0, 0, :, :168] == 0).all() and (cut[0, 0, :, 168:] == 200).all(), "the image is centred on black"
    assert (canvas_image(image, tiles)[:, 168:504] == 200).all()
    with pytest.raises(ValueError, match="crop-view map of 5 tokens does not fit"):
        tile_maps(np.ones(5), tiles)


@pytest.fixture(scope="module")
def wide_next(tmp_path_factory):
    """A tiny LLaVA-NeXT whose only canvases are 28x56 and 56x28 (a 28 px image: two tiles, one padded column
    each) and a random ReLU dictionary on its `lm` layer."""
    tmp = tmp_path_factory.mktemp("tiles")
    entry = tiny_entry("llava-next")
    entry = entry.model_copy(update={"config": {**entry.config, "image_grid_pinpoints": [[28, 56], [56, 28]]}})
    torch.manual_seed(0)
    sae = Dictionary(
        DictionaryConfig(architecture="relu", d_sae=8), Sites(inputs=(Site(name=HOOK, width=32, model=entry.name),))
    )
    torch.nn.init.normal_(sae.W_enc)
    write_files(export_files(sae), str(tmp / "sae"))
    return tmp, entry


def test_the_crop_views_maps_are_kept_beside_the_top_images_and_drawn_as_tiles(wide_next):
    tmp, entry = wide_next
    shapes = dict(type="synthetic", uri=str(tmp / "shapes"), generator=dict(name="shapes", n_images=3, image_size=40))
    cfg = InterpretConfig(
        checkpoint=str(tmp / "sae"), model=entry, pretrained=False, dataset=shapes, output=str(tmp / "out"), k=2
    )
    plan = plan_interpret(cfg)
    tiles = plan.tiles
    assert tiles.tiles == (1, 2) and tiles.grid == (2, 2) and tiles.col0 == 1, "the model's own crop view"
    assert plan.description()["tiles"]["tiles"] == [1, 2]
    data = decode_shard(list_refs(plan.spec), plan.spec, plan.fmt)
    worker = LatentWorker(plan.job(torch_threads=1))
    _, _, _, crops = worker.prompt_latents(data.pixels, data.sample_ids)

    model = load_model(entry, pretrained=False, seed=0)
    prompts = [sample_prompt(["Describe the image."], s) for s in data.sample_ids]
    batch = model.encode(list(data.pixels), prompts)
    layout = model.multimodal_layout(batch)
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch, [HOOK])
        for b in range(len(data.sample_ids)):
            view = np.flatnonzero((layout.kind[b] == TokenKind.PATCH) & (layout.view[b] == 1))
            expected = load_dictionary(str(tmp / "sae")).encode(cache[HOOK][b, view]).numpy()
            np.testing.assert_allclose(crops[b], expected, rtol=1e-4, atol=1e-5)

    record, _ = worker.process(data)
    for ranking in ("max", "mean"):
        top, kept = record.top[ranking], record.crops[ranking]
        np.testing.assert_array_equal(kept.ids, top.ids)
        for latent, rank in zip(*np.nonzero(np.isfinite(top.scores))):
            b = list(data.sample_ids).index(top.ids[latent, rank])
            np.testing.assert_allclose(kept.maps[latent, rank], crops[b, :, latent].astype(np.float16))
    crops_by_id = {sid: data.pixels[i] for i, sid in enumerate(data.sample_ids)}
    write_results(str(tmp / "out"), record, plan.layout, plan.description(), crops_by_id)
    results = read_results(str(tmp / "out"))
    latent = int(np.argmax(np.isfinite(record.top["max"].scores[:, 0])))
    row = results.top_rows(latent)[0]
    assert row["crops_map"].shape == (4,) and results.tiles == tiles
    page = Path(write_dashboard(results, max_latents=8)).parent / "latents" / f"{latent}.html"
    assert "alt='tile 0,0'" in page.read_text() and "alt='tile 0,1'" in page.read_text()
    assert (page.parent.parent / "img" / str(latent) / "max-0-tile-0-1.png").exists()
