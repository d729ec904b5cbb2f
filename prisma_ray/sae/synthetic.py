"""Synthetic activations built from a known sparse dictionary, to check that training recovers it.

- `sparse_dictionary_data`: a fixed number of uniformly drawn features per row (the unit tests' data).
- `planted_features`: the planted-features benchmark's data: features in superposition with power-law
  frequencies, correlated and hierarchical pairs, random magnitudes and an offset (`PlantedData`).
- `mean_max_cosine` / `recovered_fraction`: how well learned directions match the true ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prisma_ray.errors import InvalidRequest


@dataclass
class SparseData:
    """`acts[n, d] = offset + Σ_j magnitude[n, j] · features[chosen[n, j]]`, `active` features per row."""

    acts: torch.Tensor
    features: torch.Tensor


def _unit_directions(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """`[n, d]` random unit rows drawn on the CPU from `gen`."""
    features = torch.randn(n, d, generator=gen)  # host: the same draws on every device
    return features / features.norm(dim=1, keepdim=True)


def sparse_dictionary_data(
    n: int,
    d: int,
    n_features: int,
    active: int,
    seed: int = 0,
    offset_scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> SparseData:
    """`n` rows of dimension `d`, each the sum of `active` random unit features (of `n_features`,
    drawn with replacement) with magnitudes uniform in [0.5, 1.5], plus a constant offset (what the
    pre-bias must learn). Drawn on the CPU from `seed` (the same data on every device), returned on `device`."""
    gen = torch.Generator().manual_seed(seed)
    features = _unit_directions(n_features, d, gen)
    chosen = torch.randint(0, n_features, (n, active), generator=gen)  # host: as features
    magnitudes = 0.5 + torch.rand(n, active, generator=gen)  # host: as features
    offset = torch.randn(d, generator=gen) * offset_scale  # host: as features
    acts = F.embedding_bag(chosen, features, per_sample_weights=magnitudes, mode="sum") + offset
    return SparseData(acts.to(device), features.to(device))


@dataclass
class PlantedData:
    """Activations planted from a known dictionary (`planted_features`).

    `acts [n, d]`: the rows; `features [n_features, d]`: the true unit directions; `frequencies [n_features]`:
    the fraction of rows each feature fires on (measured on these rows); `offset [d]`: the constant added to
    every row; `correlated [p, 2]`: pairs `(a, b)` where `b` also fires with `a` more often than chance;
    `hierarchical [q, 2]`: pairs `(parent, child)` where the child fires only when its parent fires.
    """

    acts: torch.Tensor
    features: torch.Tensor
    frequencies: torch.Tensor
    offset: torch.Tensor
    correlated: torch.Tensor
    hierarchical: torch.Tensor

    @property
    def l0(self) -> float:
        """Mean number of features active per row (the true L0)."""
        return float(self.frequencies.sum())


def zipf_frequencies(n_features: int, mean_active: float, exponent: float) -> torch.Tensor:
    """`[n_features]` firing probabilities `p_i ∝ (i + 1)^-exponent` summing to `mean_active` (feature 0 the
    most frequent). Raises `InvalidRequest` when the most frequent would exceed probability 1."""
    weights = torch.arange(1, n_features + 1, dtype=torch.float64) ** -exponent  # host: drawn on the CPU, moved once
    p = weights / weights.sum() * mean_active
    if float(p[0]) > 1:
        raise InvalidRequest(
            f"planted features: mean_active={mean_active} with zipf_exponent={exponent} over {n_features} features "
            f"gives the most frequent feature probability {float(p[0]):.3g} > 1; lower mean_active or the exponent, "
            "or add features"
        )
    return p.float()


def planted_features(
    n: int,
    d: int,
    n_features: int,
    mean_active: float,
    *,
    zipf_exponent: float = 1.0,
    n_correlated: int = 0,
    correlation: float = 0.5,
    n_hierarchical: int = 0,
    child_given_parent: float = 0.5,
    magnitude: tuple[float, float] = (0.5, 1.5),
    offset_scale: float = 1.0,
    seed: int = 0,
    chunk: int = 16_384,
    device: torch.device | str = "cpu",
) -> PlantedData:
    """`n` rows of dimension `d` planted from `n_features` random unit directions (superposition when
    `n_features > d`): `acts = offset + Σ_i fires[n, i] · magnitude[n, i] · features[i]`.

    - Feature `i` fires independently with probability `p_i ∝ (i + 1)^-zipf_exponent`, scaled so that
      `mean_active` features fire per row (before the pairs below): a power law of frequencies.
    - `n_correlated` disjoint pairs `(a, b)`: whenever `a` fires, `b` fires too with probability `correlation`
      (besides its own chance), so the pair fires together far more often than independence gives.
    - `n_hierarchical` disjoint pairs `(parent, child)` (the parent the more frequent): the child fires
      only when its parent fires, then with probability `child_given_parent`, never otherwise.
    - Magnitudes uniform in `magnitude`; the offset is a Gaussian vector of scale `offset_scale`.

    Which features form pairs is drawn from `seed` (every feature in at most one pair). Drawn on the CPU in
    chunks of `chunk` rows (the same data on every device), returned on `device`.
    Sources: Elhage et al. 2022 (toy models of superposition), Chanin et al. 2024 (feature absorption under
    hierarchical features), Bussmann et al. 2025 (Matryoshka SAEs).
    Raises `InvalidRequest` for settings that cannot be drawn (too many pairs, probabilities beyond [0, 1]).
    """
    if 2 * (n_correlated + n_hierarchical) > n_features:
        raise InvalidRequest(
            f"planted features: {n_correlated} correlated and {n_hierarchical} hierarchical pairs need "
            f"{2 * (n_correlated + n_hierarchical)} distinct features, only {n_features} exist; use fewer pairs"
        )
    for name, value in (("correlation", correlation), ("child_given_parent", child_given_parent)):
        if not 0 <= value <= 1:
            raise InvalidRequest(f"planted features: {name}={value} is a probability; use a value in [0, 1]")
    low, high = magnitude
    if not 0 < low <= high:
        raise InvalidRequest(f"planted features: magnitude={magnitude} must be (low, high) with 0 < low <= high")
    gen = torch.Generator().manual_seed(seed)
    features = _unit_directions(n_features, d, gen)
    offset = torch.randn(d, generator=gen) * offset_scale  # host: as features
    p = zipf_frequencies(n_features, mean_active, zipf_exponent)
    order = torch.randperm(n_features, generator=gen)  # host: as features
    correlated = order[: 2 * n_correlated].view(-1, 2)
    pairs = order[2 * n_correlated : 2 * (n_correlated + n_hierarchical)].view(-1, 2)
    hierarchical = torch.stack([pairs.min(1).values, pairs.max(1).values], 1)  # parent: the lower index, likelier
    acts, counts = [], torch.zeros(n_features, dtype=torch.float64)  # host: as features
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        fires = torch.rand(rows, n_features, generator=gen) < p  # host: as features
        a, b = correlated[:, 0], correlated[:, 1]
        fires[:, b] |= fires[:, a] & (torch.rand(rows, len(a), generator=gen) < correlation)  # host: as features
        parent, child = hierarchical[:, 0], hierarchical[:, 1]
        coin = torch.rand(rows, len(child), generator=gen)  # host: as features
        fires[:, child] = fires[:, parent] & (coin < child_given_parent)
        magnitudes = low + (high - low) * torch.rand(rows, n_features, generator=gen)  # host: as features
        acts.append((fires * magnitudes) @ features + offset)
        counts += fires.sum(0, dtype=torch.float64)
    frequencies = (counts / max(n, 1)).float()
    return PlantedData(
        acts=torch.cat(acts).to(device),
        features=features.to(device),
        frequencies=frequencies.to(device),
        offset=offset.to(device),
        correlated=correlated.to(device),
        hierarchical=hierarchical.to(device),
    )


def max_cosines(learned: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """`[n_true]`: for each true direction (row of `true [n_true, d]`), its best cosine with a row of
    `learned [n_learned, d]` (rows of zero norm match nothing)."""
    a = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = true / true.norm(dim=1, keepdim=True)
    return (b @ a.t()).max(dim=1).values


def mean_max_cosine(learned: torch.Tensor, true: torch.Tensor) -> float:
    """For each true direction (row of `true`), the best cosine with a learned row; averaged."""
    return float(max_cosines(learned, true).mean())


def recovered_fraction(learned: torch.Tensor, true: torch.Tensor, threshold: float = 0.9) -> float:
    """The fraction of true directions (rows of `true`) whose best cosine with a learned row is `>= threshold`."""
    return float((max_cosines(learned, true) >= threshold).float().mean())
