"""Stability across seeds: Hungarian matching of decoder rows, siblings that differ only in seed, the sweep's
columns, and the checkpoint metadata that groups them."""

import numpy as np
import pyarrow as pa
import pytest

from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate.stability import matched_fraction, seed_siblings, stability_columns
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
