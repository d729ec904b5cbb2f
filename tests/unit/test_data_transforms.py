import numpy as np
import pytest
import torch
from PIL import Image

from prisma_ray.data.transforms import crop_to_model, resize_and_crop
from prisma_ray.models.inputs import normalize
from prisma_ray.models.spec import PreprocessSpec


def model_input(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """What every stage feeds a vision model: the `uint8` crop (data) normalised (`models.inputs`)."""
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in (spec.mean, spec.std))
    return normalize(torch.from_numpy(crop_to_model(pixels, spec)), mean, std).numpy()


def _pattern(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 10 * yy + xx
    img[..., 2] = 255
    return img


def test_hand_computed_nearest_resize_crop_normalise():
    # 4x6 -> shorter side 2 -> 2x3 (nearest picks rows 1, 3 and cols 1, 3, 5) -> centre crop 2x2:
    # left = round((3 - 2) / 2) = 0, so cols 1, 3 remain.
    spec = PreprocessSpec(image_size=(2, 2), interpolation="nearest", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = model_input(_pattern(4, 6), spec)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    red = np.array([[11, 13], [31, 33]]) / 255.0
    np.testing.assert_allclose(out[0], (red - 0.5) / 0.25, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1], -2.0)
    np.testing.assert_allclose(out[2], 2.0)


def test_hand_computed_crop_pct_without_resize():
    # size 8 / crop_pct 0.875 = 9: a 9x12 image is already 9 on its shorter side; crop rows 0..8,
    # cols 2..10 (top = round(0.5) = 0, left = round(2.0) = 2)
    img = _pattern(9, 12)
    out = resize_and_crop(img, (8, 8), crop_pct=0.875)
    np.testing.assert_array_equal(out, img[0:8, 2:10])


@pytest.mark.parametrize(
    "src, size, crop_pct, interpolation",
    [
        ((48, 64), (32, 32), 0.875, "bicubic"),
        ((64, 48), (32, 32), 1.0, "bilinear"),
        ((50, 50), (24, 24), 0.9, "bicubic"),
        ((40, 90), (32, 48), 1.0, "bicubic"),
        ((90, 40), (48, 32), 0.95, "bilinear"),
    ],
)
def test_matches_timm_eval_transform(src, size, crop_pct, interpolation):
    from timm.data import create_transform

    img = np.random.default_rng(0).integers(0, 256, (*src, 3), dtype=np.uint8)
    spec = PreprocessSpec(image_size=size, crop_pct=crop_pct, interpolation=interpolation)
    reference = create_transform(
        input_size=(3, *size),
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=spec.mean,
        std=spec.std,
    )(Image.fromarray(img)).numpy()
    out = model_input(img, spec)
    assert out.shape == reference.shape == (3, *size)
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5)


def test_video_is_framewise():
    frames = np.random.default_rng(2).integers(0, 256, (4, 30, 40, 3), dtype=np.uint8)
    spec = PreprocessSpec(modality="video", image_size=(16, 16), num_frames=4)
    out = model_input(frames, spec)
    assert out.shape == (4, 3, 16, 16) and out.dtype == np.float32
    for t in range(4):
        np.testing.assert_array_equal(out[t], model_input(frames[t], spec))
