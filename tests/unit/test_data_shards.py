"""Shard decoding (`prisma_ray.data.shards`): the input format's checks, `uint8` crops at the model's
geometry, bad samples as error records, and the first good samples of a dataset."""

import io

import numpy as np
import pytest
from PIL import Image

from prisma_ray.data.decode import FrameSampling, decode_video
from prisma_ray.data.shards import InputFormat, decode_first, decode_shard
from prisma_ray.data.sources import list_refs, parse_dataset_spec
from prisma_ray.data.transforms import crop_to_model
from prisma_ray.errors import InvalidRequest
from prisma_ray.models.spec import PreprocessSpec

IMAGE_MODEL = PreprocessSpec(image_size=(16, 16))
VIDEO_MODEL = PreprocessSpec(modality="video", image_size=(16, 16), num_frames=4, frame_stride=2)


@pytest.fixture
def image_dir(tmp_path, image_zoo):
    for name in ("good.png", "gray16.png", "truncated.png", "empty.png", "oversized.png"):
        (tmp_path / name).write_bytes(image_zoo[name][0])
    return tmp_path


def test_input_format_checks():
    images = parse_dataset_spec({"type": "images", "uri": "/x"})
    with pytest.raises(InvalidRequest, match="expects video input but the dataset holds images"):
        InputFormat.create(images, VIDEO_MODEL)
    assert InputFormat.create(images, IMAGE_MODEL).shape == (16, 16, 3)
    videos = parse_dataset_spec({"type": "videos", "uri": "/x"})
    model = InputFormat.create(videos, VIDEO_MODEL)
    assert model.shape == (4, 16, 16, 3) and model.sampling == FrameSampling(num_frames=4, stride=2)
    with pytest.raises(ValueError, match="sampling.num_frames=3 but the model expects num_frames=4"):
        InputFormat.create(videos.model_copy(update={"sampling": FrameSampling(num_frames=3)}), VIDEO_MODEL)


def test_decode_shard_crops_and_error_records(image_dir, image_zoo):
    spec = parse_dataset_spec({"type": "images", "uri": str(image_dir), "max_pixels": 1_000_000})
    data = decode_shard(list_refs(spec), spec, InputFormat.create(spec, IMAGE_MODEL))
    assert sorted(data.sample_ids) == ["good.png", "gray16.png"]
    assert data.pixels.shape == (2, 16, 16, 3) and data.pixels.dtype == np.uint8
    assert data.labels.dtype == np.int64 and set(data.labels) == {-1}
    good = np.asarray(Image.open(io.BytesIO(image_zoo["good.png"][0])))
    np.testing.assert_array_equal(
        data.pixels[list(data.sample_ids).index("good.png")], crop_to_model(good, IMAGE_MODEL)
    )
    assert sorted((r.sample_id, r.reason) for r in data.errors) == [
        ("empty.png", "empty"),
        ("oversized.png", "too_large"),
        ("truncated.png", "truncated"),
    ]
    assert all(r.path.startswith(str(image_dir)) and r.detail for r in data.errors)


def test_first_good_samples_skip_the_bad(image_dir):
    spec = parse_dataset_spec({"type": "images", "uri": str(image_dir), "max_pixels": 1_000_000})
    fmt = InputFormat.create(spec, IMAGE_MODEL)
    first = decode_first(spec, fmt, 1)
    assert list(first.sample_ids) == ["good.png"] and first.pixels.shape == (1, 16, 16, 3)
    every = decode_first(spec, fmt, 10)
    assert list(every.sample_ids) == ["good.png", "gray16.png"]
    assert sorted(r.reason for r in every.errors) == ["empty", "too_large", "truncated"]
    bad = parse_dataset_spec({"type": "images", "items": [str(image_dir / "empty.png")]})
    assert decode_first(bad, fmt, 4).pixels.shape == (0, 16, 16, 3)


def test_video_clips_follow_the_model_sampling(tmp_path, video_zoo):
    for name in ("good.mp4", "short.mp4"):
        (tmp_path / name).write_bytes(video_zoo[name][0])
    spec = parse_dataset_spec({"type": "videos", "uri": str(tmp_path)})
    fmt = InputFormat.create(spec, VIDEO_MODEL)
    data = decode_shard(list_refs(spec), spec, fmt)
    assert data.pixels.shape == (1, 4, 16, 16, 3) and list(data.sample_ids) == ["good.mp4"]
    clip = decode_video(video_zoo["good.mp4"][0], fmt.sampling)
    np.testing.assert_array_equal(clip.frame_index, [2, 4, 6, 8])
    np.testing.assert_array_equal(data.pixels[0], crop_to_model(clip.frames, VIDEO_MODEL))
    assert [(r.sample_id, r.reason) for r in data.errors] == [("short.mp4", "too_short")]
