"""What auto-interpretation reads and writes: the evidence per latent, explanations and their scores.

`LatentEvidence` is the interface between the top-activation pass (which produces it) and the
explainers and scorers (which consume it). `explanations.jsonl` in an output directory (local or
`s3://`) holds one JSON object per latent: `latent`, `explanation`, `explainer`, `scores`, `raw`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict

from prisma_ray import storage
from prisma_ray.errors import InvalidRequest
from prisma_ray.store import write_atomic

log = logging.getLogger(__name__)

EXPLANATIONS_FILE = "explanations.jsonl"


@dataclass(frozen=True)
class LatentEvidence:
    """The top-activating images of one latent of one checkpoint, with their activation maps (and text contexts).

    `images`: `uint8[n, H, W, 3]` (for video, a representative frame per clip); `maps`: `float[n, h, w]`,
    the latent's activation per patch; `values`: `float[n]`, each image's activation (max or mean over
    tokens). `negatives`: `uint8[m, H, W, 3]` images on which the latent does not fire (for detection
    scoring). `concept_masks[label]`: `bool[n, H, W]` or `bool[n, h, w]`, where each top image shows the
    concept (ground truth on synthetic data); `negative_concept_masks` the same for `negatives`.
    `texts` (multimodal language models): the latent's top text contexts, best first, each a prompt window
    with its most active token marked `[[...]]` (`interpret.texttop`). A latent that fires on text tokens only
    has no top images (`n = 0`) but texts; evidence with neither raises `InvalidRequest`.
    """

    checkpoint: str
    latent: int
    images: np.ndarray
    maps: np.ndarray
    values: np.ndarray
    negatives: np.ndarray | None = None
    concept_masks: dict[str, np.ndarray] = field(default_factory=dict)
    negative_concept_masks: dict[str, np.ndarray] = field(default_factory=dict)
    texts: tuple[str, ...] = ()

    def __post_init__(self):
        where = f"evidence of latent {self.latent} of {self.checkpoint!r}"
        _check_images(self.images, f"{where}: images")
        n = len(self.images)
        if n == 0 and not self.texts:
            raise InvalidRequest(f"{where}: no top images and no text contexts; give at least one of them")
        if self.maps.ndim != 3 or len(self.maps) != n:
            raise InvalidRequest(f"{where}: maps must be float[{n}, h, w]; got shape {self.maps.shape}")
        if np.shape(self.values) != (n,):
            raise InvalidRequest(f"{where}: values must be float[{n}]; got shape {np.shape(self.values)}")
        if self.negatives is not None:
            _check_images(self.negatives, f"{where}: negatives")
        for masks, count, name in (
            (self.concept_masks, n, "concept_masks"),
            (
                self.negative_concept_masks,
                len(self.negatives if self.negatives is not None else []),
                "negative_concept_masks",
            ),
        ):
            for label, mask in masks.items():
                if mask.dtype != bool or mask.ndim != 3 or len(mask) != count:
                    raise InvalidRequest(
                        f"{where}: {name}[{label!r}] must be bool[{count}, H, W] or bool[{count}, h, w]; "
                        f"got {mask.dtype}{list(mask.shape)}"
                    )

    @property
    def text_only(self) -> bool:
        """Whether the latent has text contexts but no top images (it fired on text tokens only)."""
        return len(self.images) == 0


def _check_images(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidRequest(f"{where} must be uint8[n, H, W, 3]; got {images.dtype}{list(images.shape)}")


class Explanation(BaseModel):
    """A short description of what one latent detects, and who gave it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latent: int
    text: str
    explainer: str
    raw: str | None = None


