"""Activation store: dtype encoding, statistics merging, atomic shards, config claims."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prisma_ray import store


@pytest.mark.parametrize("dtype,tol", [("float32", 0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_act_roundtrip(dtype, tol):
    acts = np.random.default_rng(0).normal(size=(50, 24)).astype(np.float32) * 3
    back = store.decode_acts(store.encode_acts(acts, dtype), dtype)
    assert back.shape == acts.shape
    np.testing.assert_allclose(back, acts, rtol=tol, atol=tol)


def test_bfloat16_matches_torch_rounding():
    acts = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    ours = store.decode_acts(store.encode_acts(acts, "bfloat16"), "bfloat16")
    theirs = torch.from_numpy(acts).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_running_stats_merge_equals_one_pass():
    x = np.random.default_rng(2).normal(loc=5, size=(101, 6))
    parts = [store.RunningStats.of(x[:10]), store.RunningStats.of(x[10:70]), store.RunningStats.of(x[70:])]
    merged = store.RunningStats.empty(6)
    for part in parts:
        merged = merged.merge(part)
    np.testing.assert_allclose(merged.mean, x.mean(0))
    np.testing.assert_allclose(merged.var, x.var(0, ddof=1))
    assert merged.count == 101
    assert merged.mean_norm == pytest.approx(np.linalg.norm(x, axis=1).mean())


def _table(n_tokens: int, d: int, dtype="float16"):
    acts = np.random.default_rng(3).normal(size=(n_tokens, d)).astype(np.float32)
    ids = [f"img-{i // 4}" for i in range(n_tokens)]
    token = np.arange(n_tokens) % 4
    return store.token_table(ids, token, np.full(n_tokens, -1), np.full(n_tokens, 2), acts, dtype), acts


def test_writer_shards_are_atomic_and_resumable(tmp_path):
    writer = store.StoreWriter(str(tmp_path / "s"))
    table, acts = _table(40, 16)
    assert writer.completed() == set()
    writer.write_shard(3, table, store.RunningStats.of(acts))
    assert writer.completed() == {3}
    assert not [p for p in (tmp_path / "s").rglob(".tmp-*")], "no temporary files left behind"
    back = pq.read_table(tmp_path / "s" / "part-00003.parquet")
    assert back.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    np.testing.assert_allclose(store.read_acts(str(tmp_path / "s")), acts, atol=2e-3)
    stats = writer.merged_stats({3}, 16)
    np.testing.assert_allclose(stats.mean, acts.mean(0), rtol=1e-6, atol=1e-7)


def test_changed_config_is_refused(tmp_path):
    writer = store.StoreWriter(str(tmp_path / "s"))
    writer.claim("abc", {"model": "m"})
    writer.claim("abc", {"model": "m"})
    with pytest.raises(store.StoreConfigMismatch, match="different config"):
        writer.claim("def", {"model": "m"})


def test_sixteen_bit_store_costs_about_two_bytes_per_value(tmp_path):
    d = 384
    table, acts = _table(2000, d)
    nbytes = store.StoreWriter(str(tmp_path / "s")).write_shard(0, table, store.RunningStats.of(acts))
    assert nbytes / acts.size <= 2.1


def test_a_shard_written_twice_is_stored_once(tmp_path):
    """A shard retried after its first attempt wrote it (its node lost before the result came back), beside the
    half-written temporary of an attempt killed mid-write: one shard, its rows once, its statistics once."""
    writer = store.StoreWriter(str(tmp_path / "s"))
    table, acts = _table(40, 16)
    writer.write_shard(5, table, store.RunningStats.of(acts))
    (tmp_path / "s" / ".tmp-0123abcd-part-00005.parquet").write_bytes(b"PAR1 half a shard")
    writer.write_shard(5, table, store.RunningStats.of(acts))
    assert writer.completed() == {5} and writer.remove_temporaries() == 1
    assert sorted(p.name for p in (tmp_path / "s").rglob("*") if p.is_file()) == [
        "part-00005.json",
        "part-00005.parquet",
    ]
    assert store.read_table(str(tmp_path / "s")).equals(pq.read_table(tmp_path / "s" / "part-00005.parquet"))
    assert len(store.read_acts(str(tmp_path / "s"))) == 40
    assert writer.merged_stats({5}, 16).count == 40


def test_a_folder_above_stores_or_an_unfinished_store_is_named_as_such(tmp_path):
    """`data.inputs: [acts/<model>/<hook>]` (the split left off) said `manifest.json: no such file or directory.
    ... write the data there first`, though the stores were there."""
    from prisma_ray.storage import MissingInputError

    hook = tmp_path / "acts" / "toy" / "blocks.1.hook_resid_post"
    for split in ("train", "test"):
        (hook / split).mkdir(parents=True)
        (hook / split / "manifest.json").write_text("{}")
    with pytest.raises(MissingInputError, match=r"is not an activation store but a folder above 2: test, train \("):
        store.read_manifest(str(hook))
    with pytest.raises(MissingInputError, match="above 2: toy/blocks.1.hook_resid_post/test, toy/blocks.1"):
        store.read_manifest(str(tmp_path / "acts"))
    table, acts = _table(8, 4)
    store.StoreWriter(str(tmp_path / "killed")).write_shard(0, table, store.RunningStats.of(acts))
    with pytest.raises(MissingInputError, match="extraction has not finished .* rerun the same `prisma-ray extract`"):
        store.read_manifest(str(tmp_path / "killed"))
    with pytest.raises(MissingInputError, match=r"nowhere/manifest.json: no such file or directory"):
        store.read_manifest(str(tmp_path / "nowhere"))
