"""Dataset specs (pydantic, part of a job's YAML) and plain functions that list and load their samples.

`list_refs(spec)` enumerates the work on the driver and fails fast on a missing bucket or path;
`load_samples(ref, spec, sampling)` reads one ref (a file, or a Parquet/WebDataset shard holding many
samples) and yields a `Sample` or an `ErrorRecord` for each sample. Nothing here needs Ray.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from prisma_ray import storage
from prisma_ray.data import synthetic
from prisma_ray.data.decode import DEFAULT_MAX_PIXELS, DecodedVideo, FrameSampling, decode_image, decode_video
from prisma_ray.data.errors import (
    CORRUPT,
    EMPTY,
    MISSING,
    NO_IMAGE,
    TRUNCATED,
    UNREADABLE,
    BadSample,
    ErrorRecord,
)
from prisma_ray.errors import InvalidRequest
from prisma_ray.models.spec import PreprocessSpec
from prisma_ray.runtime.console import counted
from prisma_ray.storage import StorageOptions

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov")
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class _Source(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    storage: StorageOptions = Field(StorageOptions(), description="how to reach `uri` when it is on s3://")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images/videos are skipped (too_large)")


class FileItem(BaseModel):
    """One entry of a file list; `sample_id` defaults to the URI as written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(description="the file (local path or s3://)")
    label: int = Field(-1, description="class label (-1: none)")
    sample_id: str | None = Field(None, description="the sample's id in the stores (default: the URI as written)")


class _FileSource(_Source):
    uri: str | None = Field(None, description="folder searched recursively; first-level sub-folders are classes")
    items: tuple[str | FileItem, ...] | None = Field(None, description="explicit files or URIs instead of a folder")
    labels_from_folders: bool = Field(
        True, description="label each file by its first-level sub-folder (classes numbered in sorted order)"
    )

    @model_validator(mode="after")
    def _uri_or_items(self):
        if (self.uri is None) == (self.items is None):
            raise InvalidRequest("set exactly one of `uri` (a folder) or `items` (a list of files)")
        if self.items is not None and not self.items:
            raise InvalidRequest("`items` is empty")
        return self


class ImageSource(_FileSource):
    """Image files: a folder (class sub-folders give labels; `sample_id` is the relative path) or a list."""

    type: Literal["images"] = Field("images", description="the source type: image files")
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, description="file extensions listed (case-insensitive)")


class VideoSource(_FileSource):
    """Video files (mp4, webm, avi, ...) decoded with PyAV; like `ImageSource` otherwise.

    `sampling` picks the frames; when unset it follows the model's `PreprocessSpec`
    (`num_frames`, `frame_stride`). An image model reads each sampled frame as a sample of its own
    (sample id: the clip's; the store's `frame` column: the frame's index in the video), so `sampling`
    is required then.
    """

    type: Literal["videos"] = Field("videos", description="the source type: video files")
    extensions: tuple[str, ...] = Field(VIDEO_EXTENSIONS, description="file extensions listed (case-insensitive)")
    sampling: FrameSampling | None = Field(None, description="frames per clip (default: the model's)")


class ParquetSource(_Source):
    """Parquet shards (a file or a folder of `*.parquet`) holding encoded images.

    The image column holds bytes, or a struct with a `bytes` field (Hugging Face `Image` layout).
    `sample_id` is the `id_column` value, or `<shard>/<row>` without one.
    """

    type: Literal["parquet"] = Field("parquet", description="the source type: Parquet shards of encoded images")
    uri: str = Field(description="a .parquet file or a folder of them (local path or s3://)")
    image_column: str = Field("image", description="column of the encoded image bytes (or {bytes: ...} structs)")
    label_column: str | None = Field("label", description="column of integer labels (null: none)")
    id_column: str | None = Field("id", description="column of sample ids (null: <shard>/<row>)")
    read_rows: int = Field(64, ge=1, description="rows read from a shard at a time")


class WebDatasetSource(_Source):
    """WebDataset tar shards (a file or a folder of `*.tar`): members `<key>.<ext>` grouped by key.

    `sample_id` is `<shard>/<key>`; the label is the integer in the `<key>.<label_extension>` member.
    """

    type: Literal["webdataset"] = Field("webdataset", description="the source type: WebDataset tar shards")
    uri: str = Field(description="a .tar file or a folder of them (local path or s3://)")
    image_extensions: tuple[str, ...] = Field(
        ("jpg", "jpeg", "png", "webp"), description="member extensions read as the sample's image (first found)"
    )
    label_extension: str | None = Field("cls", description="member extension holding the integer label (null: none)")


