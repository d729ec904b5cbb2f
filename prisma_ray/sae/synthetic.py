"""Synthetic activations built from a known sparse dictionary, to check that training recovers it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SparseData:
    """`acts[n, d] = offset + Σ_j magnitude[n, j] · features[chosen[n, j]]`, `active` features per row."""

    acts: torch.Tensor
    features: torch.Tensor


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
    features = torch.randn(n_features, d, generator=gen)  # host: the same draws on every device
    features /= features.norm(dim=1, keepdim=True)
    chosen = torch.randint(0, n_features, (n, active), generator=gen)  # host: as features
    magnitudes = 0.5 + torch.rand(n, active, generator=gen)  # host: as features
    offset = torch.randn(d, generator=gen) * offset_scale  # host: as features
    acts = F.embedding_bag(chosen, features, per_sample_weights=magnitudes, mode="sum") + offset
    return SparseData(acts.to(device), features.to(device))


def mean_max_cosine(learned: torch.Tensor, true: torch.Tensor) -> float:
    """For each true direction (row of `true`), the best cosine with a learned row; averaged."""
    a = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = true / true.norm(dim=1, keepdim=True)
    return float((b @ a.t()).max(dim=1).values.mean())
