"""Train dictionaries on an in-memory token tensor the way `prisma-ray train` trains them on a store, without Ray.

For checks and benchmarks that hold their tokens in memory (`models.toy_recovery`, `benchmarks/`): the same
`Trainer`, the same normalisation (`center_scale` by default, from the statistics of every training row, as the
store's manifest gives them: `store.RunningStats`), the same data-dependent initialisation (the run's first batch)
and the same kind of row order (every epoch a seeded permutation of the rows, batches cut from the endless
sequence of epochs: `train.data.RowOrder`, here over one in-memory shard), the same number of steps for `epochs`
(`train.job.total_steps`). Several configs train together on the same batches, as one training run does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from prisma_ray.errors import InvalidRequest

from ..store import RunningStats
from .config import DictionaryConfig
from .dictionary import Dictionary, Site, Sites
from .trainer import Normalization, NormalizeMode, SiteStats, Trainer


def token_stats(tokens: torch.Tensor, chunk: int = 65536) -> SiteStats:
    """The statistics of the rows of `tokens` (`[N, d]`), accumulated in chunks of `chunk` rows in float64 (the
    store's `RunningStats`), as `train.data.plan_data` reads them from a store's manifest."""
    stats = RunningStats.empty(tokens.shape[1])
    for start in range(0, len(tokens), chunk):
        stats = stats.merge(RunningStats.of(tokens[start : start + chunk].detach().cpu().double().numpy()))
    return SiteStats(torch.from_numpy(stats.mean), torch.from_numpy(stats.var), stats.mean_norm)


def row_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless row indices into `n` rows, `batch_size` per batch: epoch `e` is the permutation
    `default_rng([seed, e])`, and a batch may run from one epoch into the next."""
    epoch, order, position = 0, np.random.default_rng([seed, 0]).permutation(n), 0
    while True:
        parts, need = [], batch_size
        while need:
            if position == n:
                epoch, position = epoch + 1, 0
                order = np.random.default_rng([seed, epoch]).permutation(n)
            take = order[position : position + need]
            parts.append(take)
            position, need = position + len(take), need - len(take)
        yield np.concatenate(parts)


def fit_dictionaries(
    tokens: torch.Tensor,
    configs: Sequence[DictionaryConfig],
    *,
    epochs: float | None = None,
    steps: int | None = None,
    batch_size: int = 1024,
    seed: int = 0,
    normalize: NormalizeMode = "center_scale",
    site: str = "h",
    model: str = "",
) -> dict[str, Dictionary]:
    """`{display name: dictionary in eval mode}`: every config of `configs` trained on the same batches of the rows
    of `tokens` (`float[N, d]`, on the CPU; any leading shape is flattened to rows) for `steps` steps, or
    `int(epochs * N) // batch_size` (the training job's count; give exactly one of the two).

    Inputs (and targets, the same rows) are normalised by `normalize` from the statistics of all of `tokens`
    (`token_stats`); `b_dec` is initialised from the first batch. `site` and `model` name the input site (a hook
    point and a model, as a checkpoint records them). Raises `InvalidRequest` for an empty tensor, neither or both
    of `epochs` and `steps`, or fewer than one step."""
    tokens = tokens.reshape(-1, tokens.shape[-1]).float() if tokens.ndim else tokens
    if tokens.ndim != 2 or not len(tokens):
        raise InvalidRequest(f"fit_dictionaries: tokens of shape {tuple(tokens.shape)}; give [rows, width], rows > 0")
    if (epochs is None) == (steps is None):
        raise InvalidRequest("fit_dictionaries: give exactly one of `epochs` and `steps`")
    total = steps if steps is not None else int(epochs * len(tokens)) // batch_size
    if total < 1:
        raise InvalidRequest(
            f"fit_dictionaries: {len(tokens)} rows x {epochs} epochs make no batch of {batch_size}; raise epochs or "
            "lower batch_size"
        )
    sites = Sites(inputs=(Site(name=site, width=tokens.shape[1], model=model),))
    norm = Normalization.from_stats([token_stats(tokens)], None, normalize)
    trainer = Trainer(list(configs), sites, total, norm)
    batches = row_batches(len(tokens), batch_size, seed)
    first = next(batches)
    trainer.initialize(tokens[first])
    trainer.train_step(tokens[first])
    for _ in range(total - 1):
        trainer.train_step(tokens[next(batches)])
    return {name: d.eval() for name, d in trainer.dictionaries.items()}