class SyntheticSource(_Source):
    """A synthetic dataset with ground truth, generated under `uri` on first use (see `synthetic`).

    Labels: the shape of object 1 (`shapes`) or its direction index (`moving-shapes`).
    """

    type: Literal["synthetic"] = Field("synthetic", description="the source type: a generated synthetic dataset")
    uri: str = Field(description="where the dataset is (or is first generated; local path or s3://)")
    generator: Annotated[synthetic.ShapesConfig | synthetic.MovingShapesConfig, Field(discriminator="name")] = Field(
        description="the generator and its parameters, by `name`: shapes or moving-shapes"
    )
    sampling: FrameSampling | None = Field(None, description="moving-shapes: frames per clip (default: the model's)")


DatasetSpec = Annotated[
    ImageSource | VideoSource | ParquetSource | WebDatasetSource | SyntheticSource, Field(discriminator="type")
]
_SPEC_ADAPTER: TypeAdapter = TypeAdapter(DatasetSpec)
SHARDED = (ParquetSource, WebDatasetSource)


def parse_dataset_spec(data: dict) -> DatasetSpec:
    """Validate a dataset spec from a config mapping (the `type` key picks the source)."""
    return _SPEC_ADAPTER.validate_python(data)


@dataclass(frozen=True)
class SampleRef:
    """A unit of work: a file holding one sample, or a shard (Parquet, WebDataset) holding many.

    `sample_id` is the sample's id, or the shard's relative path for shards.
    """

    uri: str
    sample_id: str
    label: int = -1


@dataclass
class Sample:
    sample_id: str
    path: str
    label: int
    image: np.ndarray | None = None  # uint8[H, W, 3]
    video: DecodedVideo | None = None


def modality(spec: DatasetSpec) -> Literal["image", "video"]:
    if isinstance(spec, VideoSource):
        return "video"
    if isinstance(spec, SyntheticSource) and isinstance(spec.generator, synthetic.MovingShapesConfig):
        return "video"
    return "image"


def frame_sampling(spec: DatasetSpec, preprocess: PreprocessSpec | None) -> FrameSampling | None:
    """The frames to take from each video: the spec's `sampling`, else the model's, else (synthetic) all."""
    if modality(spec) == "image":
        return None
    wanted = preprocess.num_frames if preprocess is not None else None
    sampling = spec.sampling
    if sampling is None and wanted is not None:
        sampling = FrameSampling(num_frames=wanted, stride=preprocess.frame_stride)
    if sampling is None and isinstance(spec, SyntheticSource):
        sampling = FrameSampling(num_frames=spec.generator.num_frames, anchor="start")
    if sampling is None:
        raise InvalidRequest(
            "videos need frame sampling: set `sampling` on the dataset (num_frames per clip, stride or fps; an image "
            "model reads each sampled frame as one sample) or pass a video PreprocessSpec"
        )
    if wanted is not None and sampling.num_frames != wanted:
        raise InvalidRequest(f"sampling.num_frames={sampling.num_frames} but the model expects num_frames={wanted}")
    return sampling


def with_resolved_storage(spec: DatasetSpec) -> DatasetSpec:
    """`spec` with storage options filled from this process's environment and local paths made absolute.

    Call on the driver before shipping a spec to workers, whose environment and working directory differ.
    """
    update: dict = {"storage": spec.storage.resolved()}
    if getattr(spec, "uri", None) is not None:
        update["uri"] = storage.absolute(spec.uri)
    return spec.model_copy(update=update)


def list_refs(spec: DatasetSpec) -> list[SampleRef]:
    """Every ref of a dataset, in a stable order. Raises `MissingInputError` before any work starts."""
    opts = spec.storage
    if isinstance(spec, _FileSource):
        return _list_files(spec) if spec.uri is not None else _list_items(spec)
    if isinstance(spec, SyntheticSource):
        storage.require_bucket(spec.uri, opts)
        synthetic.ensure_generated(spec.generator, spec.uri, opts)
        samples = synthetic.read_table(spec.uri, "samples", opts).to_pylist()
        return [SampleRef(storage.join(spec.uri, s["path"]), s["sample_id"], s["label"]) for s in samples]
    suffix = ".parquet" if isinstance(spec, ParquetSource) else ".tar"
    refs = _list_shards(spec.uri, suffix, opts)
    if isinstance(spec, ParquetSource):
        _check_columns(spec, refs)
    return refs


def _other_kind(spec: _FileSource, listed: list[str]) -> str:
    """What to say of a folder of videos read as images (`--data FOLDER` reads images), or the reverse."""
    kind, exts = ("video", VIDEO_EXTENSIONS) if isinstance(spec, ImageSource) else ("image", IMAGE_EXTENSIONS)
    found = [r for r in listed if r.lower().endswith(exts)]
    if not found:
        return ""
    return (
        f" It holds {counted(len(found), kind)} ({found[0]}{', ...' if len(found) > 1 else ''}):"
        f" a dataset of `type: {kind}s` reads them (for --data, a YAML file holding {{type: {kind}s, uri: ...}})."
    )


