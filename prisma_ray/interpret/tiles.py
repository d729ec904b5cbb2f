"""LLaVA-NeXT's high-resolution crops ("anyres" tiles) as images with heatmaps (display only; pure functions).

LLaVA-NeXT (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge"; Hugging Face
`LlavaNextImageProcessor` and `LlavaNextModel.pack_image_features`) shows the tower the base view (the image
resized to `tile_px`) and a canvas of tiles: the image resized to fit the best of `image_grid_pinpoints`
(`select_best_resolution`), padded to it (centred) and cut into `tile_px` squares, each encoded into a
`side x side` patch grid (`side = tile_px // patch_px`). The language model reads the tiles' patches as one
grid over the canvas with the padding rows or columns removed (`unpad_image`): the model's `MultimodalLayout`
view 1. `TileGeometry` maps that grid back onto the tiles, so each tile can be drawn with its own heatmap.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from prisma_ray.errors import InvalidRequest


class TileGeometry(BaseModel):
    """Where the crop view's tokens lie on the tiles: `tiles (rows, cols)` of `tile_px` pixels and `side x side`
    patches each, the view's `grid (rows, cols)` and the canvas patch (`row0`, `col0`) of its first token (the
    padding removed above and to the left)."""

    model_config = ConfigDict(frozen=True)

    image_hw: tuple[int, int]
    canvas_px: tuple[int, int]
    tile_px: int
    side: int
    tiles: tuple[int, int]
    grid: tuple[int, int]
    row0: int
    col0: int


def llava_next_tiles(image_hw: tuple[int, int], pinpoints: list, tile_px: int, patch_px: int) -> TileGeometry:
    """The tiles of an image of `image_hw` pixels: the canvas from `select_best_resolution(image_hw, pinpoints)`,
    the view's grid and offset from `unpad_image` applied to the canvas's patch indices (the model's own rule)."""
    import torch
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    canvas = tuple(int(v) for v in select_best_resolution(tuple(image_hw), pinpoints))
    side = tile_px // patch_px
    tiles = (canvas[0] // tile_px, canvas[1] // tile_px)
    index = torch.arange(tiles[0] * side * tiles[1] * side).reshape(  # host: patch indices, no model tensor
        1, tiles[0] * side, tiles[1] * side
    )
    kept = unpad_image(index, torch.tensor(image_hw))[0]  # host: patch indices, no model tensor
    first = int(kept[0, 0])
    return TileGeometry(
        image_hw=tuple(image_hw),
        canvas_px=canvas,
        tile_px=tile_px,
        side=side,
        tiles=tiles,
        grid=tuple(kept.shape),
        row0=first // (tiles[1] * side),
        col0=first % (tiles[1] * side),
    )


def canvas_image(image: np.ndarray, geometry: TileGeometry) -> np.ndarray:
    """`uint8[canvas h, canvas w, 3]`: `image` resized to fit the canvas (aspect kept) and centred on black, as the
    processor pads it (bicubic here: for display)."""
    h, w = geometry.image_hw
    ch, cw = geometry.canvas_px
    scale = min(ch / h, cw / w)
    nh, nw = min(ch, int(np.ceil(h * scale))), min(cw, int(np.ceil(w * scale)))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    out = np.zeros((ch, cw, 3), np.uint8)
    top, left = (ch - nh) // 2, (cw - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def tile_maps(grid_map: np.ndarray, geometry: TileGeometry) -> np.ndarray:
    """`float32[tile rows, tile cols, side, side]`: the crop view's activations (`[grid rows * grid cols]` in
    its row-major token order, or `[rows, cols]`) placed on the tiles; padding patches are 0."""
    g = geometry
    values = np.asarray(grid_map, dtype=np.float32).reshape(-1)
    if values.size != g.grid[0] * g.grid[1]:
        raise InvalidRequest(
            f"a crop-view map of {values.size} tokens does not fit the tiles' {g.grid[0]}x{g.grid[1]} grid; "
            "the map and the tile geometry must come from the same interpretation pass"
        )
    canvas = np.zeros((g.tiles[0] * g.side, g.tiles[1] * g.side), np.float32)
    canvas[g.row0 : g.row0 + g.grid[0], g.col0 : g.col0 + g.grid[1]] = values.reshape(g.grid)
    return canvas.reshape(g.tiles[0], g.side, g.tiles[1], g.side).transpose(0, 2, 1, 3)


def tile_images(image: np.ndarray, geometry: TileGeometry) -> np.ndarray:
    """`uint8[tile rows, tile cols, tile_px, tile_px, 3]`: the canvas of `image` cut into its tiles."""
    g = geometry
    canvas = canvas_image(image, g)
    return canvas.reshape(g.tiles[0], g.tile_px, g.tiles[1], g.tile_px, 3).transpose(0, 2, 1, 3, 4)
