"""The embedded default models' specs: a small ViT on `shapes` and a small video transformer on `moving-shapes`.

Each `ToySpec` fixes the architecture, the synthetic training data and the training recipe, so that
`toy_training.train_toy(spec)` reproduces the shipped weights (`prisma_ray/assets/<name>.safetensors`)
and `toy_training.build_network(spec)` rebuilds the architecture they load into. This module does
not import torch (the registry reads it).

Labels follow the synthetic datasets: the first object's shape index (`shapes`) or motion direction
(`moving-shapes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..data.synthetic import MovingShapesConfig, ShapesConfig
from .spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

ASSETS = Path(__file__).resolve().parent.parent / "assets"
HELD_OUT_SEED_OFFSET = 1000


class ToyTraining(BaseModel):
    """The optimisation recipe: AdamW with linear warm-up then cosine decay, on a fixed rendered set."""

    model_config = ConfigDict(frozen=True)

    steps: int = Field(ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 0.05
    warmup_steps: int = Field(50, ge=0)
    n_train: int = Field(ge=1)
    seed: int = 0


class ToySpec(BaseModel):
    """One embedded model: its architecture, the data it learns from, and how it is trained."""

    model_config = ConfigDict(frozen=True)

    name: str
    modality: Literal["image", "video"]
    dataset: ShapesConfig | MovingShapesConfig
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 2.0
    stem_channels: int = 32
    stem_time_kernel: int = 3
    tubelet: int = 2
    training: ToyTraining
    target_accuracy: float

    @property
    def num_classes(self) -> int:
        return len(self.dataset.shapes) if self.modality == "image" else self.dataset.n_directions

    @property
    def frames(self) -> int | None:
        return self.dataset.num_frames if self.modality == "video" else None

    @property
    def preprocess(self) -> PreprocessSpec:
        size = self.dataset.image_size
        return PreprocessSpec(
            modality=self.modality,
            image_size=(size, size),
            crop_pct=1.0,
            interpolation="bilinear",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            num_frames=self.frames,
        )

    def held_out(self, n: int) -> ShapesConfig | MovingShapesConfig:
        """The same distribution under a seed training never sees."""
        count = {"n_images": n} if self.modality == "image" else {"n_clips": n}
        return self.dataset.model_copy(update={"seed": self.dataset.seed + HELD_OUT_SEED_OFFSET, **count})


SPECS: dict[str, ToySpec] = {
    spec.name: spec
    for spec in (
        ToySpec(
            name="toy-vit-shapes",
            modality="image",
            dataset=ShapesConfig(image_size=32, n_objects=(1, 1), size_range=(0.25, 0.4), seed=0),
            patch_size=4,
            width=64,
            depth=4,
            heads=4,
            training=ToyTraining(steps=2000, batch_size=64, lr=2e-3, n_train=16000),
            target_accuracy=0.95,
        ),
        ToySpec(
            name="toy-video-moving-shapes",
            modality="video",
            dataset=MovingShapesConfig(
                image_size=32,
                num_frames=8,
                n_objects=(1, 1),
                size_range=(0.15, 0.25),
                speed_range=(1.0, 2.0),
                n_directions=8,
                seed=0,
            ),
            patch_size=8,
            width=64,
            depth=3,
            heads=4,
            training=ToyTraining(steps=400, batch_size=64, lr=2e-3, n_train=4000),
            target_accuracy=0.90,
        ),
    )
}


def weights_path(name: str) -> Path:
    """Where the shipped weights of toy model `name` live inside the package."""
    return ASSETS / f"{name}.safetensors"
