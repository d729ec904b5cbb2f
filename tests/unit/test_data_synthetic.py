import io
import math
import os

import av
import numpy as np
import pytest
from PIL import Image

from prisma_ray import storage
from prisma_ray.data import synthetic as syn
from prisma_ray.data.decode import FrameSampling, decode_image, decode_video

SHAPES = syn.ShapesConfig(n_images=40, seed=3, n_objects=(1, 4))
MOVING = syn.MovingShapesConfig(
    n_clips=12, seed=5, num_frames=12, size_range=(0.12, 0.2), n_directions=8, colour_change_prob=0.5, appear_prob=0.5
)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("shapes"))
    syn.generate(SHAPES, uri)
    return uri


@pytest.fixture(scope="module")
def moving_dir(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("moving"))
    syn.generate(MOVING, uri)
    return uri


def _files(root: str) -> dict[str, bytes]:
    return {rel: storage.read_bytes(storage.join(root, rel)) for rel in storage.list_files(root)}


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return cols.mean(), rows.mean()


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        inner = mask.copy()
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        mask = inner
    return mask


def test_render_is_deterministic_and_seeded():
    a, b = syn.render_shapes(SHAPES, 7), syn.render_shapes(SHAPES, 7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    other = syn.render_shapes(SHAPES.model_copy(update={"seed": 4}), 7)
    assert not np.array_equal(a[0], other[0])
    bigger = syn.render_shapes(SHAPES.model_copy(update={"n_images": 5000}), 7)
    np.testing.assert_array_equal(a[0], bigger[0])  # sample i does not depend on the dataset size


def test_generate_writes_identical_files_for_the_same_seed(shapes_dir, moving_dir, tmp_path):
    again = str(tmp_path / "again")
    syn.generate(SHAPES, again)
    assert _files(again) == _files(shapes_dir)
    again_moving = str(tmp_path / "again_moving")
    syn.generate(MOVING, again_moving)
    first, second = _files(moving_dir), _files(again_moving)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first if k.endswith(".npz"))
    # The frames given to the encoder are identical; libx264's bytes are not reproducible on every CPU even
    # with one thread (seen here: 2 of 12 clips, a few bytes apart), so the clips are compared decoded.
    for i in range(MOVING.n_clips):
        assert np.array_equal(syn.render_moving_shapes(MOVING, i)[0], syn.render_moving_shapes(MOVING, i)[0])
    for name in (k for k in first if k.endswith(".mp4")):
        a, b = _decoded(first[name]), _decoded(second[name])
        assert a.shape == b.shape and np.abs(a.astype(np.int16) - b).mean() < 1.0, name


def _decoded(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_layout_and_tables(shapes_dir):
    files = storage.list_files(shapes_dir)
    assert sum(f.startswith("images/") for f in files) == SHAPES.n_images
    assert sum(f.startswith("masks/") for f in files) == SHAPES.n_images
    assert {"manifest.json", "samples.parquet", "objects.parquet", "patches.parquet"} <= set(files)
    samples = syn.read_table(shapes_dir, "samples").to_pylist()
    assert [s["sample_id"] for s in samples] == [f"images/{i:06d}.png" for i in range(SHAPES.n_images)]
    patches = syn.read_table(shapes_dir, "patches")
    gh, gw = SHAPES.patch_grid
    assert patches.num_rows == SHAPES.n_images * gh * gw
    counts = [s["count"] for s in samples]
    assert min(counts) >= 1 and max(counts) > 1
    assert {s["background"] for s in samples} == set(syn.BACKGROUNDS)


def test_shapes_factors_agree_with_decoded_pixels(shapes_dir):
    samples = {s["sample_id"]: s for s in syn.read_table(shapes_dir, "samples").to_pylist()}
    objects = syn.read_table(shapes_dir, "objects").to_pylist()
    patches = syn.read_table(shapes_dir, "patches").to_pylist()
    seen_shapes = set()
    for sid, s in samples.items():
        image = decode_image(storage.read_bytes(storage.join(shapes_dir, s["path"])))
        mask = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(shapes_dir, s["mask_path"])))))
        objs = [o for o in objects if o["sample_id"] == sid]
        assert len(objs) == s["count"] == len(np.unique(mask)) - 1
        largest = max(objs, key=lambda o: o["radius"])  # the label: the largest object's shape
        assert s["label"] == SHAPES.shapes.index(largest["shape"])
        background = image[mask == 0]
        assert np.all(background[:, 0] == background[:, 1]) and np.all(background[:, 1] == background[:, 2])
        for o in objs:
            inside = mask == o["object"]
            assert inside.sum() == o["area"] > 0
            assert np.all(image[inside] == (o["r"], o["g"], o["b"]))
            assert syn.COLOURS[o["colour"]] == (o["r"], o["g"], o["b"])
            cx, cy = _centroid(inside)
            assert math.hypot(cx - o["x"], cy - o["y"]) < 1.0, (sid, o)
            seen_shapes.add(o["shape"])
        expected_obj, expected_cov = syn.patch_factors(mask, SHAPES.patch_grid)
        rows = [p for p in patches if p["sample_id"] == sid]
        for p in rows:
            assert p["object"] == expected_obj[p["patch_row"], p["patch_col"]]
            assert p["coverage"] == pytest.approx(float(expected_cov[p["patch_row"], p["patch_col"]]))
            if p["object"]:
                assert p["shape"] == next(o["shape"] for o in objs if o["object"] == p["object"])
    assert seen_shapes == set(syn.SHAPES)


