"""Stability across seeds: Hungarian matching of decoder rows, siblings that differ only in seed, the sweep's
columns, and the checkpoint metadata that groups them."""

import numpy as np
import pyarrow as pa
import pytest
from scipy.optimize import linear_sum_assignment

from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate import stability
from prisma_ray.evaluate.stability import (
    coarse_cosines,
    matched_cosines,
    matched_fraction,
    seed_siblings,
    stability_columns,
    unit_rows,
)
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, read_checkpoint_info, write_files


def test_a_permuted_rescaled_copy_matches_fully_and_random_directions_barely():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 64))
    copy = w[rng.permutation(256)] * rng.uniform(0.5, 2.0, size=(256, 1))
    assert matched_fraction(w, copy) == pytest.approx((1.0, 1.0))
    fraction, cosine = matched_fraction(w, rng.normal(size=(256, 64)))
    assert fraction == 0.0 and 0.1 < cosine < 0.5, "random 64-d directions are far from each other"


def test_the_threshold_decides_which_pairs_count():
    a = np.eye(4)
    b = np.eye(4)
    b[1] = [0.6, 0.8, 0, 0]  # cosine 0.8 to its own row
    b[2] = [0, 0, 0.6, 0.8]  # cosine 0.6
    fraction, cosine = matched_fraction(a, b[[3, 0, 1, 2]])
    assert fraction == 0.75 and cosine == pytest.approx((1 + 0.8 + 0.6 + 1) / 4)
    assert matched_fraction(a, b, threshold=0.55)[0] == 1.0
    assert matched_fraction(a, b, threshold=0.9)[0] == 0.5
    with pytest.raises(InvalidRequest, match=r"one shape, got \[4, 4\] and \[3, 4\]"):
        matched_fraction(a, b[:3])