def _list_files(spec: _FileSource) -> list[SampleRef]:
    if storage.require_exists(spec.uri, spec.storage).type != pafs.FileType.Directory:
        raise InvalidRequest(f"{spec.uri} is a file, not a folder; list single files under `items` instead.")
    root = storage.absolute(spec.uri)
    exts = tuple(e.lower() for e in spec.extensions)
    listed = storage.list_files(root, spec.storage)
    rels = [r for r in listed if r.lower().endswith(exts)]
    if not rels:
        raise storage.MissingInputError(
            f"{spec.uri}: no files with extensions {spec.extensions} in this folder.{_other_kind(spec, listed)}"
        )
    classes = sorted({r.split("/", 1)[0] for r in rels if "/" in r}) if spec.labels_from_folders else []
    index = {c: i for i, c in enumerate(classes)}
    return [
        SampleRef(storage.join(root, r), r, index[r.split("/", 1)[0]] if "/" in r and classes else -1) for r in rels
    ]


def _list_items(spec: _FileSource) -> list[SampleRef]:
    items = [FileItem(uri=i) if isinstance(i, str) else i for i in spec.items]
    for bucket_uri in sorted({i.uri for i in items if storage.is_s3(i.uri)}):
        storage.require_bucket(bucket_uri, spec.storage)
    return [SampleRef(storage.absolute(i.uri), i.sample_id or i.uri, i.label) for i in items]


def _list_shards(uri: str, suffix: str, opts: StorageOptions) -> list[SampleRef]:
    info = storage.require_exists(uri, opts)
    root = storage.absolute(uri)
    if info.type == pafs.FileType.File:
        return [SampleRef(root, posixpath.basename(info.path))]
    rels = [r for r in storage.list_files(root, opts) if r.endswith(suffix)]
    if not rels:
        raise storage.MissingInputError(f"{uri}: no *{suffix} shards in this folder.")
    return [SampleRef(storage.join(root, r), r) for r in rels]


def _check_columns(spec: ParquetSource, refs: list[SampleRef]) -> None:
    """Check the configured columns against the first readable shard (unreadable ones are recorded later)."""
    for ref in refs:
        fs, path = storage.resolve(ref.uri, spec.storage)
        try:
            with fs.open_input_file(path) as f:
                schema = pq.ParquetFile(f).schema_arrow
        except (pa.ArrowException, OSError):
            continue
        _check_schema(spec, schema, ref.uri)
        return


def _check_schema(spec: ParquetSource, schema: pa.Schema, shard_uri: str) -> None:
    wanted = [c for c in (spec.image_column, spec.label_column, spec.id_column) if c is not None]
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise InvalidRequest(
            f"{shard_uri}: no column(s) {missing}; it has {schema.names}. Set image_column/label_column/id_column."
        )
    if spec.label_column and not pa.types.is_integer(schema.field(spec.label_column).type):
        raise InvalidRequest(
            f"{shard_uri}: label column {spec.label_column!r} is {schema.field(spec.label_column).type}, "
            "not integer. Map labels to class indices, or set label_column: null."
        )


def load_samples(
    ref: SampleRef, spec: DatasetSpec, sampling: FrameSampling | None = None
) -> Iterator[Sample | ErrorRecord]:
    """Read and decode one ref: a `Sample` per good sample, an `ErrorRecord` per bad one (or bad shard)."""
    if isinstance(spec, ParquetSource):
        yield from _load_parquet(ref, spec)
    elif isinstance(spec, WebDatasetSource):
        yield from _load_webdataset(ref, spec)
    elif modality(spec) == "video":
        yield _load_video(ref, spec, sampling)
    else:
        yield _load_image(ref, spec)


def _read_error(ref: SampleRef, e: OSError) -> ErrorRecord:
    reason = MISSING if isinstance(e, FileNotFoundError) else UNREADABLE
    return ErrorRecord(ref.sample_id, ref.uri, reason, f"{type(e).__name__}: {e}")


def _load_image(ref: SampleRef, spec: DatasetSpec) -> Sample | ErrorRecord:
    try:
        data = storage.read_bytes(ref.uri, spec.storage)
    except OSError as e:
        return _read_error(ref, e)
    try:
        return Sample(ref.sample_id, ref.uri, ref.label, image=decode_image(data, max_pixels=spec.max_pixels))
    except BadSample as e:
        return ErrorRecord.from_exception(ref.sample_id, ref.uri, e)


