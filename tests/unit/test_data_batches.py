import io

import numpy as np
import pytest
from PIL import Image

from prisma_ray.data.batches import RowFormat, decode_refs, split_errors
from prisma_ray.data.decode import FrameSampling
from prisma_ray.data.sources import list_refs, parse_dataset_spec
from prisma_ray.data.transforms import preprocess_image
from prisma_ray.models.spec import PreprocessSpec

IMAGE_MODEL = PreprocessSpec(image_size=(16, 16))
VIDEO_MODEL = PreprocessSpec(modality="video", image_size=(16, 16), num_frames=4, frame_stride=2)


@pytest.fixture
def image_dir(tmp_path, image_zoo):
    for name in ("good.png", "gray16.png", "truncated.png", "empty.png", "oversized.png"):
        (tmp_path / name).write_bytes(image_zoo[name][0])
    return tmp_path


def test_row_format_checks():
    images = parse_dataset_spec({"type": "images", "uri": "/x"})
    with pytest.raises(ValueError, match="set `size`"):
        RowFormat.create(images, None)
    with pytest.raises(ValueError, match="expects video input but the dataset holds images"):
        RowFormat.create(images, VIDEO_MODEL)
    raw = RowFormat.create(images.model_copy(update={"size": (10, 12)}), None)
    assert (raw.column, raw.shape, raw.dtype, raw.row_bytes) == ("image", (10, 12, 3), np.uint8, 360)
    videos = parse_dataset_spec({"type": "videos", "uri": "/x"})
    model = RowFormat.create(videos, VIDEO_MODEL)
    assert (model.column, model.shape, model.dtype) == ("pixels", (4, 3, 16, 16), np.float32)
    clips = RowFormat.create(videos.model_copy(update={"size": (8, 8), "sampling": FrameSampling(num_frames=3)}), None)
    assert (clips.column, clips.shape) == ("frames", (3, 8, 8, 3))


def test_decode_refs_columns_errors_and_bounded_batches(image_dir, image_zoo):
    spec = parse_dataset_spec({"type": "images", "uri": str(image_dir), "max_pixels": 1_000_000})
    fmt = RowFormat.create(spec, IMAGE_MODEL)
    batches = list(decode_refs(list_refs(spec), spec, fmt, max_rows=2))
    assert [len(b["sample_id"]) for b in batches] == [2, 2, 1]
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert set(batch) == {"sample_id", "path", "label", "pixels", "error", "error_detail"}
    assert batch["pixels"].shape == (5, 3, 16, 16) and batch["pixels"].dtype == np.float32
    assert batch["label"].dtype == np.int64 and set(batch["label"]) == {-1}
    by_id = dict(zip(batch["sample_id"], range(5)))
    good = np.asarray(Image.open(io.BytesIO(image_zoo["good.png"][0])))
    np.testing.assert_array_equal(batch["pixels"][by_id["good.png"]], preprocess_image(good, IMAGE_MODEL))

    clean, records = split_errors(batch)
    assert sorted(clean["sample_id"]) == ["good.png", "gray16.png"]
    assert all(len(v) == 2 for v in clean.values())
    assert sorted((r.sample_id, r.reason) for r in records) == [
        ("empty.png", "empty"),
        ("oversized.png", "too_large"),
        ("truncated.png", "truncated"),
    ]
    assert all(r.path.startswith(str(image_dir)) and r.detail for r in records)
    assert not batch["pixels"][~np.isin(batch["sample_id"], clean["sample_id"])].any()  # error rows are zeros


def test_video_rows_raw_and_preprocessed(tmp_path, video_zoo):
    for name in ("good.mp4", "short.mp4"):
        (tmp_path / name).write_bytes(video_zoo[name][0])
    spec = parse_dataset_spec({"type": "videos", "uri": str(tmp_path), "size": (8, 8)})
    fmt = RowFormat.create(spec, VIDEO_MODEL)
    (batch,) = decode_refs(list_refs(spec), spec, fmt, max_rows=8)
    assert batch["pixels"].shape == (2, 4, 3, 16, 16)
    np.testing.assert_array_equal(batch["frame_index"], [[2, 4, 6, 8], [-1, -1, -1, -1]])
    assert list(batch["error"]) == ["", "too_short"]
    raw = RowFormat.create(spec.model_copy(update={"sampling": FrameSampling(num_frames=3, anchor="start")}), None)
    (batch,) = decode_refs(list_refs(spec), spec, raw, max_rows=8)
    assert batch["frames"].shape == (2, 3, 8, 8, 3) and batch["frames"].dtype == np.uint8
    np.testing.assert_array_equal(batch["frame_index"][0], [0, 1, 2])
    assert list(batch["error"]) == ["", ""]
