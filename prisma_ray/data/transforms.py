"""Model input transforms: timm's eval geometry (resize to cover `size / crop_pct`, centre crop) and normalisation."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from prisma_ray.errors import InvalidRequest
from prisma_ray.models.spec import PreprocessSpec

_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def resize_and_crop(
    img: np.ndarray, size: tuple[int, int], *, crop_pct: float = 1.0, interpolation: str = "bicubic"
) -> np.ndarray:
    """`uint8[H, W, 3]` → `uint8[size[0], size[1], 3]`, as timm's eval transform does it.

    The image is resized, keeping its aspect ratio, to cover `floor(size / crop_pct)` (for a square
    target the shorter edge becomes that size, like torchvision's `Resize(int)`), then centre-cropped.
    """
    height, width = size
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    src_h, src_w = img.shape[:2]
    if scale_h == scale_w:
        if src_h <= src_w:
            new_h, new_w = scale_h, int(scale_h * src_w / src_h)
        else:
            new_h, new_w = int(scale_w * src_h / src_w), scale_w
    else:
        ratio = min(src_h / scale_h, src_w / scale_w)
        new_h, new_w = round(src_h / ratio), round(src_w / ratio)
    if (new_h, new_w) != (src_h, src_w):
        img = np.asarray(Image.fromarray(img).resize((new_w, new_h), _PIL_FILTERS[interpolation]))
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    return img[top : top + height, left : left + width]


def normalize(img: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """`uint8[..., H, W, 3]` → `float32[..., 3, H, W]` holding `(x / 255 - mean) / std`."""
    x = img.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess_image(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """`uint8[H, W, 3]` → `float32[3, h, w]`: the model input described by `spec`."""
    crop = resize_and_crop(img, spec.image_size, crop_pct=spec.crop_pct, interpolation=spec.interpolation)
    return normalize(crop, spec.mean, spec.std)


def preprocess_video(frames: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """`uint8[T, H, W, 3]` → `float32[T, 3, h, w]`, every frame transformed like `preprocess_image`."""
    if spec.num_frames is not None and len(frames) != spec.num_frames:
        raise InvalidRequest(f"got {len(frames)} frames, the model expects num_frames={spec.num_frames}")
    crops = np.stack(
        [resize_and_crop(f, spec.image_size, crop_pct=spec.crop_pct, interpolation=spec.interpolation) for f in frames]
    )
    return normalize(crops, spec.mean, spec.std)