def _load_video(ref: SampleRef, spec: DatasetSpec, sampling: FrameSampling) -> Sample | ErrorRecord:
    try:
        fs, path = storage.resolve(ref.uri, spec.storage)
        with fs.open_input_file(path) as f:
            video = decode_video(f, sampling, max_pixels=spec.max_pixels)
    except BadSample as e:
        return ErrorRecord.from_exception(ref.sample_id, ref.uri, e)
    except OSError as e:
        return _read_error(ref, e)
    return Sample(ref.sample_id, ref.uri, ref.label, video=video)


def _image_bytes(value) -> bytes | None:
    return value.get("bytes") if isinstance(value, dict) else value


def _load_parquet(ref: SampleRef, spec: ParquetSource) -> Iterator[Sample | ErrorRecord]:
    columns = [c for c in (spec.image_column, spec.label_column, spec.id_column) if c is not None]
    row = 0
    try:
        fs, path = storage.resolve(ref.uri, spec.storage)
        with fs.open_input_file(path) as f:
            if f.size() == 0:
                yield ErrorRecord(ref.sample_id, ref.uri, EMPTY, "zero-byte shard")
                return
            for batch in pq.ParquetFile(f).iter_batches(batch_size=spec.read_rows, columns=columns):
                cols = batch.to_pydict()
                for i in range(batch.num_rows):
                    sid = str(cols[spec.id_column][i]) if spec.id_column else f"{ref.sample_id}/{row}"
                    label = cols[spec.label_column][i] if spec.label_column else None
                    yield _decode_member(
                        sid,
                        ref.uri,
                        -1 if label is None else int(label),
                        _image_bytes(cols[spec.image_column][i]),
                        spec,
                    )
                    row += 1
    except FileNotFoundError as e:
        yield _read_error(ref, e)
    except (pa.ArrowException, OSError) as e:  # a corrupt or cut shard
        detail = f"shard unreadable after {row} rows: {type(e).__name__}: {e}"
        yield ErrorRecord(ref.sample_id, ref.uri, CORRUPT, detail)


def _decode_member(
    sample_id: str, path: str, label: int, data: bytes | None, spec: DatasetSpec
) -> Sample | ErrorRecord:
    if data is None:
        return ErrorRecord(sample_id, path, EMPTY, "no image bytes")
    try:
        return Sample(sample_id, path, label, image=decode_image(data, max_pixels=spec.max_pixels))
    except BadSample as e:
        return ErrorRecord.from_exception(sample_id, path, e)


def _load_webdataset(ref: SampleRef, spec: WebDatasetSource) -> Iterator[Sample | ErrorRecord]:
    key = None
    try:
        fs, path = storage.resolve(ref.uri, spec.storage)
        with fs.open_input_stream(path) as stream:
            for key, members in _tar_groups(stream):
                yield _webdataset_sample(f"{ref.sample_id}/{key}", ref.uri, members, spec)
    except FileNotFoundError as e:
        yield _read_error(ref, e)
    except (tarfile.TarError, OSError, EOFError) as e:
        message = str(e)
        reason = EMPTY if "empty file" in message else TRUNCATED if "unexpected end" in message else CORRUPT
        after = f" after key {key!r}" if key is not None else ""
        yield ErrorRecord(ref.sample_id, ref.uri, reason, f"tar unreadable{after}: {type(e).__name__}: {message}")


def _tar_groups(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`(key, {extension: bytes})` for consecutive tar members sharing a WebDataset key.

    Raises `tarfile.ReadError` ("unexpected end of data") for a cut archive, before the last group.
    """
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            match = _WDS_KEY.match(member.name) if member.isfile() else None
            if match is None:
                continue
            if key is not None and match.group(1) != key:
                yield key, members
                members = {}
            key = match.group(1)
            members[match.group(2).lower()] = tar.extractfile(member).read()
        if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:  # tarfile stops quietly at a cut header
            raise tarfile.ReadError("unexpected end of data: the archive ends without its end-of-archive block")
    if key is not None:
        yield key, members


def _webdataset_sample(
    sample_id: str, path: str, members: dict[str, bytes], spec: WebDatasetSource
) -> Sample | ErrorRecord:
    ext = next((e for e in spec.image_extensions if e in members), None)
    if ext is None:
        return ErrorRecord(sample_id, path, NO_IMAGE, f"members {sorted(members)} hold no {spec.image_extensions}")
    label = -1
    if spec.label_extension and spec.label_extension in members:
        text = members[spec.label_extension].decode(errors="replace").strip()
        if not text.lstrip("-").isdigit():
            return ErrorRecord(sample_id, path, CORRUPT, f"label {text[:40]!r} is not an integer")
        label = int(text)
    return _decode_member(sample_id, path, label, members[ext], spec)
