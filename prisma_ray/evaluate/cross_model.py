"""Across models: one leaderboard row per (model, hook point), and which models' dictionaries share features.

Pure functions over a sweep's metrics rows (`metrics.parquet`) and over dictionaries' weights and
activations; `evaluate.cross_page` reads them and writes the page.

- `leaderboard_across_models`: per (model, hook) the best explained variance within each L0 budget
  (`ev_l0_le_<b>`: the best of the dictionaries whose held-out L0 is <= b, i.e. the Pareto front read at b),
  the best overall and its L0, the best loss recovered, the best of each ground-truth column present
  (`gt_*`, all higher-is-better) and the mean stability across seeds.
- `comparable_pairs`: which dictionaries of two models are compared: for every two (model, hook) groups of
  different models, the dictionary config (kind, architecture, k) they share with the highest mean explained
  variance, and in each group its best-explained-variance checkpoint of that config.
- Decoder alignment (models of equal width, `decoder_alignment`): `stability.matched_fraction` of the two
  decoders (one-to-one matching of unit decoder rows, matched when cosine >= 0.7; Paulo & Belrose 2025),
  skipped (matched 0) when no row of A has a row of B within that cosine; one pass, no Hungarian, where each
  row of A has a different nearest row of B (two dictionaries of one initialisation, little trained).
  `shared_init` flags pairs of one initialisation seed: they start from the same decoder, whatever the models,
  so their alignment may only measure how little they were trained. Decoder rows of two
  models live in the same coordinates only when one model is derived from the other (a fine-tune, one
  initialisation): for unrelated models of equal width expect chance, and read co-firing instead.
- Co-firing (any widths): `cofiring` correlates two dictionaries' latents over the same images, each
  latent mean-pooled over an image's patch tokens (`image_means`), and counts the latents of A whose
  best-correlated latent of B reaches `COFIRE_THRESHOLD` (Pearson r >= 0.7). Matching features across
  models by the correlation of their activations on shared inputs is the measure of Bricken et al. 2023
  ("Towards monosemanticity", universality section), Lan et al. 2024 ("Sparse autoencoders reveal universal
  feature spaces across large language models", arXiv:2410.06981) and, for whole representations, Huh et
  al. 2024 ("The platonic representation hypothesis", arXiv:2405.07987). Pooling per image makes models
  with different patch grids comparable: the mean over patch tokens is the latent's area-weighted
  activation on the image, whatever the grid. `cofire_chance` is the same fraction with B's images
  shuffled (a permutation null): the fraction expected from the number of latents and images alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from prisma_ray.errors import InvalidRequest

from .report import COLUMNS, column_numbers
from .stability import STABILITY_THRESHOLD, coarse_cosines, matched_fraction

L0_BUDGETS = (4, 16, 64, 256)
COFIRE_THRESHOLD = 0.7
GT_COLUMNS = [c for c in COLUMNS if c.startswith("gt_") and c != "gt_best_baseline"]
Group = tuple[str, str]


def _best(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else None


def groups_of(rows: list[dict[str, Any]]) -> dict[Group, list[dict[str, Any]]]:
    """The rows of each `(model, hook)`, in sorted order."""
    groups: dict[Group, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["hook"]), []).append(row)
    return dict(sorted(groups.items()))


def leaderboard_across_models(table: pa.Table, budgets: Iterable[int] = L0_BUDGETS) -> pa.Table:
    """One row per `(model, hook)` of a sweep's metrics `table` (rows as `evaluate.sweep` writes them: `model`,
    `hook`, `l0`, `explained_variance`, and where measured `loss_recovered`, `gt_*`, `stability`).

    Columns: `model`, `hook`, `checkpoints`, `d_in`, `best_explained_variance` with its `best_ev_l0` and
    `best_ev_name`, `ev_l0_le_<b>` for each budget b (null: no dictionary that sparse), `loss_recovered` (the
    best), each `gt_*` column present (the best), `stability` (the mean over the rows that have one). Missing
    values are null. Raises `InvalidRequest` when the table lacks `model`, `hook` or `l0`.
    """
    missing = [c for c in ("model", "hook", "l0") if c not in table.column_names]
    if table.num_rows and missing:
        raise InvalidRequest(f"leaderboard across models: the metrics table has no column {missing}; pass a sweep's")
    budgets = sorted(set(budgets))
    present = [c for c in GT_COLUMNS if c in table.column_names]
    out = []
    for (model, hook), members in groups_of(table.to_pylist()).items():
        l0, ev = column_numbers(members, "l0"), column_numbers(members, "explained_variance")
        row: dict[str, Any] = {
            "model": model,
            "hook": hook,
            "checkpoints": len(members),
            "d_in": members[0].get("d_in"),
        }
        scored = np.flatnonzero(np.isfinite(ev))
        top = members[scored[np.argmax(ev[scored])]] if scored.size else {}
        row.update(best_explained_variance=top.get("explained_variance"), best_ev_l0=top.get("l0"))
        row["best_ev_name"] = top.get("name")
        for b in budgets:
            row[f"ev_l0_le_{b}"] = _best(np.where(l0 <= b, ev, np.nan))
        row["loss_recovered"] = _best(column_numbers(members, "loss_recovered"))
        for c in present:
            row[c] = _best(column_numbers(members, c))
        stability = column_numbers(members, "stability")
        row["stability"] = float(np.nanmean(stability)) if np.isfinite(stability).any() else None
        out.append(row)
    return pa.Table.from_pylist(out)


def config_key(row: dict[str, Any]) -> tuple[str, str, int | None]:
    """What makes two models' dictionaries comparable: kind, architecture and k (not the width, which follows
    the model's)."""
    return (row.get("kind") or "sae", row["architecture"], row.get("k"))


