"""Image, video and synthetic sources: specs, decoding, transforms and the errors table.

Nothing here imports Ray; `prisma_ray.data.ray_dataset.build_dataset(spec, preprocess)` turns a spec
into a Ray dataset (columns documented in `prisma_ray.data.batches`).
"""

from prisma_ray.data.batches import RowFormat, decode_refs, split_errors
from prisma_ray.data.decode import DecodedVideo, FrameSampling, decode_image, decode_video
from prisma_ray.data.errors import REASONS, BadSample, ErrorRecord, read_errors_table, write_errors_table
from prisma_ray.data.sources import (
    DatasetSpec,
    FileItem,
    ImageSource,
    ParquetSource,
    Sample,
    SampleRef,
    SyntheticSource,
    VideoSource,
    WebDatasetSource,
    list_refs,
    load_samples,
    parse_dataset_spec,
)
from prisma_ray.data.synthetic import MovingShapesConfig, ShapesConfig, ensure_generated, generate
from prisma_ray.data.transforms import preprocess_image, preprocess_video, resize_and_crop

__all__ = [
    "REASONS",
    "BadSample",
    "DatasetSpec",
    "DecodedVideo",
    "ErrorRecord",
    "FileItem",
    "FrameSampling",
    "ImageSource",
    "MovingShapesConfig",
    "ParquetSource",
    "RowFormat",
    "Sample",
    "SampleRef",
    "ShapesConfig",
    "SyntheticSource",
    "VideoSource",
    "WebDatasetSource",
    "decode_image",
    "decode_refs",
    "decode_video",
    "ensure_generated",
    "generate",
    "list_refs",
    "load_samples",
    "parse_dataset_spec",
    "preprocess_image",
    "preprocess_video",
    "read_errors_table",
    "resize_and_crop",
    "split_errors",
    "write_errors_table",
]
