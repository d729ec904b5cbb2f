"""Model-independent descriptions of a model's input (`PreprocessSpec`) and token sequence (`TokenLayout`)."""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# The element type a model runs in (`model_dtype` of extraction, interpretation and steering; recorded with a store).
ModelDType = Literal["float32", "bfloat16", "float16"]

# The description of every job config's `weights` field (loaded by `prisma_ray.models.weights`).
WEIGHTS_HELP = (
    "your own checkpoint (local path or s3://, reached with `storage`): safetensors, or a torch file (a state dict, "
    "or one under `state_dict` or `model`; read with weights_only=True) loaded strictly into the model's "
    "architecture instead of `pretrained`"
)


class ModelAsExtracted(BaseModel):
    """The fields that rebuild a model as an extraction ran it, for the stages that read no store (interpretation,
    steering): the same `pretrained`, `seed`, `weights` and `model_dtype` as the extraction's."""

    model_config = ConfigDict(extra="forbid")

    pretrained: bool = Field(True, description="load published weights (false: random weights from `seed`)")
    seed: int = Field(0, description="seed of the random weights (pretrained=false), as at extraction")
    weights: str | None = Field(None, description=WEIGHTS_HELP + "; as at extraction (see the store's _config.json)")
    model_dtype: ModelDType = Field(
        "float32",
        description="element type the model runs in (float32, bfloat16 or float16), as at extraction: the "
        "`model_dtype` in the training store's manifest.json",
    )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TokenKind(IntEnum):
    """Kind of a token in the residual stream (stored as int8 in the activation store)."""

    CLS = 0
    REGISTER = 1
    PATCH = 2
    DISTILLATION = 3
    TEXT = 4
    NEWLINE = 5  # a multimodal model's image-row separator token


class PreprocessSpec(BaseModel):
    """What a model expects as input: the pixels after resize, crop and normalisation.

    Images are `[B, 3, H, W]` float tensors; videos are `[B, T, 3, H, W]` with `T == num_frames`.
    Multimodal language models take their processor's output (`input_ids`, `pixel_values`, ...);
    `image_size` is then the vision tower's nominal input size.
    """

    model_config = ConfigDict(frozen=True)

    modality: Literal["image", "video", "multimodal"] = "image"
    image_size: tuple[int, int] = (224, 224)
    crop_pct: float = Field(1.0, gt=0, le=1.0)
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_frames: int | None = None
    frame_stride: int = 1

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed sample (no batch axis)."""
        h, w = self.image_size
        if self.modality == "video":
            return (self.num_frames or 1, 3, h, w)
        return (3, h, w)


class TokenLayout(BaseModel):
    """How the token axis of a hook point's `[batch, tokens, d_model]` tensor maps onto the input.

    Tokens are `prefix` (CLS / registers / distillation, in the order listed) followed by the
    patch tokens, row-major in `patch_order`: `"thw"` (frame-major, most models) or `"hwt"`
    (frame-minor, TimeSformer). For images `time == 1`. For video each patch token covers
    `tubelet` consecutive input frames.
    """

    model_config = ConfigDict(frozen=True)

    prefix: tuple[TokenKind, ...] = (TokenKind.CLS,)
    grid: tuple[int, int]
    time: int = 1
    tubelet: int = 1
    patch_order: Literal["thw", "hwt"] = "thw"

    @property
    def n_prefix(self) -> int:
        return len(self.prefix)

    @property
    def n_patches(self) -> int:
        return self.time * self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def kinds(self) -> np.ndarray:
        """`int8[n_tokens]`: the `TokenKind` of every position."""
        out = np.full(self.n_tokens, TokenKind.PATCH, dtype=np.int8)
        out[: self.n_prefix] = np.asarray(self.prefix, dtype=np.int8)
        return out

    def frames(self) -> np.ndarray:
        """`int16[n_tokens]`: first input frame covered by each token (-1 for prefix tokens and images)."""
        out = np.full(self.n_tokens, -1, dtype=np.int16)
        if self.time > 1 or self.tubelet > 1:
            out[self.n_prefix :] = self.patch_positions()[:, 0] * self.tubelet
        return out

    def patch_positions(self) -> np.ndarray:
        """`int16[n_patches, 3]`: `(t, row, col)` of each patch token, in token order."""
        t, (h, w) = self.time, self.grid
        if self.patch_order == "thw":
            tt, rr, cc = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        else:
            rr, cc, tt = np.meshgrid(np.arange(h), np.arange(w), np.arange(t), indexing="ij")
        return np.stack([tt.ravel(), rr.ravel(), cc.ravel()], axis=1).astype(np.int16)


class ImageView(BaseModel):
    """One view of one image or video in a multimodal sequence: `view` 0 is the base (whole image)
    view, 1 the high-resolution crops tiled into one `grid` (rows, cols) of tokens; a video's view
    repeats its grid over `frames` token time steps (each covering the model's temporal patch)."""

    model_config = ConfigDict(frozen=True)

    sample: int
    image: int
    view: int
    grid: tuple[int, int]
    frames: int = 1


class MultimodalLayout(BaseModel):
    """Per-position description of a batch of multimodal sequences, every array `[batch, seq]`.

    `kind`: `TokenKind.TEXT`, `PATCH` (an image or video token) or `NEWLINE` (an image-row
    separator). `image`: index of the image or video in its sample (in sequence order), `view`:
    `ImageView.view`, `row`/`col`: the token's place in that view's grid (`col` is -1 for a row's
    newline), `frame`: the first input frame a video token covers (-1 for images); all -1 for text.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    kind: np.ndarray
    image: np.ndarray
    view: np.ndarray
    row: np.ndarray
    col: np.ndarray
    frame: np.ndarray
    views: tuple[ImageView, ...]

    def image_mask(self) -> np.ndarray:
        """`bool[batch, seq]`: positions that hold an image token (patch or newline)."""
        return self.kind != TokenKind.TEXT
