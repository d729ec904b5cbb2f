"""The top-activations accumulator: exact merging across shards, deterministic ties, statistics, reservoir."""

import numpy as np
import pytest

from prisma_ray.interpret.topk import LatentRecord

KINDS = np.array([0, 2, 2, 2, 2])


def batch(seed: int, n: int, latents: int = 12, tokens: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    acts = np.maximum(rng.normal(size=(n, tokens, latents)), 0).astype(np.float32)
    acts[:, :, 0] = np.round(acts[:, :, 0])  # coarse values: many ties on latent 0
    ids = np.array([f"s{seed:02d}-{i:03d}" for i in range(n)])
    return ids, acts


def run(batches, k=4, m=8) -> LatentRecord:
    record = LatentRecord.empty(12, 5, k=k, reservoir=m, negatives=4, seed=3)
    for ids, acts in batches:
        record = record.update(ids, acts, KINDS)
    return record


def assert_same(a: LatentRecord, b: LatentRecord) -> None:
    for r in ("max", "mean"):
        np.testing.assert_array_equal(a.top[r].scores, b.top[r].scores)
        np.testing.assert_array_equal(a.top[r].ids, b.top[r].ids)
        np.testing.assert_array_equal(a.top[r].maps, b.top[r].maps)
    np.testing.assert_array_equal(a.reservoir.ids, b.reservoir.ids)
    np.testing.assert_array_equal(a.reservoir.values, b.reservoir.values)
    np.testing.assert_array_equal(a.negatives.ids, b.negatives.ids)
    assert (a.n_samples, a.n_tokens) == (b.n_samples, b.n_tokens)
    np.testing.assert_array_equal(a.fire_tokens, b.fire_tokens)
    np.testing.assert_array_equal(a.fire_by_kind, b.fire_by_kind)
    np.testing.assert_allclose(a.act_sum, b.act_sum, rtol=1e-12)


def test_top_k_of_merged_shards_equals_one_pass():
    batches = [batch(s, n) for s, n in enumerate([7, 3, 11, 5, 9])]
    one = run(batches)
    shards = [run(batches[:2]), run(batches[2:3]), run(batches[3:])]
    merged = shards[2].merge(shards[0]).merge(shards[1])
    assert_same(one, merged)
    assert_same(one, run(batches[::-1]))
    assert_same(one, LatentRecord.from_bytes(one.to_bytes()))


def test_top_k_is_exact_with_ties_broken_by_sample_id():
    batches = [batch(s, n) for s, n in enumerate([7, 3, 11, 5, 9])]
    record = run(batches)
    ids = np.concatenate([b[0] for b in batches])
    acts = np.concatenate([b[1] for b in batches])
    for latent in range(12):
        peak = acts[:, :, latent].max(1)
        expected = sorted((-float(p), str(i)) for p, i in zip(peak, ids) if p > 0)[:4]
        assert [str(i) for i in record.top["max"].ids[latent]] == [i for _, i in expected]
        row = record.top["max"].ids[latent].tolist().index(expected[0][1])
        np.testing.assert_array_equal(
            record.top["max"].maps[latent, row], acts[list(ids).index(expected[0][1]), :, latent].astype(np.float16)
        )
    assert (record.top["max"].scores[0] == record.top["max"].scores[0, 0]).all(), "latent 0 has ties at the top"


def test_statistics_and_reservoir():
    ids, acts = batch(0, 40)
    record = run([(ids, acts)], m=8)
    assert record.n_samples == 40 and record.n_tokens == 200
    np.testing.assert_array_equal(record.fire_tokens, (acts > 0).sum((0, 1)))
    np.testing.assert_array_equal(record.fire_by_kind[:, 0], (acts[:, 0] > 0).sum(0))
    np.testing.assert_array_equal(record.fire_by_kind.sum(1), record.fire_tokens)
    np.testing.assert_allclose(record.act_sum, acts.sum((0, 1)), rtol=1e-6)
    firing = (acts.max(1) > 0).sum(0)
    assert (record.reservoir.filled().sum(1) == np.minimum(firing, 8)).all()
    for latent in range(12):
        for sid, value in zip(record.reservoir.ids[latent], record.reservoir.values[latent]):
            if sid:
                assert value == acts[list(ids).index(sid), :, latent].max() > 0
    silent = (acts.max(1) <= 0).sum(0)
    assert (record.negatives.filled().sum(1) == np.minimum(silent, 4)).all()
    for latent in range(12):
        for sid in record.negatives.ids[latent][record.negatives.filled()[latent]]:
            assert acts[list(ids).index(sid), :, latent].max() <= 0


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        LatentRecord.empty(12, 5).update(np.array(["a"]), np.zeros((1, 6, 12)), np.zeros(6))