def hungarian(cosine: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    return cosine[rows, cols]


def near_copies(rng, latents: int = 96, width: int = 24, noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Two decoders trained a little from one initialisation: the same rows, each nudged."""
    init = rng.normal(size=(latents, width))
    return init + noise * rng.normal(size=init.shape), init + noise * rng.normal(size=init.shape)


def no_hungarian(*args, **kwargs):
    pytest.fail("rows whose best partners differ need no Hungarian matching")


def test_matched_cosines_equal_the_hungarians_on_random_near_identical_and_tied_inputs(monkeypatch):
    rng = np.random.default_rng(4)
    tied = rng.integers(0, 3, size=(40, 40)).astype(float)  # many equal entries, rows' argmax collide
    twins = np.repeat(unit_rows(rng.normal(size=(20, 8))), 2, axis=0)  # every row twice: ties across rows
    for cosine in (rng.normal(size=(60, 60)), tied, twins @ twins.T):
        assert np.array_equal(matched_cosines(cosine), hungarian(cosine))
    a, b = near_copies(rng)
    near = unit_rows(a) @ unit_rows(b[::-1]).T
    expected = hungarian(near)
    identity_tie = np.eye(5)  # each row's maximum alone in its column: taken without the Hungarian
    identity_tie[0, 1] = identity_tie[2, 3] = 0.5
    monkeypatch.setattr(stability, "linear_sum_assignment", no_hungarian)
    assert np.array_equal(matched_cosines(near), expected)
    assert np.array_equal(matched_cosines(identity_tie), np.ones(5))


def test_matched_fraction_of_two_copies_of_one_initialisation_skips_the_hungarian(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = near_copies(rng, width=64)
    away = rng.normal(size=(8, 64))  # a few rows trained far from their start, still nearest it: cosine 0.6
    away -= (away * unit_rows(a[:8])).sum(axis=1, keepdims=True) * unit_rows(a[:8])
    b[:8] = 0.6 * unit_rows(a[:8]) + 0.8 * unit_rows(away)
    b = b[rng.permutation(len(b))]
    exact = hungarian(unit_rows(a) @ unit_rows(b).T)
    expected = (float((exact >= 0.7).sum() / len(exact)), float(exact.mean()))
    assert expected[0] == 88 / 96
    with monkeypatch.context() as patched:
        patched.setattr(stability, "linear_sum_assignment", no_hungarian)
        assert matched_fraction(a, b) == pytest.approx(expected, abs=1e-12)
        coarse = coarse_cosines(a, b)  # float32, as the cross-model page has them: no float64 matrix either
        assert matched_fraction(a, b, coarse=coarse) == pytest.approx(expected, abs=1e-12)
    twins = np.repeat(a[:48], 2, axis=0)  # ties: the Hungarian decides, as before
    exact = hungarian(unit_rows(twins) @ unit_rows(b).T)
    expected = (float((exact >= 0.7).mean()), float(exact.mean()))
    assert matched_fraction(twins, b) == pytest.approx(expected)
    assert matched_fraction(twins, b, coarse=coarse_cosines(twins, b)) == pytest.approx(expected)


def test_siblings_share_a_group_and_differ_in_seed():
    groups = ["g", "g", "h", "g", None, "h", "g"]
    seeds = [0, 1, 0, 2, 0, 0, 0]
    assert seed_siblings(groups, seeds) == [[1, 3], [0, 3, 6], [], [0, 1, 6], [], [], [1, 3]]


def test_stability_columns_average_over_siblings_and_read_each_decoder_once():
    rng = np.random.default_rng(1)
    w = np.concatenate([rng.normal(size=(32, 8)), np.zeros((32, 8))], axis=1)
    orthogonal = w[:, ::-1].copy()  # in the other 8 dimensions: cosine 0 to every row of w
    decoders = {"a": w, "b": w[::-1].copy(), "c": orthogonal, "d": w}
    table = pa.table(
        {
            "checkpoint": ["a", "b", "c", "d"],
            "seed_group": ["g", "g", "g", None],
            "seed": [0, 1, 2, 0],
        }
    )
    read = []
    out = stability_columns(table, lambda uri: read.append(uri) or decoders[uri])
    assert sorted(read) == ["a", "b", "c"], "only grouped checkpoints, each once"
    stability = out.column("stability").to_pylist()
    assert stability[:3] == [0.5, 0.5, 0.0] and stability[3] is None
    assert out.column("stability_cosine").to_pylist() == pytest.approx([0.5, 0.5, 0.0, None])
    gone = stability_columns(table, lambda uri: None if uri == "c" else decoders[uri])
    assert gone.column("stability").to_pylist() == [1.0, 1.0, None, None], "an unreadable checkpoint is left out"
    assert stability_columns(table.drop_columns(["seed_group"]), decoders.get) == table.drop_columns(["seed_group"])


def save(root, seed: int, name: str, hook: str = "blocks.0.hook_resid_post", k: int = 4, tokens: int = 100) -> str:
    d = Dictionary(
        DictionaryConfig(architecture="topk", d_sae=16, k=k, seed=seed, name=name),
        Sites(inputs=(Site(name=hook, width=8, model="m"),)),
    )
    uri = str(root / name)
    write_files(export_files(d, tokens=tokens), uri)
    return uri


def test_checkpoints_differing_only_in_seed_and_name_share_a_seed_group(tmp_path):
    info = {
        name: read_checkpoint_info(uri)
        for name, uri in {
            "base": save(tmp_path, 0, "base"),
            "seed": save(tmp_path, 1, "seed"),
            "k": save(tmp_path, 1, "k", k=8),
            "hook": save(tmp_path, 1, "hook", hook="blocks.1.hook_resid_post"),
            "longer": save(tmp_path, 1, "longer", tokens=200),
        }.items()
    }
    assert (info["base"].seed, info["seed"].seed) == (0, 1)
    assert info["base"].seed_group == info["seed"].seed_group is not None
    others = {info[n].seed_group for n in ("k", "hook", "longer")}
    assert len(others) == 3 and info["base"].seed_group not in others
    assert info["base"].row()["seed_group"] == info["base"].seed_group and info["base"].row()["seed"] == 0
