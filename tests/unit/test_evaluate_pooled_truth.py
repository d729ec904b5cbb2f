"""Image- and track-level ground truth on hand-built stores whose answer is known: pooling, complete images only,
object tracks of a clip."""

import json

import numpy as np
import pyarrow as pa
import pytest

from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate.ground_truth import auroc, token_factors
from prisma_ray.evaluate.pooled_truth import (
    image_index,
    patch_tokens_per_sample,
    pool,
    pooled_columns,
    pooled_labels,
)
from prisma_ray.models.spec import TokenKind, TokenLayout

IMAGE = TokenLayout(prefix=(TokenKind.CLS,), grid=(2, 2))  # 5 tokens: CLS, then cells (0,0) (0,1) (1,0) (1,1)
# per image: its objects (id, shape, colour) and the object dominating each of its 4 cells (0: background)
SCENES = {
    "i0": ([(1, "star", "red")], [1, 1, 0, 0]),
    "i1": ([(1, "star", "blue"), (2, "circle", "red")], [1, 0, 2, 0]),
    "i2": ([(1, "circle", "blue")], [1, 1, 1, 0]),
    "i3": ([(1, "square", "red"), (2, "circle", "blue")], [0, 1, 2, 0]),
    "i4": ([(1, "square", "blue")], [1, 0, 0, 0]),
}


