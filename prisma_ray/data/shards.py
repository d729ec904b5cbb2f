"""Decoding shards for the model actors (Ray CPU tasks): read, decode, resize and crop to the model's input
geometry as `uint8`, bad samples as error records.

Torch-free on purpose: every decode task imports this module, and not importing torch there keeps the
start of a pipeline (each new worker process imports it) short.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidRequest
from ..models.spec import PreprocessSpec
from .decode import FrameSampling
from .errors import ErrorRecord
from .sources import SHARDED, DatasetSpec, Sample, SampleRef, frame_sampling, list_refs, load_samples, modality
from .transforms import crop_to_model

MAX_FRAME = int(np.iinfo(np.int16).max)  # the store's `frame` column is int16


@dataclass(frozen=True)
class InputFormat:
    """The rows shipped from decode tasks to actors: `uint8` crops at the model's input geometry,
    `[H, W, 3]` per image or `[T, H, W, 3]` per clip; the actor normalises them (`model_inputs`).

    Multimodal language models take images (or videos) cropped to their vision tower's nominal
    size, so that every input yields the same image tokens; their processor normalises them.
    `preprocess` is then the pixels' geometry, with the dataset's modality.

    An image model reading videos (`per_frame`) takes every sampled frame of a clip as one sample
    `[H, W, 3]`: the sample id stays the clip's and `ShardData.frames` holds each frame's index in
    the source video (the store's `frame` column).
    """

    preprocess: PreprocessSpec
    sampling: FrameSampling | None

    @classmethod
    def create(cls, spec: DatasetSpec, preprocess: PreprocessSpec) -> InputFormat:
        """Check that the dataset can feed the model (modality, frames) and fix the geometry.

        Raises `InvalidRequest` (a `ValueError`) when the modalities differ, and `ValueError` when the
        frame sampling cannot be fixed (see `sources.frame_sampling`)."""
        kind = modality(spec)
        if preprocess.modality == "multimodal":
            preprocess = preprocess.model_copy(update={"modality": kind})
        if preprocess.modality == "image" and kind == "video":  # an image model: one sample per sampled frame
            return cls(preprocess, frame_sampling(spec, preprocess))
        if preprocess.modality != kind:
            raise InvalidRequest(f"the model expects {preprocess.modality} input but the dataset holds {kind}s")
        return cls(preprocess, frame_sampling(spec, preprocess))

    @property
    def per_frame(self) -> bool:
        """Whether each sampled video frame is a sample of its own (an image model reading videos)."""
        return self.sampling is not None and self.preprocess.modality == "image"

    @property
    def samples_per_ref(self) -> int:
        """Samples decoded from one file of a file source: the sampled frames when `per_frame`, else 1."""
        return self.sampling.num_frames if self.per_frame else 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The `uint8` crop of one sample: `[H, W, 3]`, or `[T, H, W, 3]` for a video model's clip."""
        frames = (self.sampling.num_frames,) if self.preprocess.modality == "video" else ()
        return (*frames, *self.preprocess.image_size, 3)

    def crops(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """The sample's `uint8` crops `[n, *shape]` and `int64[n]` source frame indices (-1: not a video frame):
        one crop per sample, or one per sampled frame when `per_frame`."""
        if self.per_frame:
            return crop_to_model(sample.video.frames, self.preprocess), sample.video.frame_index.astype(np.int64)
        pixels = sample.video.frames if self.preprocess.modality == "video" else sample.image
        return crop_to_model(pixels, self.preprocess)[None], np.full(1, -1, np.int64)


FRAME_TAG = "#frame="  # `frame_key`: a video frame read as an image sample, e.g. `clips/a.mp4#frame=120`


def frame_key(sample_id: str, frame: int) -> str:
    """The one name of a sample in results keyed by sample (interpretation's top samples, crops, dashboards):
    its id, or `<clip id>#frame=<source frame index>` for a video frame read by an image model."""
    return str(sample_id) if frame < 0 else f"{sample_id}{FRAME_TAG}{int(frame)}"


def key_sample_id(key: str) -> str:
    """The dataset sample id of a `frame_key` (the clip's id for a frame)."""
    head, tag, tail = key.rpartition(FRAME_TAG)
    return head if tag and tail.isdigit() else key


@dataclass
class ShardData:
    """One decoded shard: the good samples' ids, labels and `uint8` crops, and the bad samples.

    `frames` is `int64[N]`: each sample's frame index in its source video when an image model reads
    videos frame by frame (`InputFormat.per_frame`; the sample id is then the clip's), else -1.
    """

    sample_ids: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray
    errors: list[ErrorRecord] = field(default_factory=list)
    frames: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.frames is None:
            self.frames = np.full(len(self.sample_ids), -1, np.int64)

    def keys(self) -> np.ndarray:
        """`str[N]`: each sample's `frame_key` (its id, unique within a dataset also for frames of one clip)."""
        return np.array([frame_key(s, f) for s, f in zip(self.sample_ids.tolist(), self.frames.tolist())], dtype=str)

    def to_bytes(self) -> bytes:
        """An `.npz` (no pickle) holding the shard, to pass between Ray tasks as one value."""
        buf = io.BytesIO()
        err = {
            f"error_{k}": np.array([getattr(r, k) for r in self.errors], dtype=str) for k in ErrorRecord.__annotations__
        }
        np.savez(
            buf,
            sample_ids=self.sample_ids.astype(str),
            labels=self.labels,
            pixels=self.pixels,
            frames=self.frames,
            **err,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardData:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            fields = [z[f"error_{k}"].tolist() for k in ErrorRecord.__annotations__]
            errors = [ErrorRecord(*row) for row in zip(*fields)]
            return cls(z["sample_ids"], z["labels"], z["pixels"], errors, z["frames"])


def decode_shard(refs: Sequence[SampleRef], spec: DatasetSpec, fmt: InputFormat) -> ShardData:
    """Read and decode a shard's refs into model-geometry crops (one per sampled frame when `fmt.per_frame`);
    bad samples become error records."""
    ids, labels, crops, frames, errors = [], [], [], [], []
    for ref in refs:
        for item in load_samples(ref, spec, fmt.sampling):
            if isinstance(item, ErrorRecord):
                errors.append(item)
                continue
            pixels, index = fmt.crops(item)
            if index.max() > MAX_FRAME:
                raise InvalidRequest(
                    f"{item.path}: frame {int(index.max())} is beyond the store's int16 frame column "
                    f"(at most {MAX_FRAME}); sample fewer or earlier frames of this video"
                )
            ids += [item.sample_id] * len(pixels)
            labels += [item.label] * len(pixels)
            crops.append(pixels)
            frames.append(index)
    pixels = np.concatenate(crops) if crops else np.zeros((0, *fmt.shape), np.uint8)
    return ShardData(
        np.array(ids, dtype=str),
        np.array(labels, dtype=np.int64),
        pixels,
        errors,
        np.concatenate([np.zeros(0, np.int64), *frames]),
    )


def decode_batch(batch: dict[str, np.ndarray], spec: DatasetSpec, fmt: InputFormat) -> dict[str, np.ndarray]:
    """Decode task body: rows `shard`, `refs` (JSON list of `SampleRef` fields), `hooks` -> the same rows
    with `payload` (`ShardData.to_bytes()`) in place of `refs`."""
    payloads = [
        decode_shard([SampleRef(**r) for r in json.loads(refs)], spec, fmt).to_bytes() for refs in batch["refs"]
    ]
    return {"shard": batch["shard"], "payload": np.array(payloads, dtype=object), "hooks": batch["hooks"]}


def decode_first(spec: DatasetSpec, fmt: InputFormat, n: int) -> ShardData:
    """The first `n` good samples of a dataset (in sample-id order, as `plan_shards` orders them), decoded as
    extraction decodes them; bad samples on the way are skipped (returned in `errors`)."""
    parts = [decode_shard([], spec, fmt)]  # the empty shard: a dataset of bad samples gives no rows, not an error
    for refs in plan_shards(list_refs(spec), spec, n):
        parts.append(decode_shard(refs, spec, fmt))
        if sum(len(p.sample_ids) for p in parts) >= n:
            break
    ids = np.concatenate([p.sample_ids for p in parts])[:n]
    labels = np.concatenate([p.labels for p in parts])[:n]
    pixels = np.concatenate([p.pixels for p in parts])[:n]
    frames = np.concatenate([p.frames for p in parts])[:n]
    return ShardData(ids, labels, pixels, [e for p in parts for e in p.errors], frames)


def plan_shards(refs: Sequence[SampleRef], spec: DatasetSpec, shard_size: int) -> list[list[SampleRef]]:
    """Cut the refs, sorted by sample id, into shards of `shard_size` (one per file for Parquet/WebDataset)."""
    ordered = sorted(refs, key=lambda r: (r.sample_id, r.uri))
    size = 1 if isinstance(spec, SHARDED) else shard_size
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
