"""Patch heatmaps: a latent's per-token activations drawn onto the image (or each video frame). Pure functions.

Images here are the model-geometry crops the activations were computed on (`uint8 [H, W, 3]`, clips
`[T, H, W, 3]`), so the patch grid covers the image exactly; each patch value is spread over its
pixel block (nearest-neighbour upsampling, so the overlay shows exactly the patches that fired).

Every float -> `uint8` cast here is of values clipped to [0, 255] first (or of a fraction in [0, 1] of
`uint8` pixels); heatmap values that are NaN or inf are refused (`InvalidRequest`) rather than drawn.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from ..errors import InvalidRequest
from ..models.spec import TokenLayout
from .evidence import check_fraction
from .evidence import upsample as upsample_maps


def patch_grid(token_acts: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """`float32[t, h, w]`: the patch tokens' values of `token_acts` (`[n_tokens]`) on the patch grid."""
    token_acts = np.asarray(token_acts, dtype=np.float32)
    if token_acts.shape != (layout.n_tokens,):
        raise ValueError(f"expected {layout.n_tokens} token activations for this layout, got {list(token_acts.shape)}")
    grid = np.zeros((layout.time, *layout.grid), np.float32)
    t, r, c = layout.patch_positions().astype(np.int64).T
    grid[t, r, c] = token_acts[layout.n_prefix :]
    return grid


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`grid [h, w]` spread onto `size = (H, W)` pixels: each pixel takes the value of the patch it lies in."""
    return upsample_maps(np.asarray(grid)[None], size)[0]


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def check_finite(values: np.ndarray, where: str) -> None:
    """Raise `InvalidRequest` naming `where` when `values` hold NaN or inf (a heatmap cannot show them)."""
    bad = ~np.isfinite(np.asarray(values, dtype=np.float64))
    if bad.any():
        raise InvalidRequest(
            f"{where}: {int(bad.sum())} of {bad.size} heatmap values are NaN or inf; a heatmap of them would "
            "be meaningless colours. Check the activations they come from."
        )


def overlay(
    image: np.ndarray,
    grid: np.ndarray,
    vmax: float | None = None,
    alpha: float = 0.7,
    cmap: str = "inferno",
    where: str = "heatmap",
) -> np.ndarray:
    """`uint8[H, W, 3]`: `image` with `grid [h, w]` blended on in colour, opacity growing with the value
    (values <= 0 leave the image unchanged). `vmax` (default: the grid's max) maps to full opacity `alpha`.
    NaN or inf in `grid` or `vmax` raise `InvalidRequest` naming `where`."""
    check_finite(grid, where)
    top = float(grid.max()) if vmax is None else float(vmax)
    check_finite(np.float64(top), f"{where} (vmax)")
    level = np.clip(upsample(grid, image.shape[:2]) / top, 0, 1) if top > 0 else np.zeros(image.shape[:2])
    colour = _lut(cmap)[np.round(level * 255).astype(np.int64)].astype(np.float32)
    weight = (alpha * level)[..., None]
    return np.round(image.astype(np.float32) * (1 - weight) + colour * weight).astype(np.uint8)


def active_mask(grid: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """`bool[h, w]`: the patches whose activation exceeds `threshold`."""
    return np.asarray(grid) > threshold


def masked(image: np.ndarray, mask: np.ndarray, dim: float = 0.25) -> np.ndarray:
    """`uint8[H, W, 3]`: `image` with the pixels outside the patch `mask [h, w]` darkened to `dim` (in [0, 1])."""
    check_fraction(dim, "masked: dim")
    keep = upsample(np.asarray(mask, dtype=np.float32), image.shape[:2])[..., None]
    return np.round(image * (keep + (1 - keep) * dim)).astype(np.uint8)


def mask_image(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`uint8[H, W]`: the binary patch `mask` at pixel size (255 active, 0 inactive)."""
    return (upsample(np.asarray(mask, dtype=bool), size) * np.uint8(255)).astype(np.uint8)


def frame_overlays(
    frames: np.ndarray, grid: np.ndarray, tubelet: int = 1, vmax: float | None = None, where: str = "heatmap"
) -> list[np.ndarray]:
    """One overlay per frame of `frames [T, H, W, 3]`; frame `f` shows time step `f // tubelet` of `grid [t, h, w]`
    (NaN or inf in `grid` raise `InvalidRequest` naming `where`, as `overlay`)."""
    check_finite(grid, where)
    top = float(grid.max()) if vmax is None else vmax
    steps = np.minimum(np.arange(len(frames)) // max(tubelet, 1), len(grid) - 1)
    return [overlay(frame, grid[s], top, where=where) for frame, s in zip(frames, steps)]


def strip(images: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """The images side by side (same height), `gap` white pixels apart."""
    h = images[0].shape[0]
    spacer = np.full((h, gap, 3), 255, np.uint8)
    parts = [p for image in images for p in (image, spacer)][:-1]
    return np.concatenate(parts, axis=1)


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """PNG of an `uint8` image (RGB or grey), enlarged `scale` times without smoothing."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes(frames: list[np.ndarray], duration_ms: int = 150, scale: int = 1) -> bytes:
    """An animated GIF looping over `frames` (`uint8 [H, W, 3]` each)."""
    images = [Image.fromarray(f) for f in frames]
    if scale > 1:
        images = [i.resize((i.width * scale, i.height * scale), Image.NEAREST) for i in images]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buf.getvalue()