def image_tables() -> tuple[pa.Table, pa.Table, pa.Table]:
    """`(keys, patches, objects)` of the images of `SCENES`, every token of each stored in order."""
    ids = list(SCENES)
    keys = pa.table(
        {
            "sample_id": [s for s in ids for _ in range(5)],
            "token": pa.array(list(range(5)) * len(ids), pa.int16()),
            "frame": pa.array([-1] * 5 * len(ids), pa.int16()),
        }
    )
    shapes = {s: {o: shape for o, shape, _ in objs} for s, (objs, _) in SCENES.items()}
    cells = [(s, c, o) for s, (_, owners) in SCENES.items() for c, o in enumerate(owners)]
    patches = pa.table(
        {
            "sample_id": [s for s, _, _ in cells],
            "frame": [-1] * len(cells),
            "patch_row": [c // 2 for _, c, _ in cells],
            "patch_col": [c % 2 for _, c, _ in cells],
            "object": [o for _, _, o in cells],
            "coverage": [0.9 if o else 0.0 for _, _, o in cells],
            "shape": [shapes[s][o] if o else None for s, _, o in cells],
        }
    )
    rows = [(s, o, shape, colour) for s, (objs, _) in SCENES.items() for o, shape, colour in objs]
    objects = pa.table(
        {
            "sample_id": [r[0] for r in rows],
            "frame": pa.array([-1] * len(rows), pa.int16()),
            "object": pa.array([r[1] for r in rows], pa.int16()),
            "shape": [r[2] for r in rows],
            "colour": [r[3] for r in rows],
            "area": [50] * len(rows),
        }
    )
    return keys, patches, objects


def test_a_latent_on_one_patch_of_each_star_image_detects_stars_per_image_though_not_per_patch():
    keys, patches, objects = image_tables()
    latents = np.zeros((keys.num_rows, 3), np.float32)
    # latent 0: on the background cell (1, 1) (token 4) of every image holding a star
    latents[[4, 9], 0] = 1.0
    # latent 1: once per object, on one of its cells (sum-pooled: the count)
    for i, (objs, owners) in enumerate(SCENES.values()):
        for o, _, _ in objs:
            latents[5 * i + 1 + owners.index(o), 1] = 1.0
    # latent 2: on every patch of every image (never tells one image from another)
    latents[:, 2] = 0.5

    labels = token_factors(keys, IMAGE, patches, objects, (2, 2), ["shape"])
    patch, values = labels.patch, labels.values
    star = np.array([v == "star" for v in values["shape"][patch]])
    assert auroc(latents[patch][:, :1], star[:, None])[0, 0] < 0.5, "per patch it fires off the stars"

    labels = pooled_labels(keys, IMAGE, 4, patches, objects, (2, 2))
    row = pooled_columns(latents, labels, threshold=0.95)
    detail = json.loads(row["gt_image_detail"])
    assert row["gt_image_units"] == 5 and "gt_track_units" not in row, "shapes have no tracks"
    assert detail["has_shape=star"] == {"auroc": 1.0, "latent": 0}
    assert detail["count=2"] == {"auroc": 1.0, "latent": 1}, "summed: the count of objects"
    assert set(detail) == {
        *(f"has_shape={s}" for s in ("circle", "square", "star")),
        *(f"has_colour={c}" for c in ("blue", "red")),
        "count=1",
        "count=2",
    }
    assert row["gt_image_values"] == len(detail) == 7
    aucs = [v["auroc"] for v in detail.values()]
    assert row["gt_image_mean_best_auroc"] == pytest.approx(np.mean(aucs))
    assert row["gt_image_fraction_detected"] == pytest.approx(np.mean([a >= 0.95 for a in aucs]))


def test_only_images_with_all_their_patch_tokens_among_the_scored_rows_count():
    keys, patches, objects = image_tables()
    cut = keys.slice(0, 5 * 3 + 2)  # images i0, i1, i2 and CLS + one patch of i3
    index, images = image_index(cut, IMAGE, 4)
    assert images == [("i0", -1), ("i1", -1), ("i2", -1)]
    assert index.tolist() == [-1, 0, 0, 0, 0, -1, 1, 1, 1, 1, -1, 2, 2, 2, 2, -1, -1]
    latents = np.zeros((cut.num_rows, 1), np.float32)
    latents[[4, 9], 0] = 1.0  # stars in i0 and i1, none in i2: detected on the complete images
    row = pooled_columns(latents, pooled_labels(cut, IMAGE, 4, patches, objects, (2, 2)))
    assert row["gt_image_units"] == 3 and json.loads(row["gt_image_detail"])["has_shape=star"]["auroc"] == 1.0
    with pytest.raises(InvalidRequest, match="2 rows of latents but labels of 17 rows"):
        pooled_columns(latents[:2], pooled_labels(cut, IMAGE, 4, patches, objects, (2, 2)))


def test_patch_tokens_per_sample_follow_the_token_selection():
    assert patch_tokens_per_sample(IMAGE, {"mode": "all"}) == 4
    assert patch_tokens_per_sample(IMAGE, {"mode": "patches"}) == 4
    assert patch_tokens_per_sample(IMAGE, {"mode": "cls"}) == 0
    assert patch_tokens_per_sample(IMAGE, {"mode": "random", "k": 3, "seed": 0}) == 3


def test_pool_max_and_sum_per_unit():
    latents = np.array([[1.0, 0.0], [3.0, 2.0], [9.0, 9.0], [0.0, 5.0]])
    index = np.array([0, 0, -1, 1])
    assert pool(latents, index, "max").tolist() == [[3.0, 2.0], [0.0, 5.0]]
    assert pool(latents, index, "sum").tolist() == [[4.0, 2.0], [0.0, 5.0]]
    with pytest.raises(InvalidRequest, match="every unit"):
        pool(latents, np.array([0, 0, 2, 2]), "max")


def test_token_factors_give_the_object_itself():
    keys, patches, objects = image_tables()
    labels = token_factors(keys.slice(0, 5), IMAGE, patches, objects, (2, 2), ["object"])
    assert labels.values["object"].tolist() == [None, 1, 1, 0, 0] and labels.coverage[1] == pytest.approx(0.9)


def clip_tables() -> tuple[pa.Table, pa.Table, pa.Table, TokenLayout]:
    """Two clips of 2 frames, 2 cells each (tokens t0c0, t0c1, t1c0, t1c1; no prefix). Clip c0: object 1 moving in
    direction 0 over cell 0, object 2 in direction 2 over cell 1. Clip c1: object 1 in direction 2 over cell 0
    (covering too little of it at frame 1), object 2 in direction 0 over cell 1 from frame 1."""
    layout = TokenLayout(prefix=(), grid=(1, 2), time=2, tubelet=1)
    keys = pa.table(
        {
            "sample_id": ["c0"] * 4 + ["c1"] * 4,
            "token": pa.array([0, 1, 2, 3] * 2, pa.int16()),
            "frame": pa.array([0, 0, 1, 1] * 2, pa.int16()),
        }
    )
    cells = [  # sample, frame, col, object, coverage
        ("c0", 0, 0, 1, 0.8),
        ("c0", 0, 1, 2, 0.8),
        ("c0", 1, 0, 1, 0.8),
        ("c0", 1, 1, 2, 0.8),
        ("c1", 0, 0, 1, 0.8),
        ("c1", 0, 1, 0, 0.0),
        ("c1", 1, 0, 1, 0.3),
        ("c1", 1, 1, 2, 0.8),
    ]
    patches = pa.table(
        {
            "sample_id": [c[0] for c in cells],
            "frame": [c[1] for c in cells],
            "patch_row": [0] * len(cells),
            "patch_col": [c[2] for c in cells],
            "object": [c[3] for c in cells],
            "coverage": [c[4] for c in cells],
        }
    )
    tracks = [("c0", 1, 0, "star"), ("c0", 2, 2, "circle"), ("c1", 1, 2, "star"), ("c1", 2, 0, "square")]
    rows = [(s, f, o, d, shape) for s, o, d, shape in tracks for f in (0, 1)]
    objects = pa.table(
        {
            "sample_id": [r[0] for r in rows],
            "frame": pa.array([r[1] for r in rows], pa.int16()),
            "object": pa.array([r[2] for r in rows], pa.int16()),
            "shape": [r[4] for r in rows],
            "colour": ["red"] * len(rows),
            "area": [0 if (r[0], r[2], r[1]) == ("c1", 2, 0) else 40 for r in rows],  # c1's object 2 appears at 1
            "direction": pa.array([r[3] for r in rows], pa.int8()),
        }
    )
    return keys, patches, objects, layout


def test_a_direction_latent_is_scored_per_object_track_across_frames():
    keys, patches, objects, layout = clip_tables()
    latents = np.zeros((keys.num_rows, 2), np.float32)
    latents[[0, 7], 0] = 1.0  # direction 0: c0's object 1 at frame 0, c1's object 2 at frame 1
    latents[6, 1] = 5.0  # c1's object 1 at frame 1, where it covers too little of its cell: not its track
    labels = pooled_labels(keys, layout, 4, patches, objects, (1, 2))
    assert labels.track.tolist() == [0, 1, 0, 1, 2, -1, -1, 3]
    assert labels.track_factors["direction"] == [frozenset([0]), frozenset([2]), frozenset([2]), frozenset([0])]
    row = pooled_columns(latents, labels)
    detail = json.loads(row["gt_track_detail"])
    assert row["gt_track_units"] == 4 and row["gt_track_values"] == 2
    assert detail == {"direction=0": {"auroc": 1.0, "latent": 0}, "direction=2": {"auroc": 0.5, "latent": -1}}
    assert row["gt_track_fraction_detected"] == 0.5
    # a clip is one image of the video model; objects count where visible
    assert labels.image_factors["has_shape"] == [frozenset(["star", "circle"]), frozenset(["star", "square"])]
    assert labels.image_factors["count"] == [frozenset([2]), frozenset([2])]
    # only the frames the model read count: c1's object 2 is not visible in frame 0
    only_first = {"c0": np.array([0, 0]), "c1": np.array([0, 0])}
    seen = pooled_labels(keys, layout, 4, patches, objects, (1, 2), frames=only_first).image_factors
    assert seen["has_shape"][1] == frozenset(["star"]) and seen["count"][1] == frozenset([1])


def test_an_image_model_reading_a_clip_frame_by_frame_scores_each_frame_as_an_image():
    keys, patches, objects, _ = clip_tables()
    layout = TokenLayout(prefix=(TokenKind.CLS,), grid=(1, 2))
    frame_keys = pa.table(  # clip c1 read frame by frame: CLS + 2 patches of clip frames 0 and 1
        {
            "sample_id": ["c1"] * 6,
            "token": pa.array([0, 1, 2] * 2, pa.int16()),
            "frame": pa.array([0, 0, 0, 1, 1, 1], pa.int16()),
        }
    )
    labels = pooled_labels(frame_keys, layout, 2, patches, objects, (1, 2))
    assert labels.image.tolist() == [-1, 0, 0, -1, 1, 1]
    assert labels.image_factors["has_shape"] == [frozenset(["star"]), frozenset(["star", "square"])]
    assert labels.image_factors["count"] == [frozenset([1]), frozenset([2])]
    assert labels.track.tolist() == [-1, 0, -1, -1, -1, 1], "tracks across frames; too little coverage left out"