class Score(BaseModel):
    """One scorer's value for an explanation, beside the same scorer's value on a random baseline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    value: float
    baseline: float

    def as_dict(self) -> dict[str, float]:
        return {self.name: self.value, f"{self.name}_baseline": self.baseline}


class ExplanationRecord(BaseModel):
    """One line of `explanations.jsonl`."""

    model_config = ConfigDict(extra="forbid")

    latent: int
    explanation: str
    explainer: str
    scores: dict[str, float] = {}
    raw: str | None = None

    @classmethod
    def of(cls, explanation: Explanation, scores: list[Score] = ()) -> ExplanationRecord:
        merged: dict[str, float] = {}
        for score in scores:
            merged.update(score.as_dict())
        return cls(
            latent=explanation.latent,
            explanation=explanation.text,
            explainer=explanation.explainer,
            scores=merged,
            raw=explanation.raw,
        )


def read_explanations(output: str, options: storage.StorageOptions | None = None) -> dict[int, ExplanationRecord]:
    """The records of `<output>/explanations.jsonl` by latent (empty if there is none yet; the last record wins)."""
    uri = storage.join(output, EXPLANATIONS_FILE)
    if not storage.exists(uri, options):
        return {}
    records: dict[int, ExplanationRecord] = {}
    for number, line in enumerate(storage.read_bytes(uri, options).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = ExplanationRecord.model_validate_json(line)
        except ValueError as e:
            raise InvalidRequest(
                f"{uri}, line {number}: not an explanation record ({e}); fix or remove that line"
            ) from e
        records[record.latent] = record
    return records


def append_explanations(
    output: str, records: list[ExplanationRecord], options: storage.StorageOptions | None = None
) -> None:
    """Add `records` to `<output>/explanations.jsonl` atomically: the file is rewritten under a temporary
    name and renamed, so a kill leaves either the old or the new file, never a torn line."""
    if not records:
        return
    uri = storage.join(output, EXPLANATIONS_FILE)
    fs, path = storage.resolve(uri, options)
    old = storage.read_bytes(uri, options) if storage.exists(uri, options) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    new = "".join(json.dumps(r.model_dump(), sort_keys=True) + "\n" for r in records).encode()
    write_atomic(fs, path, old + new)
    log.info("%s: %d explanations added", uri, len(records))


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`maps` (`[n, h, w]`) resized to `[n, H, W]` by nearest neighbour (each pixel takes its patch's value)."""
    n, h, w = maps.shape
    rows = np.minimum(np.arange(size[0]) * h // size[0], h - 1)
    cols = np.minimum(np.arange(size[1]) * w // size[1], w - 1)
    return maps[:, rows][:, :, cols]


def active_mask(maps: np.ndarray, size: tuple[int, int], threshold: float = 0.2) -> np.ndarray:
    """`bool[n, H, W]`: where each map reaches `threshold` × its own maximum (nothing where the map is <= 0)."""
    peak = maps.reshape(len(maps), -1).max(1)[:, None, None]
    return upsample((maps >= threshold * peak) & (maps > 0) & (peak > 0), size)


def mask_images(
    images: np.ndarray, maps: np.ndarray, threshold: float = 0.2, dim: float = 0.25, mode: str = "highlight"
) -> np.ndarray:
    """The top images as sent to an explainer: `uint8[n, H, W, 3]`.

    `mode="highlight"` keeps the pixels of patches whose activation reaches `threshold` × the image's
    peak and dims the rest to `dim` of their brightness; `mode="mask"` blacks the rest out; `mode="none"`
    returns the images unchanged.
    """
    _check_images(images, "mask_images: images")
    if maps.shape[0] != images.shape[0] or maps.ndim != 3:
        raise ValueError(f"mask_images: maps must be [{len(images)}, h, w]; got {list(maps.shape)}")
    if mode == "none":
        return images.copy()
    if mode not in ("highlight", "mask"):
        raise ValueError(f"mask_images: mode must be 'highlight', 'mask' or 'none'; got {mode!r}")
    keep = active_mask(maps, images.shape[1:3], threshold)[..., None]
    return np.where(keep, images, dim_pixels(images, dim if mode == "highlight" else 0.0, "mask_images: dim"))


def check_fraction(value: float, where: str) -> None:
    """Raise `InvalidRequest` naming `where` unless `value` is in [0, 1] (a brightness factor of `uint8` pixels:
    beyond it the cast back to `uint8` would wrap around)."""
    if not 0.0 <= value <= 1.0:
        raise InvalidRequest(f"{where} must be a fraction in [0, 1] of the pixels' brightness; got {value!r}")


def dim_pixels(images: np.ndarray, factor: float, where: str) -> np.ndarray:
    """`uint8` `images` at `factor` (in [0, 1], checked naming `where`) of their brightness, rounded down."""
    check_fraction(factor, where)
    return (images.astype(np.float32) * factor).astype(np.uint8)
