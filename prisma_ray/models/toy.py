"""The embedded default models' specs: a small ViT on `shapes` and a small video transformer on `moving-shapes`.

Each `ToySpec` fixes the architecture, the synthetic training data and the training recipe, so that
`toy_training.train_toy(spec)` reproduces the shipped weights (`prisma_ray/assets/<name>.safetensors`)
and `toy_training.build_network(spec)` rebuilds the architecture they load into. This module does
not import torch (the registry reads it).

Tasks. The image model's scenes hold 1-3 objects, and it learns several factors jointly so that every
object's shape and colour must be represented in its patch tokens (recipe below: 1,200 steps of 64 images,
920 s wall with one torch thread on this shared 2-core machine at load ~20):

- the primary task, the network's own output (`head` / `classifier`, `num_classes` logits, what the hooked
  model returns and what the spliced-in evaluation scores against): the dataset's integer `label`, the
  largest object's shape (`shapes`) or motion direction (`moving-shapes`) (`synthetic.sample_label`);
- auxiliary heads (`ToySpec.aux_heads`), one linear layer `aux_head` on the same pooled features, trained jointly
  and never part of the hooked model's output: the set of shapes present, the set of colours present and the
  object count.
- dense auxiliary heads (`ToySpec.patch_heads`, `image_patch_heads`): a segmentation-style task built so that
  the toy model has known features to find: one linear layer `patch_head` on every patch token of block
  `patch_layer`'s output (`blocks.2`, the block the quickstart hooks) predicts the shape and the colour of the
  object dominating that token's patch cell, or `background`; edge cells whose dominant object covers under
  `min_coverage` (0.5, the ground-truth labels' ambiguous cells) are left out of the loss; the shape head's
  cross-entropy counts 3 times; never part of the hooked model's output.

Patches of 8 px on 32-px images (a 4x4 grid; objects 13-19 px across), so that a patch shows a good part of
its object's outline. This is a choice made for the toy, whose purpose is known features to find: with 4-px
patches (an 8x8 grid, the earlier model) an interior patch of a square and of a hexagon look alike, a token's
shape had to come from context, and no dictionary latent detected a shape value (best single-latent AUROC
0.70-0.93 at k 8-32, even with the dense heads for 500 steps: per-token shape accuracy 0.874). With 8-px
patches the quickstart's TopK SAE (k 32) on `blocks.2.hook_resid_post` detects 12 of 12 shape and colour
values (`benchmarks/toy_ground_truth.py`, README). The dataset's `patch_grid` is the model's patch grid, so
every token is exactly one ground-truth cell.

The video model's clips hold 1-2 moving objects (radius 0.2-0.25 of the 32-px side, 8 frames); its tokens are
tubelets of 2 frames x 8 x 8 px (a 4x4 grid per time step, 64 tokens). The same recipe gives it dense heads
(`video_patch_heads`) on the patch tokens of `blocks.1`, the block the quickstart hooks: per token, the shape,
colour and motion direction of the object dominating its cell in the tubelet's first frame, or background (the
toy ground truth's labels, `toy_recovery.patch_labels`, both built by `toy_training.token_cells`); shape loss x3,
direction loss x2. Its primary output stays the largest object's motion direction. Recipe below: 450 steps of 32
clips, 1,597 s wall with two torch threads at load ~8 (held-out accuracies in the spec).

Keeping the dataset label as the primary output keeps every consumer of the network's logits (the spliced-in
loss recovered, logit lens, steering) meaningful; the heads only shape what the tokens carry. Each head's
held-out accuracy (`target_accuracy`, exact match of the whole set for a multi-label head) is tested on
encoded files.
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
    set_reduction: Literal["mean", "sum"] = Field(
        "mean", description="how a set head's binary cross-entropies over its values add up (per sample)"
    )


class ToyHead(BaseModel):
    """One auxiliary output of a toy network: a class (softmax over `values`) or a set (a sigmoid per value)."""

    model_config = ConfigDict(frozen=True)

    name: Literal["shapes", "colours", "count"]
    kind: Literal["class", "set"]
    values: tuple[str, ...]
    target_accuracy: float = Field(ge=0, le=1, description="held-out accuracy (sets: exact match) it must reach")


class ToyPatchHead(BaseModel):
    """One dense (segmentation-style) auxiliary output: per patch token, a class over the factor's `values`
    followed by `"background"`, for the object that dominates the token's patch cell."""

    model_config = ConfigDict(frozen=True)

    name: Literal["shape", "colour", "direction"]
    values: tuple[str, ...] = Field(description="the factor's values, then 'background' (the last class)")
    target_accuracy: float = Field(ge=0, le=1, description="held-out per-token accuracy (edge cells left out)")
    weight: float = Field(1.0, gt=0, description="factor of its cross-entropy in the training loss")


