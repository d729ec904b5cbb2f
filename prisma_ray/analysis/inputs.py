"""Inputs of an analysis: image/video files from a URI list, or rendered synthetic samples with ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from prisma_ray.errors import InvalidRequest

from .. import storage as store_io
from ..data.decode import FrameSampling, decode_image, decode_video
from ..data.errors import BadSample
from ..data.synthetic import MovingShapesConfig, ShapesConfig, render_moving_shapes, render_shapes, sample_label
from ..data.transforms import crop_to_model
from ..models import HookedVisionModel, get_entry, toy
from ..models.inputs import PixelInputs
from ..storage import StorageOptions


class InputsConfig(BaseModel):
    """`uris` (images, or videos for video models; plain path, file:// or s3://), else `synthetic` rendered samples."""

    model_config = ConfigDict(extra="forbid")

    uris: list[str] = Field(
        default_factory=list, description="image files (video files for video models): plain path, file:// or s3://"
    )
    synthetic: int = Field(8, ge=1, description="rendered samples when no uris are given")
    seed: int = Field(0, description="seed of the rendered synthetic samples")
    storage: StorageOptions = Field(StorageOptions(), description="how to reach `uris` on s3://")


@dataclass
class Inputs:
    """A batch in the model's input spec and what is needed to draw and check it."""

    x: torch.Tensor  # [B, 3, H, W] or [B, T, 3, H, W], normalised
    pixels: np.ndarray  # uint8 [B, H, W, 3] or [B, T, H, W, 3] at the model's geometry
    names: list[str]
    labels: np.ndarray | None = None  # class index per sample (embedded models on their own data)
    masks: np.ndarray | None = None  # uint8 object masks [B, (T,) H, W] of synthetic samples


def synthetic_dataset(model: HookedVisionModel, n: int, seed: int) -> ShapesConfig | MovingShapesConfig:
    """An embedded model's held-out distribution, else the default synthetic dataset at the model's size."""
    entry = get_entry(model.name)
    spec = model.preprocess
    if entry.source == "prisma":
        held_out = toy.SPECS[entry.architecture].held_out(n)
        return held_out.model_copy(update={"seed": held_out.seed + seed})
    side = max(spec.image_size)
    if spec.modality == "video":
        return MovingShapesConfig(image_size=side + side % 2, num_frames=spec.num_frames or 16, n_clips=n, seed=seed)
    return ShapesConfig(image_size=side, n_images=n, seed=seed)


def _batch(
    model: HookedVisionModel, raw: list[np.ndarray], names: list[str], device: torch.device | str = "cpu", **extra
) -> Inputs:
    """Cropped and normalised as every stage does it (`crop_to_model`, then `PixelInputs` on `device`)."""
    pixels = np.stack([crop_to_model(p, model.preprocess) for p in raw])
    return Inputs(PixelInputs(model, device=device).pixels(pixels), pixels, names, **extra)


def render(model: HookedVisionModel, n: int, seed: int = 0, device: torch.device | str = "cpu") -> Inputs:
    """`n` rendered synthetic samples, the model's input on `device` (labels for embedded models: the dataset's
    `label`, the largest object's shape or motion direction, `synthetic.sample_label`)."""
    cfg = synthetic_dataset(model, n, seed)
    raw, masks, labels = [], [], []
    for i in range(n):
        if isinstance(cfg, ShapesConfig):
            pixels, mask, objects, _ = render_shapes(cfg, i)
        else:
            pixels, mask, objects, _ = render_moving_shapes(cfg, i)
        labels.append(sample_label(cfg, [o for o in objects if o.get("frame", 0) == 0]))
        raw.append(pixels)
        masks.append(mask)
    own = get_entry(model.name).source == "prisma"
    return _batch(
        model,
        raw,
        [f"{cfg.name}-{cfg.seed}-{i}" for i in range(n)],
        device,
        labels=np.asarray(labels) if own else None,
        masks=np.stack(masks),
    )


def _decode(model: HookedVisionModel, uri: str, options: StorageOptions | None) -> np.ndarray:
    data = store_io.read_bytes(uri, options)
    spec = model.preprocess
    try:
        if spec.modality == "video":
            return decode_video(data, FrameSampling(num_frames=spec.num_frames or 1, stride=spec.frame_stride)).frames
        return decode_image(data)
    except BadSample as exc:
        raise InvalidRequest(f"cannot use input {uri!r} for {model.name}: {exc}") from None


def load_inputs(model: HookedVisionModel, cfg: InputsConfig, device: torch.device | str = "cpu") -> Inputs:
    """The inputs `cfg` names, decoded and transformed as the model expects (its input `x` on `device`)."""
    if not cfg.uris:
        return render(model, cfg.synthetic, cfg.seed, device)
    for uri in cfg.uris:
        store_io.require_exists(uri, cfg.storage)
    return _batch(model, [_decode(model, uri, cfg.storage) for uri in cfg.uris], list(cfg.uris), device)
