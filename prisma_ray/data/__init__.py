"""Image, video and synthetic sources: specs, decoding, transforms and the errors table.

Nothing here imports Ray. `prisma_ray.data.shards` decodes shards of samples into `uint8` crops at a
model's input geometry (every stage's one input path; the model's device normalises them).
"""

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
from prisma_ray.data.transforms import crop_to_model, resize_and_crop

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
    "Sample",
    "SampleRef",
    "ShapesConfig",
    "SyntheticSource",
    "VideoSource",
    "WebDatasetSource",
    "crop_to_model",
    "decode_image",
    "decode_video",
    "ensure_generated",
    "generate",
    "list_refs",
    "load_samples",
    "parse_dataset_spec",
    "read_errors_table",
    "resize_and_crop",
    "write_errors_table",
]
