"""Shard decoding (as extraction's decode tasks run it) over every source kind, from local disk and from moto S3."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prisma_ray import storage
from prisma_ray.data import synthetic
from prisma_ray.data.decode import decode_image
from prisma_ray.data.errors import REASONS, ErrorRecord, read_errors_table, write_errors_table
from prisma_ray.data.shards import InputFormat, ShardData, decode_batch, plan_shards
from prisma_ray.data.sources import list_refs, load_samples, parse_dataset_spec, with_resolved_storage
from prisma_ray.data.transforms import crop_to_model
from prisma_ray.models.spec import PreprocessSpec
from prisma_ray.storage import MissingInputError, StorageOptions

IMAGE_MODEL = PreprocessSpec(image_size=(16, 16))
VIDEO_MODEL = PreprocessSpec(modality="video", image_size=(16, 16), num_frames=4, frame_stride=2)
ZOO_MAX_PIXELS = 1_000_000  # tests/conftest.py IMAGE_ZOO_MAX_PIXELS


def crops(size: int, modality: str = "image") -> PreprocessSpec:
    """A model geometry that only resizes the shorter side to `size` and centre-crops (no margin)."""
    return PreprocessSpec(modality=modality, image_size=(size, size), crop_pct=1.0, interpolation="bicubic")


@dataclass
class Place:
    """Where a test writes its inputs: a local folder or an S3 prefix."""

    root: str
    options: StorageOptions

    def put(self, rel: str, data: bytes) -> str:
        uri = storage.join(self.root, rel)
        storage.write_bytes(uri, data, self.options)
        return uri

    def spec(self, **fields):
        return parse_dataset_spec({"storage": self.options, **fields})


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> Place:
    if request.param == "local":
        return Place(str(tmp_path / "data"), StorageOptions())
    s3 = request.getfixturevalue("s3")
    return Place(s3.uri("data"), s3.options)


def _run(spec, preprocess: PreprocessSpec, shard_size: int = 16) -> tuple[ShardData, list[int]]:
    """Every shard through the decode task body (`decode_batch`, its payload read back as the model actor
    reads it): the good samples of all shards, their error records, and each shard's sample count."""
    spec = with_resolved_storage(spec)
    fmt = InputFormat.create(spec, preprocess)
    shards = plan_shards(list_refs(spec), spec, shard_size)
    batch = {
        "shard": np.arange(len(shards)),
        "refs": np.array([json.dumps([asdict(r) for r in refs]) for refs in shards], dtype=object),
        "hooks": np.array(["[]"] * len(shards), dtype=object),
    }
    parts = [ShardData.from_bytes(p) for p in decode_batch(batch, spec, fmt)["payload"]]
    ids = np.concatenate([p.sample_ids for p in parts])
    order = np.argsort(ids)
    data = ShardData(
        ids[order],
        np.concatenate([p.labels for p in parts])[order],
        np.concatenate([p.pixels for p in parts])[order],
        [e for p in parts for e in p.errors],
    )
    return data, [len(p.sample_ids) + len(p.errors) for p in parts]


def _frame_index(spec, preprocess: PreprocessSpec) -> list[list[int]]:
    """The source frame of each sampled frame, per good clip (what the decoded clips hold)."""
    spec = with_resolved_storage(spec)
    sampling = InputFormat.create(spec, preprocess).sampling
    samples = [
        s for ref in list_refs(spec) for s in load_samples(ref, spec, sampling) if not isinstance(s, ErrorRecord)
    ]
    return [s.video.frame_index.tolist() for s in sorted(samples, key=lambda s: s.sample_id)]


def _png(image_zoo, name="good.png") -> bytes:
    return image_zoo[name][0]


def test_image_folder(place, image_zoo):
    for rel in ("cat/x.png", "cat/y.jpg", "dog/z.png"):
        place.put(rel, _png(image_zoo, "good" + rel[-4:]))
    place.put("dog/broken.png", _png(image_zoo, "truncated.png"))
    rows, sizes = _run(place.spec(type="images", uri=place.root), IMAGE_MODEL, shard_size=2)
    assert list(rows.sample_ids) == ["cat/x.png", "cat/y.jpg", "dog/z.png"]
    assert list(rows.labels) == [0, 0, 1]
    assert rows.pixels.shape == (3, 16, 16, 3) and rows.pixels.dtype == np.uint8
    expected = crop_to_model(decode_image(_png(image_zoo)), IMAGE_MODEL)
    np.testing.assert_array_equal(rows.pixels[0], expected)
    assert [(e.sample_id, e.reason, e.path) for e in rows.errors] == [
        ("dog/broken.png", "truncated", storage.join(place.root, "dog/broken.png"))
    ]
    assert max(sizes) <= 2


