"""Refs to fixed-shape column batches (what each Ray Data decode task returns), and `split_errors`.

Columns of every batch:

- `sample_id` (str), `path` (str: the file or shard), `label` (int64, -1 if none);
- with a `PreprocessSpec`: `pixels`, float32 `[3, H, W]` (images) or `[T, 3, H, W]` (videos);
  without one: `image` uint8 `[H, W, 3]` or `frames` uint8 `[T, H, W, 3]` at the spec's `size`;
- videos only: `frame_index`, int64 `[T]`, the source frame of each sampled frame;
- `error` (str: a reason from `errors.REASONS`, "" for good rows) and `error_detail` (str).

A bad sample is a row whose `error` is set and whose tensors are zeros (`frame_index` -1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from prisma_ray.data.decode import FrameSampling
from prisma_ray.data.errors import ErrorRecord
from prisma_ray.data.sources import DatasetSpec, Sample, SampleRef, frame_sampling, load_samples, modality
from prisma_ray.data.transforms import preprocess_image, preprocess_video, resize_and_crop
from prisma_ray.errors import InvalidRequest
from prisma_ray.models.spec import PreprocessSpec

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class RowFormat:
    """The tensor column of a dataset's rows: its name, shape and dtype, and how a sample fills it."""

    modality: str
    preprocess: PreprocessSpec | None
    size: tuple[int, int] | None
    sampling: FrameSampling | None

    @classmethod
    def create(cls, spec: DatasetSpec, preprocess: PreprocessSpec | None) -> RowFormat:
        """Check that the dataset can feed the model (same modality, a fixed size) and fix the row layout."""
        kind = modality(spec)
        if preprocess is not None and preprocess.modality != kind:
            raise InvalidRequest(f"the model expects {preprocess.modality} input but the dataset holds {kind}s")
        if preprocess is None and spec.size is None:
            raise InvalidRequest("set `size` on the dataset spec (raw output) or pass the model's PreprocessSpec")
        return cls(kind, preprocess, spec.size, frame_sampling(spec, preprocess))

    @property
    def column(self) -> str:
        if self.preprocess is not None:
            return "pixels"
        return "frames" if self.modality == "video" else "image"

    @property
    def shape(self) -> tuple[int, ...]:
        frames = (self.sampling.num_frames,) if self.modality == "video" else ()
        if self.preprocess is not None:
            return frames + (3, *self.preprocess.image_size)
        return frames + (*self.size, 3)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.preprocess is not None else np.uint8)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def tensor(self, sample: Sample) -> np.ndarray:
        if self.modality == "video":
            frames = sample.video.frames
            if self.preprocess is not None:
                return preprocess_video(frames, self.preprocess)
            return np.stack([resize_and_crop(f, self.size) for f in frames])
        if self.preprocess is not None:
            return preprocess_image(sample.image, self.preprocess)
        return resize_and_crop(sample.image, self.size)


def _collate(rows: list[Sample | ErrorRecord], fmt: RowFormat) -> Batch:
    n = len(rows)
    batch: Batch = {
        "sample_id": np.array([r.sample_id for r in rows], dtype=object),
        "path": np.array([r.path for r in rows], dtype=object),
        "label": np.array([getattr(r, "label", -1) for r in rows], dtype=np.int64),
        fmt.column: np.zeros((n, *fmt.shape), dtype=fmt.dtype),
        "error": np.array([getattr(r, "reason", "") for r in rows], dtype=object),
        "error_detail": np.array([getattr(r, "detail", "") for r in rows], dtype=object),
    }
    if fmt.modality == "video":
        batch["frame_index"] = np.full((n, fmt.sampling.num_frames), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        if isinstance(r, Sample):
            batch[fmt.column][i] = fmt.tensor(r)
            if fmt.modality == "video":
                batch["frame_index"][i] = r.video.frame_index
    return batch


def decode_refs(refs: Sequence[SampleRef], spec: DatasetSpec, fmt: RowFormat, max_rows: int) -> Iterator[Batch]:
    """Load, decode and transform `refs`, yielding batches of at most `max_rows` rows (bad samples included)."""
    rows: list[Sample | ErrorRecord] = []
    for ref in refs:
        for item in load_samples(ref, spec, fmt.sampling):
            rows.append(item)
            if len(rows) >= max_rows:
                yield _collate(rows, fmt)
                rows = []
    if rows:
        yield _collate(rows, fmt)


def split_errors(batch: Batch) -> tuple[Batch, list[ErrorRecord]]:
    """Split a batch (dict of numpy arrays, as `map_batches`/`iter_batches` give it) into good rows and errors.

    Call it first in any UDF that consumes a dataset from `build_dataset`; hand the records to
    `errors.write_errors_table` (or return them) so that no bad sample is dropped silently.
    """
    bad = np.asarray([bool(e) for e in batch["error"]], dtype=bool)
    records = [
        ErrorRecord(str(s), str(p), str(e), str(d))
        for s, p, e, d in zip(
            batch["sample_id"][bad], batch["path"][bad], batch["error"][bad], batch["error_detail"][bad]
        )
    ]
    return {k: v[~bad] for k, v in batch.items()}, records