def image_patch_heads(
    cfg: ShapesConfig | MovingShapesConfig, shape: float, colour: float, shape_weight: float = 1.0
) -> tuple[ToyPatchHead, ...]:
    """The dense shape and colour heads of image data `cfg` with held-out targets `shape` and `colour`; the shape
    head's loss weighted by `shape_weight`."""
    return (
        ToyPatchHead(name="shape", values=(*cfg.shapes, "background"), target_accuracy=shape, weight=shape_weight),
        ToyPatchHead(name="colour", values=(*cfg.colours, "background"), target_accuracy=colour),
    )


def video_patch_heads(
    cfg: MovingShapesConfig,
    shape: float,
    colour: float,
    direction: float,
    shape_weight: float = 1.0,
    direction_weight: float = 1.0,
) -> tuple[ToyPatchHead, ...]:
    """The dense shape, colour and motion-direction heads of video data `cfg` with held-out targets `shape`,
    `colour` and `direction`; the shape and direction heads' losses weighted by `shape_weight` and
    `direction_weight`."""
    directions = tuple(str(d) for d in range(cfg.n_directions))
    return (
        *image_patch_heads(cfg, shape, colour, shape_weight),
        ToyPatchHead(
            name="direction", values=(*directions, "background"), target_accuracy=direction, weight=direction_weight
        ),
    )


def _image_heads(cfg: ShapesConfig, shapes: float, colours: float, count: float) -> tuple[ToyHead, ...]:
    return (
        ToyHead(name="shapes", kind="set", values=cfg.shapes, target_accuracy=shapes),
        ToyHead(name="colours", kind="set", values=cfg.colours, target_accuracy=colours),
        ToyHead(
            name="count",
            kind="class",
            values=tuple(str(n) for n in range(cfg.n_objects[0], cfg.n_objects[1] + 1)),
            target_accuracy=count,
        ),
    )


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
    target_accuracy: float = Field(description="held-out accuracy of the primary task (the dataset `label`)")
    aux_heads: tuple[ToyHead, ...] = Field((), description="auxiliary heads trained jointly (not the model's output)")
    patch_heads: tuple[ToyPatchHead, ...] = Field(
        (), description="dense per-patch-token heads trained jointly (not the model's output)"
    )
    patch_layer: int = Field(
        -1, description="the block whose output patch tokens feed `patch_head` (TransformerLens `blocks.{i}`)"
    )
    min_coverage: float = Field(
        0.5, gt=0, le=1, description="patch cells whose dominant object covers less are left out of the dense loss"
    )

    @property
    def num_classes(self) -> int:
        return len(self.dataset.shapes) if self.modality == "image" else self.dataset.n_directions

    @property
    def aux_outputs(self) -> int:
        """Width of the auxiliary layer `aux_head`: the heads' values laid end to end in `aux_heads` order."""
        return sum(len(h.values) for h in self.aux_heads)

    @property
    def patch_outputs(self) -> int:
        """Width of the per-token layer `patch_head`: the dense heads' classes end to end in `patch_heads` order."""
        return sum(len(h.values) for h in self.patch_heads)

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


_IMAGE_DATA = ShapesConfig(image_size=32, n_objects=(1, 3), size_range=(0.2, 0.3), patch_grid=(4, 4), seed=0)
_VIDEO_DATA = MovingShapesConfig(
    image_size=32,
    num_frames=8,
    n_objects=(1, 2),
    size_range=(0.2, 0.25),
    speed_range=(1.0, 2.0),
    n_directions=8,
    patch_grid=(4, 4),
    seed=0,
)
SPECS: dict[str, ToySpec] = {
    spec.name: spec
    for spec in (
        ToySpec(
            name="toy-vit-shapes",
            modality="image",
            dataset=_IMAGE_DATA,
            patch_size=8,
            width=64,
            depth=4,
            heads=4,
            training=ToyTraining(
                steps=1200, batch_size=64, lr=3e-3, warmup_steps=100, n_train=16000, set_reduction="sum"
            ),
            # held-out (1,000 rendered): label 0.802, shapes 0.683, colours 0.999, count 0.995,
            # per token: shape 0.952, colour 1.000
            target_accuracy=0.75,
            aux_heads=_image_heads(_IMAGE_DATA, shapes=0.62, colours=0.95, count=0.95),
            patch_heads=image_patch_heads(_IMAGE_DATA, shape=0.92, colour=0.99, shape_weight=3.0),
            patch_layer=2,
        ),
        ToySpec(
            name="toy-video-moving-shapes",
            modality="video",
            dataset=_VIDEO_DATA,
            patch_size=8,
            width=64,
            depth=3,
            heads=4,
            training=ToyTraining(steps=450, batch_size=32, lr=3e-3, warmup_steps=50, n_train=6000),
            # held-out (500 rendered): label 0.984; per token: shape 0.949, colour 1.000, direction 0.984
            target_accuracy=0.90,
            patch_heads=video_patch_heads(
                _VIDEO_DATA, shape=0.90, colour=0.97, direction=0.93, shape_weight=3.0, direction_weight=2.0
            ),
            patch_layer=1,
        ),
    )
}


def weights_path(name: str) -> Path:
    """Where the shipped weights of toy model `name` live inside the package."""
    return ASSETS / f"{name}.safetensors"