def test_image_list(place, image_zoo):
    good = place.put("a/one.png", _png(image_zoo))
    gray = place.put("b/two.png", _png(image_zoo, "gray16.png"))
    missing = storage.join(place.root, "c/none.png")
    items = [good, {"uri": gray, "label": 4, "sample_id": "two"}, missing]
    spec = place.spec(type="images", items=items)
    rows, _ = _run(spec, crops(20))
    assert list(rows.sample_ids) == [good, "two"]
    assert list(rows.labels) == [-1, 4]
    assert rows.pixels.shape == (2, 20, 20, 3) and rows.pixels.dtype == np.uint8
    assert [(e.sample_id, e.reason) for e in rows.errors] == [(missing, "missing")]


def test_parquet_shards(place, image_zoo):
    for shard in range(2):
        rows = [{"id": f"s{shard}-{i}", "label": i, "image": _png(image_zoo)} for i in range(3)]
        rows.append({"id": f"s{shard}-bad", "label": 0, "image": _png(image_zoo, "corrupt.jpg")})
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=2)
        place.put(f"shards/part-{shard}.parquet", buf.getvalue())
    spec = place.spec(type="parquet", uri=storage.join(place.root, "shards"), read_rows=2)
    rows, sizes = _run(spec, IMAGE_MODEL)
    assert list(rows.sample_ids) == [f"s{s}-{i}" for s in range(2) for i in range(3)]
    assert list(rows.labels) == [0, 1, 2, 0, 1, 2]
    assert sorted((e.sample_id, e.reason) for e in rows.errors) == [("s0-bad", "corrupt"), ("s1-bad", "corrupt")]
    assert sizes == [4, 4], "one shard per file"


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_shards(place, image_zoo):
    place.put(
        "wds/shard-0.tar",
        _tar_bytes(
            [
                ("a.png", _png(image_zoo)),
                ("a.cls", b"1"),
                ("b.jpg", _png(image_zoo, "good.jpg")),
                ("b.cls", b"2"),
                ("c.txt", b"caption only"),
            ]
        ),
    )
    place.put("wds/shard-1.tar", _tar_bytes([("d.png", _png(image_zoo, "empty.png")), ("d.cls", b"3")]))
    spec = place.spec(type="webdataset", uri=storage.join(place.root, "wds"))
    rows, _ = _run(spec, IMAGE_MODEL)
    assert list(rows.sample_ids) == ["shard-0.tar/a", "shard-0.tar/b"]
    assert list(rows.labels) == [1, 2]
    assert sorted((e.sample_id, e.reason) for e in rows.errors) == [
        ("shard-0.tar/c", "no_image"),
        ("shard-1.tar/d", "empty"),
    ]


def test_video_files(place, video_zoo):
    for rel, name in (
        ("walk/a.mp4", "good.mp4"),
        ("walk/b.webm", "good.webm"),
        ("run/c.avi", "good.avi"),
        ("run/short.mp4", "short.mp4"),
    ):
        place.put(rel, video_zoo[name][0])
    spec = place.spec(type="videos", uri=place.root)
    rows, _ = _run(spec, VIDEO_MODEL)
    assert list(rows.sample_ids) == ["run/c.avi", "walk/a.mp4", "walk/b.webm"]
    assert list(rows.labels) == [0, 1, 1]
    assert rows.pixels.shape == (3, 4, 16, 16, 3)
    assert _frame_index(spec, VIDEO_MODEL) == [[2, 4, 6, 8]] * 3
    assert [(e.sample_id, e.reason) for e in rows.errors] == [("run/short.mp4", "too_short")]


