"""Data-dependent initialisation: the decoder bias at the geometric median (or mean) of a batch."""

from __future__ import annotations

import torch

from .dictionary import Dictionary


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the rows of `x [..., d]` (Weiszfeld's algorithm),
    float32 `[d]` on `x`'s device.

    Iterates until a step moves it by at most `tol` (relative), `iters` at most. The stop is decided on the
    device (the point is frozen once converged) rather than read back at every iteration: no host sync,
    and it runs on fake tensors.
    """
    x = x.reshape(-1, x.shape[-1]).double()
    median = x.mean(0)
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-12)
        update = (weights[:, None] * x).sum(0) / weights.sum()
        moved = (update - median).norm()
        median = torch.where(done, median, update)
        done = done | (moved <= tol * update.norm().clamp_min(1.0))
    return median.float()


@torch.no_grad()
def init_pre_bias(d: Dictionary, y_n: torch.Tensor) -> None:
    """Set `b_dec` from a batch of normalised targets `[..., d_out]` (its rows), per `cfg.pre_bias_init`."""
    y_n = y_n.reshape(-1, y_n.shape[-1])
    how = d.cfg.pre_bias_init
    if how == "geometric_median":
        d.b_dec.copy_(geometric_median(y_n))
    elif how == "mean":
        d.b_dec.copy_(y_n.mean(0))