def test_patch_factors_hand_example():
    mask = np.zeros((4, 6), np.uint8)
    mask[0:2, 0:3] = 1  # fills the top-left patch of a 2x2 grid
    mask[2:4, 3:4] = 2  # one third of the bottom-right patch
    mask[3, 5] = 1
    obj, cov = syn.patch_factors(mask, (2, 2))
    np.testing.assert_array_equal(obj, [[1, 0], [0, 2]])
    np.testing.assert_allclose(cov, [[1.0, 0.0], [0.0, 2 / 6]])


def test_moving_shapes_factors_agree_with_decoded_video(moving_dir):
    samples = syn.read_table(moving_dir, "samples").to_pylist()
    objects = syn.read_table(moving_dir, "objects").to_pylist()
    palette = np.array(list(syn.COLOURS.values()))
    events = {"colour_change": 0, "appear": 0}
    for s in samples:
        data = storage.read_bytes(storage.join(moving_dir, s["path"]))
        video = decode_video(data, FrameSampling(num_frames=MOVING.num_frames, anchor="start"))
        masks = np.load(io.BytesIO(storage.read_bytes(storage.join(moving_dir, s["mask_path"]))))["mask"]
        assert video.frames.shape == (MOVING.num_frames, 64, 64, 3) and masks.shape == (MOVING.num_frames, 64, 64)
        rows = [o for o in objects if o["sample_id"] == s["sample_id"]]
        for obj_id in {o["object"] for o in rows}:
            track = sorted((o for o in rows if o["object"] == obj_id), key=lambda o: o["frame"])
            events["colour_change"] += track[0]["colour_change_frame"] >= 0
            events["appear"] += track[0]["appear_frame"] > 0
            centres = []
            for o in track:
                inside = masks[o["frame"]] == obj_id
                if not o["visible"]:
                    assert not inside.any()
                    continue
                cx, cy = _centroid(inside)
                assert math.hypot(cx - o["x"], cy - o["y"]) < 1.0
                centres.append((cx, cy))
                core = _erode(inside, 2)
                mean = video.frames[o["frame"]][core].mean(axis=0)
                assert np.abs(mean - (o["r"], o["g"], o["b"])).max() < 40, (s["sample_id"], o, mean)
                nearest = list(syn.COLOURS)[int(np.argmin(np.abs(palette - mean).sum(axis=1)))]
                assert nearest == o["colour"]
            (x0, y0), (x1, y1) = centres[0], centres[-1]
            angle = math.degrees(math.atan2(-(y1 - y0), x1 - x0)) % 360
            estimated = round(angle / (360 / MOVING.n_directions)) % MOVING.n_directions
            assert estimated == track[0]["direction"], (s["sample_id"], obj_id, angle)
        first = [o for o in rows if o["frame"] == 0]
        assert s["label"] == max(first, key=lambda o: o["radius"])["direction"]  # the largest object's direction
    assert events["colour_change"] > 0 and events["appear"] > 0


def test_ensure_generated_reuses_and_refuses_other_config(shapes_dir):
    manifest_path = os.path.join(shapes_dir, "manifest.json")
    before = os.stat(manifest_path).st_mtime_ns
    assert syn.ensure_generated(SHAPES, shapes_dir)["num_samples"] == SHAPES.n_images
    assert os.stat(manifest_path).st_mtime_ns == before
    # The message named the whole old config (a dozen keys); it names what changed.
    with pytest.raises(ValueError, match=rf"another config \(seed {SHAPES.seed} there, 99 now\); use another uri"):
        syn.ensure_generated(SHAPES.model_copy(update={"seed": 99}), shapes_dir)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (syn.ShapesConfig, {"shapes": ("circle", "blob")}, "subset"),
        (syn.ShapesConfig, {"n_objects": (3, 1)}, "n_objects"),
        (syn.ShapesConfig, {"size_range": (0.1, 0.6)}, "size_range"),
        (syn.ShapesConfig, {"patch_grid": (0, 4)}, "patch_grid"),
        (syn.MovingShapesConfig, {"image_size": 65}, "even"),
    ],
)
def test_config_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_large_fast_objects_at_the_speed_limit_are_placed_not_refused():
    """The speed limit leaves a start range exactly zero wide; rounding once made it negative (`high - low < 0`)."""
    cfg = syn.MovingShapesConfig(n_clips=1, image_size=32, size_range=(0.2, 0.3), speed_range=(2.0, 2.0))
    for index in range(40):
        syn.render_moving_shapes(cfg, index)
    for travel in (-7.5, 0.0, 13.25, 40.0):
        low, high = syn.start_range(5.0, 32, travel)
        assert low <= high
