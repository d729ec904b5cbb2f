"""`sae.fit`: dictionaries trained on an in-memory token tensor as the training job trains them on a store."""

import numpy as np
import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.sae import DictionaryConfig, Site, Sites, Trainer
from prisma_ray.sae.fit import fit_dictionaries, row_batches, token_stats
from prisma_ray.sae.trainer import Normalization
from prisma_ray.store import RunningStats

CONFIGS = [
    DictionaryConfig(architecture="topk", d_sae=32, k=4, lr=1e-3),
    DictionaryConfig(architecture="relu", d_sae=16),
]


def tokens(n: int = 300, d: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=gen) * torch.linspace(0.5, 3.0, d) + 2.0


def test_row_batches_are_a_seeded_permutation_per_epoch_and_run_across_epochs():
    gen = row_batches(10, 4, seed=3)
    rows = np.concatenate([next(gen) for _ in range(5)])  # 20 rows: two epochs exactly
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert list(rows[:10]) == list(np.random.default_rng([3, 0]).permutation(10))
    assert list(rows[10:]) == list(np.random.default_rng([3, 1]).permutation(10))
    assert list(next(row_batches(10, 4, seed=4))) != list(rows[:4])


def test_fit_is_the_training_jobs_loop_on_the_stores_statistics():
    x = tokens()
    fitted = fit_dictionaries(x, CONFIGS, epochs=2, batch_size=64, seed=1)
    # by hand: the store's statistics (RunningStats, as the manifest holds them), center_scale, the first batch
    # initialising b_dec, int(epochs * rows) // batch steps of the seeded row order
    stats = RunningStats.of(x.double().numpy())
    np.testing.assert_allclose(token_stats(x).var.numpy(), stats.var, rtol=1e-9)
    norm = Normalization.from_stats([token_stats(x)], None, "center_scale")
    trainer = Trainer(CONFIGS, Sites(inputs=(Site(name="h", width=8),)), 600 // 64, norm)
    batches = row_batches(len(x), 64, 1)
    first = next(batches)
    trainer.initialize(x[first])
    trainer.train_step(x[first])
    for _ in range(600 // 64 - 1):
        trainer.train_step(x[next(batches)])
    assert list(fitted) == list(trainer.dictionaries)
    for name, d in fitted.items():
        assert not d.training
        for (key, mine), theirs in zip(d.state_dict().items(), trainer.dictionaries[name].state_dict().values()):
            torch.testing.assert_close(mine, theirs, msg=key)
    torch.testing.assert_close(fitted["topk-k-4"].in_mean, x.mean(0))  # centred on the rows' mean


def test_fit_refuses_bad_requests_naming_the_input():
    with pytest.raises(InvalidRequest, match="exactly one of"):
        fit_dictionaries(tokens(), CONFIGS, epochs=1, steps=3)
    with pytest.raises(InvalidRequest, match="exactly one of"):
        fit_dictionaries(tokens(), CONFIGS)
    with pytest.raises(InvalidRequest, match="no batch"):
        fit_dictionaries(tokens(10), CONFIGS, epochs=1, batch_size=64)
    with pytest.raises(InvalidRequest, match="rows > 0"):
        fit_dictionaries(torch.zeros(0, 8), CONFIGS, steps=1)
