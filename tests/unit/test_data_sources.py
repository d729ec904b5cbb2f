import io
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from prisma_ray.data import sources
from prisma_ray.data.decode import FrameSampling
from prisma_ray.data.errors import ErrorRecord
from prisma_ray.data.sources import Sample, SampleRef, list_refs, load_samples, parse_dataset_spec
from prisma_ray.models.spec import PreprocessSpec
from prisma_ray.storage import MissingInputError


def _png(value: int, size=(8, 10)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _load_all(spec, sampling=None):
    out = []
    for ref in list_refs(spec):
        out += list(load_samples(ref, spec, sampling))
    return out


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds"
    for rel, value in [("cat/a.png", 10), ("cat/sub/b.PNG", 20), ("dog/c.png", 30), ("loose.png", 40)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(value))
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "empty.png").write_bytes(b"")
    return root


def test_folder_ids_labels_and_errors(folder):
    spec = parse_dataset_spec({"type": "images", "uri": str(folder)})
    refs = list_refs(spec)
    assert [(r.sample_id, r.label) for r in refs] == [
        ("cat/a.png", 0),
        ("cat/sub/b.PNG", 0),
        ("dog/c.png", 1),
        ("dog/empty.png", 1),
        ("loose.png", -1),
    ]
    items = _load_all(spec)
    good = {s.sample_id: s for s in items if isinstance(s, Sample)}
    assert good["dog/c.png"].image[0, 0, 0] == 30 and good["dog/c.png"].path == str(folder / "dog/c.png")
    assert [e for e in items if isinstance(e, ErrorRecord)] == [
        ErrorRecord("dog/empty.png", str(folder / "dog/empty.png"), "empty", "zero-byte image")
    ]
    no_labels = spec.model_copy(update={"labels_from_folders": False})
    assert {r.label for r in list_refs(no_labels)} == {-1}


def test_sample_ids_are_stable_across_roots_and_uri_forms(folder, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, moved)
    ids = [r.sample_id for r in list_refs(parse_dataset_spec({"type": "images", "uri": str(folder)}))]
    assert ids == [r.sample_id for r in list_refs(parse_dataset_spec({"type": "images", "uri": str(moved)}))]
    assert ids == [r.sample_id for r in list_refs(parse_dataset_spec({"type": "images", "uri": f"file://{folder}/"}))]


def test_image_list(folder):
    spec = parse_dataset_spec(
        {
            "type": "images",
            "items": [
                str(folder / "dog/c.png"),
                {"uri": str(folder / "cat/a.png"), "label": 7, "sample_id": "a"},
                str(folder / "gone.png"),
            ],
        }
    )
    items = _load_all(spec)
    assert [(i.sample_id, getattr(i, "label", None)) for i in items[:2]] == [(str(folder / "dog/c.png"), -1), ("a", 7)]
    assert isinstance(items[2], ErrorRecord) and items[2].reason == "missing"


def _parquet(path, rows, **kw):
    pq.write_table(pa.Table.from_pylist(rows), path, **kw)


