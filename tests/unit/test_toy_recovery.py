"""Patch labels of the toy-model recovery check: positives, negatives and ambiguous edge patches."""

import numpy as np

from prisma_ray.models.spec import TokenKind, TokenLayout
from prisma_ray.models.toy_recovery import patch_labels


def test_ambiguous_edge_patches_are_left_out_and_background_is_a_negative():
    layout = TokenLayout(prefix=(TokenKind.CLS,), grid=(2, 2))
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, :4, :4] = 1  # object 1 fills cell (0, 0)
    mask[0, :1, 4:8] = 2  # object 2 covers a quarter of cell (0, 1): ambiguous
    mask[0, 4:7, 4:8] = 1  # object 1 covers 3/4 of cell (1, 1): labelled
    objects = [[{"object": 1, "shape": "star", "colour": "red"}, {"object": 2, "shape": "cross", "colour": "blue"}]]
    kept, values = patch_labels(mask, objects, layout, ["shape", "colour"])
    assert kept.tolist() == [True, False, True, True]
    assert values["shape"].tolist() == ["star", "cross", None, "star"]
    assert values["colour"][kept].tolist() == ["red", None, "red"]


def test_a_video_token_takes_its_first_frames_objects():
    layout = TokenLayout(prefix=(), grid=(1, 1), time=2, tubelet=2)
    mask = np.zeros((1, 4, 4, 4), np.uint8)
    mask[0, 2:] = 1  # the object fills frames 2 and 3 only
    rows = [{"frame": f, "object": 1, "colour": c, "direction": 5} for f, c in enumerate("aabb")]
    kept, values = patch_labels(mask, [rows], layout, ["colour", "direction"])
    assert kept.tolist() == [True, True]
    assert values["colour"].tolist() == [None, "b"] and values["direction"].tolist() == [None, "5"]
