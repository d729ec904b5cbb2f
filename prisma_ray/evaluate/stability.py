"""Stability across seeds: how many latents two dictionaries of one config, trained with different seeds, share.

Each dictionary's decoder rows are scaled to unit length and the two sets are matched one to one by
the Hungarian algorithm on their cosine (`scipy.optimize.linear_sum_assignment`, maximising the total
cosine; skipped, with the same result, where each row's best column is a different one: `matched_cosines`);
a latent is matched when its pair's cosine reaches `threshold` (0.7). The matched fraction is
the number of such pairs over the number of latents (Paulo & Belrose 2025, "Sparse autoencoders trained
on the same data learn different features", arXiv:2501.16615, use this measure).

In a sweep (`stability_columns`), checkpoints whose `seed_group` is equal (same model, hook points,
dictionary config and training length; see `CheckpointInfo.seed_group`) but whose `seed` differs are
siblings: each gets `stability`, its mean matched fraction against its siblings, and `stability_cosine`,
the mean cosine of the matched pairs (null without a sibling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
from scipy.optimize import linear_sum_assignment

from prisma_ray.errors import InvalidRequest

STABILITY_THRESHOLD = 0.7


def unit_rows(w: np.ndarray, dtype=np.float64) -> np.ndarray:
    """`dtype[L, D]` (default float64): the rows of `w` scaled to unit length (all-zero rows stay zero)."""
    w = np.asarray(w, dtype=dtype)
    norms = np.sqrt(np.einsum("ij,ij->i", w, w))[:, None]  # twice as fast as np.linalg.norm over rows
    return w / np.where(norms > 0, norms, 1)


def _check_decoders(W_dec_a: np.ndarray, W_dec_b: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """The unit rows (`unit_rows`, in `dtype`) of two decoders of one shape, or `InvalidRequest`."""
    a, b = np.asarray(W_dec_a), np.asarray(W_dec_b)
    if a.ndim != 2 or a.shape != b.shape:
        raise InvalidRequest(
            f"stability: expected two decoders [latents, d_out] of one shape, got {list(a.shape)} and "
            f"{list(b.shape)}; compare dictionaries of the same config"
        )
    if not len(a):
        raise InvalidRequest("stability: the decoders have no latents")
    return unit_rows(a, dtype), unit_rows(b, dtype)


def coarse_cosines(W_dec_a: np.ndarray, W_dec_b: np.ndarray) -> tuple[np.ndarray, float]:
    """`(cosine float32[latents, latents], error)`: every decoder row of A (rows) against every one of B
    (columns), computed in float32 (two to three times as fast as float64), and a bound of its rounding error:
    each entry is within `error` of the exact cosine (`(2 d + 4) u`, d = `d_out`, u the float32 unit roundoff: the
    classic `d u` bound of a dot product of unit vectors, and as much again for scaling the rows to unit length in
    float32). Raises `InvalidRequest` when the shapes differ, are not 2-D or have no latents."""
    a, b = _check_decoders(W_dec_a, W_dec_b, np.float32)
    return a @ b.T, (a.shape[1] + 2) * float(np.finfo(np.float32).eps)  # eps = 2 u


def matched_cosines(cosine: np.ndarray) -> np.ndarray:
    """`[L]`: row i's entry of `cosine [L, L]` under a one-to-one assignment of rows to columns of maximum total.

    When every row's maximum lies in a different column (the rows' argmax is a permutation, as for a decoder and a
    slightly trained copy of it; `distinct_maxima`) that permutation is such an assignment: no assignment can total
    more than the sum of the row maxima. It is taken as is, in one pass over the matrix; then every maximum-total
    assignment gives each row its row maximum, so the result equals the Hungarian's entry for entry, ties included.
    Otherwise the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`, cubic in L) finds one.
    """
    best = distinct_maxima(cosine, 0.0)
    if best is not None:
        return cosine[np.arange(len(best)), best]
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    return cosine[rows, cols]


def distinct_maxima(cosine: np.ndarray, margin: float) -> np.ndarray | None:
    """Each row's argmax of `cosine [L, L]` where they form a permutation and each row's maximum exceeds the rest of
    its row by more than `2 margin` (so the argmax is the same for any matrix within `margin` of this one, entry by
    entry); else None."""
    best = cosine.argmax(axis=1)
    if len(best) < 2 or np.bincount(best, minlength=len(best)).max() > 1:
        return best if len(best) == 1 else None
    rows = np.arange(len(best))
    cosine = cosine if cosine.flags.writeable else cosine.copy()
    top = cosine[rows, best]
    cosine[rows, best] = -np.inf  # the rest of each row, in place (no copy of the matrix), restored below
    try:
        second = cosine.max(axis=1)
    finally:
        cosine[rows, best] = top
    return best if bool((top - second > 2 * margin).all()) else None


def matched_fraction(
    W_dec_a: np.ndarray,
    W_dec_b: np.ndarray,
    threshold: float = STABILITY_THRESHOLD,
    coarse: tuple[np.ndarray, float] | None = None,
) -> tuple[float, float]:
    """`(matched fraction, mean matched cosine)` of two decoders `[latents, d_out]` of the same shape.

    The latents are paired one to one maximising the total cosine of their decoder rows (exact, float64); the
    fraction counts the pairs whose cosine is >= `threshold` over the number of latents, the mean cosine is over
    every pair. The float64 cosine matrix is matched by `matched_cosines` (no Hungarian where each row's best
    column is a different one). Where the caller has the float32 cosines already (`coarse`, as `coarse_cosines`
    gives them, e.g. `cross_model.decoder_alignment`) and they show each row of A a different best row of B by
    more than their rounding error (`distinct_maxima`), that pairing is the matching and only its cosines are
    computed in float64 (`latents x d_out`, no matrix). Raises `InvalidRequest` when the shapes differ, are not 2-D
    or have no latents.
    """
    a, b = _check_decoders(W_dec_a, W_dec_b)
    best = None if coarse is None else distinct_maxima(*coarse)
    if best is not None:
        matched = np.einsum("ij,ij->i", a, b[best])
    else:
        matched = matched_cosines(a @ b.T)
    return float((matched >= threshold).sum() / len(matched)), float(matched.mean())


def seed_siblings(groups: list[str | None], seeds: list[int | None]) -> list[list[int]]:
    """For each row, the indices of its siblings: rows with the same non-null `groups` entry and another seed
    (rows without a group or a seed have none)."""
    members: dict[str, list[int]] = {}
    for i, (group, seed) in enumerate(zip(groups, seeds)):
        if group is not None and seed is not None:
            members.setdefault(group, []).append(i)
    return [
        [j for j in members.get(group, []) if seeds[j] != seed] if group is not None and seed is not None else []
        for group, seed in zip(groups, seeds)
    ]


def stability_columns(
    table: pa.Table, decoder: Callable[[str], np.ndarray | None], threshold: float = STABILITY_THRESHOLD
) -> pa.Table:
    """`table` (a sweep's metrics rows with `checkpoint`, `seed_group` and `seed`) with `stability` and
    `stability_cosine` set: the mean over each row's siblings (`seed_siblings`) of `matched_fraction` and of
    the matched cosine, null where a row has no sibling. `decoder(checkpoint URI)` gives its `W_dec` (None:
    unreadable, so no pair with it counts), read once per checkpoint; each pair is matched once."""
    if not table.num_rows or "seed_group" not in table.column_names or "seed" not in table.column_names:
        return table
    uris = table.column("checkpoint").to_pylist()
    siblings = seed_siblings(table.column("seed_group").to_pylist(), table.column("seed").to_pylist())
    decoders: dict[int, np.ndarray | None] = {}
    pairs: dict[tuple[int, int], tuple[float, float] | None] = {}
    fraction: list[Any] = []
    cosine: list[Any] = []
    for i, others in enumerate(siblings):
        scores = []
        for j in others:
            key = (min(i, j), max(i, j))
            if key not in pairs:
                for k in key:
                    if k not in decoders:
                        decoders[k] = decoder(uris[k])
                a, b = decoders[key[0]], decoders[key[1]]
                pairs[key] = None if a is None or b is None else matched_fraction(a, b, threshold)
            if pairs[key] is not None:
                scores.append(pairs[key])
        fraction.append(float(np.mean([s[0] for s in scores])) if scores else None)
        cosine.append(float(np.mean([s[1] for s in scores])) if scores else None)
    for name, values in (("stability", fraction), ("stability_cosine", cosine)):
        column = pa.array(values, pa.float64())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table