def test_synthetic_shapes_and_moving_shapes(place):
    shapes = place.spec(
        type="synthetic",
        uri=storage.join(place.root, "shapes"),
        generator={"name": "shapes", "n_images": 12, "seed": 2},
    )
    rows, _ = _run(shapes, crops(32))
    assert not rows.errors and list(rows.sample_ids) == [f"images/{i:06d}.png" for i in range(12)]
    labels = synthetic.read_table(shapes.uri, "samples", place.options).column("label").to_pylist()
    assert list(rows.labels) == labels and rows.pixels.shape == (12, 32, 32, 3)
    moving = place.spec(
        type="synthetic",
        uri=storage.join(place.root, "moving"),
        generator={"name": "moving-shapes", "n_clips": 3, "num_frames": 10},
    )
    rows, _ = _run(moving, VIDEO_MODEL)
    assert not rows.errors and list(rows.sample_ids) == [f"clips/{i:06d}.mp4" for i in range(3)]
    assert rows.pixels.shape == (3, 4, 16, 16, 3)
    assert _frame_index(moving, VIDEO_MODEL) == [[1, 3, 5, 7]] * 3  # centred: (10 - 7) // 2 = 1


def test_bad_input_zoo_records_every_reason(tmp_path, image_zoo, video_zoo):
    root, out = tmp_path / "zoo", str(tmp_path / "out" / "acts")
    for name, (data, _) in image_zoo.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / name).write_bytes(data)
    for name, (data, _) in video_zoo.items():
        (root / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "videos" / name).write_bytes(data)
    (root / "a_directory.png").mkdir()
    (root / "wds").mkdir()
    shard = _tar_bytes([("k.cls", b"1"), ("m.png", image_zoo["good.png"][0])])
    (root / "wds" / "whole.tar").write_bytes(shard)
    (root / "wds" / "cut.tar").write_bytes(shard[:1200])  # inside the second member's header
    runs = [
        (
            parse_dataset_spec({"type": "images", "uri": str(root / "images"), "max_pixels": ZOO_MAX_PIXELS}),
            IMAGE_MODEL,
        ),
        (
            parse_dataset_spec({"type": "videos", "uri": str(root / "videos"), "sampling": {"num_frames": 8}}),
            crops(8, "video"),
        ),
        (
            parse_dataset_spec({"type": "images", "items": [str(root / "gone.png"), str(root / "a_directory.png")]}),
            crops(8),
        ),
        (parse_dataset_spec({"type": "webdataset", "uri": str(root / "wds")}), IMAGE_MODEL),
    ]
    recorded: dict[str, str] = {}
    for spec, model in runs:
        rows, _ = _run(spec, model)
        write_errors_table(rows.errors, out)
        recorded.update({e.sample_id: e.reason for e in rows.errors})
    table = read_errors_table(out)
    assert dict(zip(table.column("sample_id").to_pylist(), table.column("reason").to_pylist())) == recorded
    assert set(recorded.values()) == set(REASONS)
    for name, (_, reason) in [*image_zoo.items(), *video_zoo.items()]:
        assert recorded.get(name) == reason, name
    assert recorded[str(root / "gone.png")] == "missing"
    assert recorded[str(root / "a_directory.png")] == "unreadable"
    assert recorded["whole.tar/k"] == "no_image" and recorded["cut.tar"] == "truncated"
    assert "whole.tar/m" not in recorded


def test_missing_inputs_fail_fast(s3, tmp_path):
    """Listing the inputs (on the driver, before any decode task) names what is missing."""

    def listed(spec: dict):
        return list_refs(with_resolved_storage(parse_dataset_spec(spec)))

    with pytest.raises(MissingInputError, match="bucket 'nope-bucket' does not exist.*Create the bucket"):
        listed({"type": "images", "uri": "s3://nope-bucket/x", "storage": s3.options})
    with pytest.raises(MissingInputError, match="bucket 'nope-bucket' does not exist"):
        listed(
            {
                "type": "synthetic",
                "uri": "s3://nope-bucket/syn",
                "storage": s3.options,
                "generator": {"name": "shapes", "n_images": 2},
            }
        )
    with pytest.raises(MissingInputError, match=f"{s3.uri('absent')}: no object or prefix"):
        listed({"type": "parquet", "uri": s3.uri("absent"), "storage": s3.options})
    with pytest.raises(MissingInputError, match="no such file or directory"):
        listed({"type": "videos", "uri": str(tmp_path / "none")})
    with pytest.raises(MissingInputError, match="bucket 'nope-bucket'"):
        listed({"type": "images", "items": ["s3://nope-bucket/a.png"], "storage": s3.options})