def test_parquet_shards(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    _parquet(
        root / "part-0.parquet", [{"id": f"img{i}", "label": i, "image": _png(i)} for i in range(5)], row_group_size=2
    )
    _parquet(
        root / "part-1.parquet",
        [{"id": "img5", "label": None, "image": None}, {"id": "img6", "label": 1, "image": b"junk"}],
    )
    (root / "part-2.parquet").write_bytes(b"PAR1 not really")
    (root / "part-.parquet").write_bytes(b"")  # sorts first: the column check must skip it
    spec = parse_dataset_spec({"type": "parquet", "uri": str(root), "read_rows": 3})
    refs = list_refs(spec)
    assert [r.sample_id for r in refs] == ["part-.parquet", "part-0.parquet", "part-1.parquet", "part-2.parquet"]
    items = _load_all(spec)
    good = [i for i in items if isinstance(i, Sample)]
    assert [(s.sample_id, s.label, int(s.image[0, 0, 0])) for s in good] == [(f"img{i}", i, i) for i in range(5)]
    bad = {e.sample_id: e.reason for e in items if isinstance(e, ErrorRecord)}
    assert bad == {"img5": "empty", "img6": "corrupt", "part-2.parquet": "corrupt", "part-.parquet": "empty"}


def test_parquet_without_id_column_and_hf_struct_layout(tmp_path):
    path = tmp_path / "one.parquet"
    _parquet(path, [{"image": {"bytes": _png(9), "path": "x.png"}}, {"image": {"bytes": _png(8), "path": "y.png"}}])
    spec = parse_dataset_spec({"type": "parquet", "uri": str(path), "label_column": None, "id_column": None})
    items = _load_all(spec)
    assert [(s.sample_id, s.label, int(s.image[0, 0, 0])) for s in items] == [
        ("one.parquet/0", -1, 9),
        ("one.parquet/1", -1, 8),
    ]


def test_parquet_bad_columns_fail_fast(tmp_path):
    _parquet(tmp_path / "a.parquet", [{"jpg": _png(1), "label": "cat"}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['image', 'id'\].*image_column"):
        list_refs(parse_dataset_spec({"type": "parquet", "uri": str(tmp_path)}))
    with pytest.raises(ValueError, match="label column 'label' is string, not integer"):
        list_refs(
            parse_dataset_spec({"type": "parquet", "uri": str(tmp_path), "image_column": "jpg", "id_column": None})
        )


def _tar(path, members):
    with tarfile.open(path, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    root = tmp_path / "wds"
    (root / "train").mkdir(parents=True)
    _tar(
        root / "train" / "shard-000.tar",
        [
            ("s/000.png", _png(1)),
            ("s/000.cls", b"3\n"),
            ("s/000.json", b"{}"),
            ("s/001.jpg", _png(2)),
            ("s/001.cls", b"1"),
            ("s/002.cls", b"5"),
            ("s/003.png", b""),
            ("s/003.cls", b"0"),
            ("s/004.png", _png(4)),
            ("s/004.cls", b"dog"),
        ],
    )
    cut_shard = root / "train" / "shard-001.tar"
    _tar(cut_shard, [("k.png", _png(5)), ("k.cls", b"2"), ("m.png", _png(6)), ("m.cls", b"4")])
    with tarfile.open(cut_shard) as tar:
        member = tar.getmember("m.png")
    cut_shard.write_bytes(cut_shard.read_bytes()[: member.offset_data + member.size // 2])
    header_cut = root / "train" / "shard-002.tar"
    _tar(header_cut, [("n.png", _png(7)), ("n.cls", b"1")])
    with tarfile.open(header_cut) as tar:
        member = tar.getmember("n.cls")
    header_cut.write_bytes(header_cut.read_bytes()[: member.offset + 100])
    spec = parse_dataset_spec({"type": "webdataset", "uri": str(root)})
    assert [r.sample_id for r in list_refs(spec)] == [f"train/shard-00{i}.tar" for i in range(3)]
    items = _load_all(spec)
    good = [(s.sample_id, s.label, int(s.image[0, 0, 0])) for s in items if isinstance(s, Sample)]
    assert good == [
        ("train/shard-000.tar/s/000", 3, 1),
        ("train/shard-000.tar/s/001", 1, 2),
        ("train/shard-001.tar/k", 2, 5),
    ]
    bad = {e.sample_id: e.reason for e in items if isinstance(e, ErrorRecord)}
    assert bad == {
        "train/shard-000.tar/s/002": "no_image",
        "train/shard-000.tar/s/003": "empty",
        "train/shard-000.tar/s/004": "corrupt",
        "train/shard-001.tar": "truncated",  # cut inside m.png's data
        "train/shard-002.tar": "truncated",  # cut inside n.cls's header: n is not trusted either
    }


def test_videos_folder_and_sampling(tmp_path, video_zoo):
    root = tmp_path / "vids"
    (root / "walk").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "walk" / "a.mp4").write_bytes(video_zoo["good.mp4"][0])
    (root / "run" / "b.webm").write_bytes(video_zoo["good.webm"][0])
    (root / "run" / "c.avi").write_bytes(video_zoo["short.mp4"][0])
    spec = parse_dataset_spec({"type": "videos", "uri": str(root), "sampling": {"num_frames": 6, "stride": 2}})
    items = _load_all(spec, sources.frame_sampling(spec, None))
    assert [(i.sample_id, i.label) for i in items if isinstance(i, Sample)] == [("run/b.webm", 0), ("walk/a.mp4", 1)]
    np.testing.assert_array_equal(items[0].video.frame_index, [0, 2, 4, 6, 8, 10])
    assert [(e.sample_id, e.reason) for e in items if isinstance(e, ErrorRecord)] == [("run/c.avi", "too_short")]


def test_frame_sampling_rules():
    videos = parse_dataset_spec({"type": "videos", "uri": "/x"})
    model = PreprocessSpec(modality="video", num_frames=8, frame_stride=4)
    assert sources.frame_sampling(videos, model) == FrameSampling(num_frames=8, stride=4)
    with pytest.raises(ValueError, match="set `sampling`"):
        sources.frame_sampling(videos, None)
    fixed = videos.model_copy(update={"sampling": FrameSampling(num_frames=4)})
    with pytest.raises(ValueError, match="expects num_frames=8"):
        sources.frame_sampling(fixed, model)
    generator = {"name": "moving-shapes", "num_frames": 10}
    clips = parse_dataset_spec({"type": "synthetic", "uri": "/x", "generator": generator})
    assert sources.frame_sampling(clips, None) == FrameSampling(num_frames=10, anchor="start")
    assert sources.frame_sampling(parse_dataset_spec({"type": "images", "uri": "/x"}), None) is None


def test_spec_validation():
    with pytest.raises(ValidationError, match="exactly one of"):
        parse_dataset_spec({"type": "images"})
    with pytest.raises(ValidationError, match="exactly one of"):
        parse_dataset_spec({"type": "images", "uri": "/x", "items": ["/y.png"]})
    with pytest.raises(ValidationError):
        parse_dataset_spec({"type": "imgs", "uri": "/x"})
    with pytest.raises(ValidationError):
        parse_dataset_spec({"type": "images", "uri": "/x", "unknown": 1})
    spec = parse_dataset_spec(
        {
            "type": "synthetic",
            "uri": "s3://b/p",
            "generator": {"name": "shapes", "n_images": 3},
            "storage": {"endpoint_url": "http://127.0.0.1:1"},
        }
    )
    assert spec.generator.n_images == 3 and spec.storage.endpoint_url == "http://127.0.0.1:1"


def test_missing_path_and_empty_folder_fail_fast(tmp_path):
    missing = str(tmp_path / "nope")
    for kind in ("images", "videos", "parquet", "webdataset"):
        with pytest.raises(MissingInputError, match=f"{missing}: no such file or directory"):
            list_refs(parse_dataset_spec({"type": kind, "uri": missing}))
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(MissingInputError, match=r"no files with extensions"):
        list_refs(parse_dataset_spec({"type": "images", "uri": str(tmp_path)}))
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"x")  # `--data FOLDER` reads images: a folder of clips said only this
    with pytest.raises(
        MissingInputError, match=r"no files with extensions .* It holds 1 video \(a.mp4\): .*type: videos"
    ):
        list_refs(parse_dataset_spec({"type": "images", "uri": str(tmp_path / "clips")}))
    with pytest.raises(MissingInputError, match=r"no \*\.tar shards"):
        list_refs(parse_dataset_spec({"type": "webdataset", "uri": str(tmp_path)}))
    with pytest.raises(ValueError, match="is a file, not a folder.*items"):
        list_refs(parse_dataset_spec({"type": "images", "uri": str(tmp_path / "only.txt")}))


def test_with_resolved_storage_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5")
    spec = sources.with_resolved_storage(parse_dataset_spec({"type": "images", "uri": "rel/dir"}))
    assert spec.uri == str(tmp_path / "rel/dir") and spec.storage.endpoint_url == "http://127.0.0.1:5"


def test_synthetic_source_generates_once_and_lists(tmp_path):
    spec = parse_dataset_spec(
        {"type": "synthetic", "uri": str(tmp_path / "syn"), "generator": {"name": "shapes", "n_images": 6, "seed": 1}}
    )
    refs = list_refs(spec)
    assert [r.sample_id for r in refs] == [f"images/{i:06d}.png" for i in range(6)]
    assert list_refs(spec) == refs
    samples = _load_all(spec)
    assert all(isinstance(s, Sample) and s.image.shape == (64, 64, 3) for s in samples)
    assert SampleRef(str(tmp_path / "syn/images/000000.png"), "images/000000.png", refs[0].label) == refs[0]