def comparable_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`(row of A, row of B)` for every two `(model, hook)` groups of different single models (crosscoders
    across models and multi-site dictionaries are left out): of the configs (`config_key`) both have, the one
    with the highest mean explained variance, and in each group its best-explained-variance row of it."""

    def score(row: dict[str, Any]) -> float:
        value = row.get("explained_variance")
        return -math.inf if value is None or math.isnan(value) else float(value)

    best: dict[Group, dict[tuple, dict[str, Any]]] = {}
    for group, members in groups_of(rows).items():
        if "+" in group[0] or "+" in group[1]:
            continue
        for row in sorted(members, key=lambda r: r["checkpoint"]):
            kept = best.setdefault(group, {}).get(config_key(row))
            if kept is None or score(row) > score(kept):
                best[group][config_key(row)] = row
    pairs = []
    for a, b in combinations(best, 2):
        shared = set(best[a]) & set(best[b])
        if a[0] == b[0] or not shared:
            continue
        key = max(sorted(shared, key=repr), key=lambda k: score(best[a][k]) + score(best[b][k]))
        pairs.append((best[a][key], best[b][key]))
    return pairs


def pair_order(pairs: Sequence[tuple[str, str]], nbytes: Mapping[str, int], budget: int) -> list[tuple[str, int | str]]:
    """The order to compare `pairs` (of checkpoint URIs) in, holding at most `budget` bytes of what they need at once.

    Steps: `("pair", i)` compares `pairs[i]` (both of its checkpoints' data loaded, if not held already) and
    `("release", uri)` drops what `uri` held. `nbytes[uri]`: what one checkpoint holds while loaded (an estimate).
    A block-nested loop: checkpoints in order of first appearance are held in blocks that leave room for the
    largest one beside them; the pairs within a block are compared, then every later checkpoint paired with the
    block is loaded in turn, compared with it and released. So at most one block and one more checkpoint are held
    (at least one checkpoint per block, whatever the budget); each checkpoint is loaded once per earlier block it
    is paired with (all pairs in one block where everything fits). Every pair is compared once.
    """
    order = list(dict.fromkeys(uri for pair in pairs for uri in pair))
    of: dict[str, list[int]] = {uri: [] for uri in order}
    for i, (a, b) in enumerate(pairs):
        of[a].append(i)
        of[b].append(i)
    largest = max((nbytes[u] for u in order), default=0)
    todo, steps, start = set(range(len(pairs))), [], 0
    while start < len(order):
        end, used = start + 1, nbytes[order[start]]
        while end < len(order) and used + nbytes[order[end]] + largest <= budget:
            used += nbytes[order[end]]
            end += 1
        block = set(order[start:end])
        within = sorted(i for u in block for i in of[u] if i in todo and set(pairs[i]) <= block)
        steps += [("pair", i) for i in dict.fromkeys(within)]
        todo -= set(within)
        for uri in order[end:]:
            mine = [i for i in of[uri] if i in todo and (set(pairs[i]) - {uri}) <= block]
            if mine:
                steps += [("pair", i) for i in mine] + [("release", uri)]
                todo -= set(mine)
        steps += [("release", uri) for uri in order[start:end]]
        start = end
    return steps


def decoder_alignment(W_dec_a: np.ndarray, W_dec_b: np.ndarray, threshold: float = STABILITY_THRESHOLD) -> dict:
    """Decoder alignment of two dictionaries of one shape `[latents, d_out]` (models of equal width).

    `decoder_bound`: the fraction of A's unit decoder rows with some row of B at cosine >= `threshold` (an upper
    bound of the matched fraction, from one float32 matrix product, `stability.coarse_cosines`, within its rounding
    error). Where it is above 0, `decoder_matched` and `decoder_cosine` are `stability.matched_fraction` (exact:
    one pass over the same matrix where each row of A has a different best row of B, as for two copies of one
    initialisation; the Hungarian matching, cubic in the latents, otherwise); where it is 0 (unrelated coordinates,
    the usual case across models) `decoder_matched` is 0 without the matching and `decoder_cosine` is None. Raises
    `InvalidRequest` as `matched_fraction` when the shapes differ.
    """
    cosine, error = coarse_cosines(W_dec_a, W_dec_b)
    bound = float((cosine.max(axis=1) >= threshold - error).mean())
    if bound == 0:
        return {"decoder_matched": 0.0, "decoder_cosine": None, "decoder_bound": 0.0}
    matched, mean = matched_fraction(W_dec_a, W_dec_b, threshold, coarse=(cosine, error))
    return {"decoder_matched": matched, "decoder_cosine": mean, "decoder_bound": bound}


def shared_init(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool | None:
    """Whether two dictionaries whose decoders have one shape started from the same decoder: their metrics rows
    (`a`, `b`) record the same initialisation `seed` (None where either records none, e.g. a SAELens checkpoint
    without our metadata). `sae.Dictionary` draws its decoder rows from `seed` alone (a seeded generator, shape
    `[latents, d_out]`), whatever the model, so equal seeds give equal initial decoders, and two dictionaries
    trained little stay close to them: their decoder alignment is high whether or not the models share features."""
    seed_a, seed_b = a.get("seed"), b.get("seed")
    return None if seed_a is None or seed_b is None else seed_a == seed_b


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(z, live)`: the columns of `x [N, L]` centred and scaled so that `z_a.T @ z_b` is Pearson's r; constant
    columns (`~live`) are zero."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    norm = np.linalg.norm(centred, axis=0)
    live = norm > 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0)))
    return np.divide(centred, norm, out=np.zeros_like(centred), where=live), live


def _max_correlation(za: np.ndarray, zb: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([(za[:, i : i + chunk].T @ zb).max(axis=1) for i in range(0, za.shape[1], chunk)])


def cofiring(
    a: np.ndarray, b: np.ndarray, threshold: float = COFIRE_THRESHOLD, seed: int = 0, chunk: int = 1024
) -> dict[str, float]:
    """How many latents of A have a co-firing partner in B, from their activations on the same inputs.

    `a [N, La]` and `b [N, Lb]`: row i of both is input i (e.g. latents mean-pooled per image). For each latent
    of A that varies over the inputs (`live`), its best Pearson correlation with any latent of B (constant
    latents of B correlate 0). Returns `cofire_fraction` (live latents of A whose best r >= `threshold`),
    `cofire_mean_max_corr` (the mean best r), `cofire_chance` (the fraction with B's rows shuffled by a
    seeded permutation: the chance level) and `cofire_live` (the live fraction of A's latents). Raises
    `InvalidRequest` when the row counts differ, are under 3, or no latent of A varies.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b) or len(a) < 3:
        raise InvalidRequest(
            f"co-firing: expected activations [inputs, latents] of the same >= 3 inputs, got {list(a.shape)} and "
            f"{list(b.shape)}; evaluate both dictionaries on the same images"
        )
    za, live = _standardize(a)
    if not live.any():
        raise InvalidRequest("co-firing: no latent of the first dictionary varies over these inputs")
    zb, _ = _standardize(b)
    za = za[:, live]
    best = _max_correlation(za, zb, chunk)
    shuffled = zb[np.random.default_rng(seed).permutation(len(zb))]
    chance = _max_correlation(za, shuffled, chunk)
    return {
        "cofire_fraction": float((best >= threshold).mean()),
        "cofire_mean_max_corr": float(best.mean()),
        "cofire_chance": float((chance >= threshold).mean()),
        "cofire_live": float(live.mean()),
    }


