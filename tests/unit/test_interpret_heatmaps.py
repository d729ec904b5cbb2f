"""Patch heatmaps: grids from token activations, overlays, masks, video frames and GIFs."""

import io

import numpy as np
import pytest
from PIL import Image

from prisma_ray.interpret import heatmaps
from prisma_ray.models.spec import TokenKind, TokenLayout

LAYOUT = TokenLayout(prefix=(TokenKind.CLS, TokenKind.REGISTER), grid=(4, 4))


def one_hot_tokens(layout: TokenLayout, patch: int, value: float = 3.0) -> np.ndarray:
    acts = np.zeros(layout.n_tokens, np.float32)
    acts[0] = 9.0  # a hot CLS token must not leak onto the image
    acts[layout.n_prefix + patch] = value
    return acts


def test_one_hot_patch_lights_exactly_its_region():
    grid = heatmaps.patch_grid(one_hot_tokens(LAYOUT, patch=6), LAYOUT)  # row 1, col 2
    assert grid.shape == (1, 4, 4) and grid[0, 1, 2] == 3.0 and grid.sum() == 3.0
    image = np.full((32, 32, 3), 120, np.uint8)
    out = heatmaps.overlay(image, grid[0])
    changed = (out != image).any(-1)
    expected = np.zeros((32, 32), bool)
    expected[8:16, 16:24] = True
    np.testing.assert_array_equal(changed, expected)
    mask = heatmaps.active_mask(grid[0])
    np.testing.assert_array_equal(heatmaps.mask_image(mask, (32, 32)) > 0, expected)
    dimmed = heatmaps.masked(image, mask)
    assert (dimmed[expected] == 120).all() and (dimmed[~expected] == 30).all()


def test_upsampling_to_sizes_not_divisible_by_the_grid():
    up = heatmaps.upsample(np.arange(4, dtype=np.float32).reshape(2, 2), (5, 3))
    np.testing.assert_array_equal(up, [[0, 0, 1], [0, 0, 1], [0, 0, 1], [2, 2, 3], [2, 2, 3]])


def test_video_one_overlay_per_frame_and_an_animated_gif():
    layout = TokenLayout(prefix=(), grid=(2, 2), time=2, tubelet=2)
    acts = np.zeros(layout.n_tokens, np.float32)
    acts[4 + 3] = 1.0  # time step 1, bottom-right patch
    grid = heatmaps.patch_grid(acts, layout)
    frames = np.stack([np.full((8, 8, 3), 50 + 10 * f, np.uint8) for f in range(4)])
    overlays = heatmaps.frame_overlays(frames, grid, tubelet=2)
    assert len(overlays) == 4
    assert all((o == f).all() for o, f in zip(overlays[:2], frames)), "frames 0-1 show time step 0, which is silent"
    assert all((o[4:, 4:] != f[4:, 4:]).all() and (o[:4] == f[:4]).all() for o, f in zip(overlays[2:], frames[2:]))
    gif = Image.open(io.BytesIO(heatmaps.gif_bytes(overlays, scale=2)))
    assert gif.n_frames == 4 and gif.size == (16, 16)
    assert heatmaps.strip(overlays).shape == (8, 4 * 8 + 3 * 2, 3)
    png = Image.open(io.BytesIO(heatmaps.png_bytes(overlays[3], scale=3)))
    assert png.size == (24, 24)


def test_wrong_token_count_is_refused():
    with pytest.raises(ValueError, match="expected 18 token activations"):
        heatmaps.patch_grid(np.zeros(17), LAYOUT)
