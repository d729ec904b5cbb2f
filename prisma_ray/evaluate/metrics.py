"""Dictionary metrics on activations: reconstruction, sparsity, crosscoder decoder norms, Pareto fronts.

Every function is pure; the accumulators take batches (torch tensors) and give the metrics of all
the rows seen, so held-out stores of any size stream through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from prisma_ray.errors import InvalidRequest

from ..sae.dictionary import rows

DENSITY_EDGES = np.arange(-10.0, 0.01, 0.5)
"""log10 firing-frequency bin edges of the density histogram; latents that never fired land in the first bin."""
DENSITY_FLOOR = 1e-10


@dataclass
class Reconstruction:
    """Running sums for MSE, explained variance (about the per-dimension mean) and cosine similarity."""

    n: int = 0
    sse: float = 0.0
    cos_sum: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_x2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add targets `x` and reconstructions (or predictions) `x_hat`, both `[..., d]`: every leading
        position is one row. Raises `InvalidRequest` when the shapes differ."""
        if x.shape != x_hat.shape:
            raise InvalidRequest(
                f"reconstruction metrics: targets {list(x.shape)} and predictions {list(x_hat.shape)} differ in shape"
            )
        x, x_hat = rows(x, x.shape[-1], "reconstruction metrics").double(), x_hat.reshape(-1, x.shape[-1]).double()
        if self.sum_x is None:
            self.sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.sum_x2 = torch.zeros_like(self.sum_x)
        self.n += len(x)
        self.sse += float(((x - x_hat) ** 2).sum())
        self.cos_sum += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=1e-12).sum())
        self.sum_x += x.sum(0)
        self.sum_x2 += (x**2).sum(0)

    @property
    def d(self) -> int:
        return 0 if self.sum_x is None else self.sum_x.numel()

    @property
    def mse(self) -> float:
        """Mean squared error per element."""
        return self.sse / max(self.n * self.d, 1)

    @property
    def total_variance(self) -> float:
        """`Σ_rows ‖x − mean(x)‖²`, the mean taken per dimension."""
        if self.sum_x is None:
            return 0.0
        return float((self.sum_x2 - self.sum_x**2 / self.n).sum())

    @property
    def explained_variance(self) -> float:
        """`1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`."""
        return 1.0 - self.sse / max(self.total_variance, 1e-30)

    @property
    def cosine(self) -> float:
        """Mean cosine similarity between each row and its reconstruction."""
        return self.cos_sum / max(self.n, 1)

    def summary(self) -> dict[str, float]:
        return {"mse": self.mse, "explained_variance": self.explained_variance, "cosine": self.cosine}


@dataclass
class Sparsity:
    """Running firing counts of the latents: L0, dead and dense fractions, log-density histogram."""

    n_latents: int
    n: int = 0
    fire_counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.int64)  # host: moved to the batches' device

    def update(self, z: torch.Tensor) -> None:
        """Add the latent activations `z [..., n_latents]` of a batch (every leading position is one row). The
        counts stay on `z`'s device: no synchronisation per batch."""
        fired = rows(z, self.n_latents, "sparsity metrics") != 0
        self.n += len(fired)
        self.fire_counts = self.fire_counts.to(fired.device) + fired.sum(0)

    @property
    def active_sum(self) -> int:
        """Active latents summed over the rows seen."""
        return int(self.fire_counts.sum())

    @property
    def density(self) -> np.ndarray:
        """Firing frequency of each latent over the rows seen."""
        return self.fire_counts.double().cpu().numpy() / max(self.n, 1)

    def summary(self, dense_threshold: float = 0.1) -> dict[str, object]:
        """`l0` (mean active latents per row), `dead_fraction` (never fired), `dense_fraction`
        (fired on more than `dense_threshold` of the rows) and `density_hist` (counts per `DENSITY_EDGES` bin)."""
        density = self.density
        return {
            "l0": self.active_sum / max(self.n, 1),
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).mean()),
            "density_hist": log_density_histogram(density).tolist(),
        }


def log_density_histogram(density: np.ndarray) -> np.ndarray:
    """Counts of latents per bin of `log10(density + 1e-10)` over `DENSITY_EDGES` (int64)."""
    logs = np.log10(np.asarray(density, dtype=np.float64) + DENSITY_FLOOR)
    counts, _ = np.histogram(np.clip(logs, DENSITY_EDGES[0], DENSITY_EDGES[-1]), bins=DENSITY_EDGES)
    return counts.astype(np.int64)


def decoder_norm_shares(W_dec: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """`[n_latents, n_sites]` (float64, on the CPU): each latent's decoder norm on each output site over its
    norms summed over sites."""
    norms = torch.stack([W_dec[:, a:b].detach().double().norm(dim=1) for a, b in bounds], dim=1).cpu()
    return norms / norms.sum(1, keepdim=True).clamp_min(1e-30)


def share_summary(shares: torch.Tensor, labels: list[str], threshold: float = 0.9) -> dict[str, object]:
    """How the latents split between sources: `specific[label]` is the fraction of latents with at
    least `threshold` of their decoder norm on that source, `shared` the fraction specific to none,
    `mean_share[label]` the average share, `hist[label]` counts over ten equal bins of [0, 1]."""
    specific = shares >= threshold
    hist = {label: np.histogram(col, bins=10, range=(0, 1))[0].tolist() for label, col in zip(labels, shares.T.numpy())}
    return {
        "specific": {label: float(specific[:, i].double().mean()) for i, label in enumerate(labels)},
        "shared": float((~specific.any(1)).double().mean()),
        "mean_share": {label: float(shares[:, i].mean()) for i, label in enumerate(labels)},
        "hist": hist,
    }


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """`bool[n]`: the points no other point beats, i.e. none has lower-or-equal `cost` and higher-or-equal
    `value` with one of them strictly better. NaN points are never on the front."""
    cost, value = np.asarray(cost, dtype=float), np.asarray(value, dtype=float)
    ok = ~(np.isnan(cost) | np.isnan(value))
    front = np.zeros(len(cost), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = (
            (cost[others] <= cost[i])
            & (value[others] >= value[i])
            & ((cost[others] < cost[i]) | (value[others] > value[i]))
        )
        front[i] = not dominated.any()
    return front