def image_means(
    index: np.ndarray, n_images: int, x: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], batch: int
) -> np.ndarray:
    """`float32[n_images, L]`: each image's latents `encode(x rows)` averaged over its rows.

    `index int64[N]` gives the image of each row of `x [N, d_in]` (-1: no image, e.g. an incomplete one, as
    `pooled_truth.image_index` numbers them); rows are encoded `batch` at a time, so memory is
    `n_images x L`, not `N x L`.
    """
    index_t = torch.as_tensor(index, dtype=torch.int64)  # host: image numbers from numpy, summed on the host
    total: torch.Tensor | None = None
    for i in range(0, len(x), batch):
        idx = index_t[i : i + batch]
        keep = idx >= 0
        if not keep.any():
            continue
        z = encode(x[i : i + batch][keep]).float().cpu()
        if total is None:
            total = torch.zeros(n_images, z.shape[1])  # host: z is moved to the host above
        total.index_add_(0, idx[keep], z)
    if total is None:
        raise InvalidRequest("co-firing: no complete image among the held-out rows read; raise the number of images")
    counts = torch.bincount(index_t[index_t >= 0], minlength=n_images).clamp(min=1)
    return (total / counts[:, None]).numpy()


def shared_images(
    a: tuple[list[tuple], np.ndarray], b: tuple[list[tuple], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of two `(image keys, pooled [images, L])` for the images both hold (equal keys, e.g. `(dataset URI,
    sample_id, frame)`), in A's order."""
    where = {image: i for i, image in enumerate(b[0])}
    both = [(i, where[image]) for i, image in enumerate(a[0]) if image in where]
    rows_a = np.array([i for i, _ in both], dtype=np.int64)
    rows_b = np.array([j for _, j in both], dtype=np.int64)
    return a[1][rows_a], b[1][rows_b]
