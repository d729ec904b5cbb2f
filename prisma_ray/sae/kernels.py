"""Autograd pieces: sparse TopK encode/decode, and the JumpReLU straight-through estimators.

A TopK step only needs the encoder product densely (to find the top latents). Everything after it
touches the `k` active latents per token: their values are gathered from the precomputed
pre-activations, the decoder reads `k` rows per token (`embedding_bag`), and the encoder gradient
is a sparse-dense product instead of a second dense one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class GatherEncode(torch.autograd.Function):
    """`(centered @ W_enc + b_enc).gather(1, idx)`, given those pre-activations as `pre`: 2-D rows only
    (`centered [B, d_in]`, `idx [B, k]`; `objectives.objective` flattens a batch to its rows).

    `centered` is the input minus the pre-bias `b_pre` (None for no pre-bias), computed without
    gradient. Gradients flow to `W_enc`, `b_enc` and `b_pre` through the gathered entries only:
    `dW_enc = centeredᵀ G` with `G` sparse, `db_pre = -W_enc Σ_b G_b`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        centered: torch.Tensor,
        b_pre: torch.Tensor | None,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        idx: torch.Tensor,
        pre: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(centered, W_enc, idx)
        ctx.has_pre_bias = b_pre is not None
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        centered, W_enc, idx = ctx.saved_tensors
        batch, k = idx.shape
        n_latents = W_enc.shape[1]
        flat_idx, flat_grad = idx.reshape(-1), grad.reshape(-1)
        per_latent = torch.zeros(n_latents, dtype=grad.dtype).index_add_(0, flat_idx, flat_grad)
        rows = torch.arange(batch).repeat_interleave(k)
        sparse = torch.sparse_coo_tensor(
            torch.stack([flat_idx, rows]), flat_grad, (n_latents, batch), check_invariants=False
        )
        grad_W_enc = torch.sparse.mm(sparse, centered).t()
        grad_b_pre = -(W_enc @ per_latent) if ctx.has_pre_bias else None
        return None, grad_b_pre, grad_W_enc, per_latent, None, None


def gather_encode(*inputs: torch.Tensor | None) -> torch.Tensor:
    """`GatherEncode.apply(centered, b_pre, W_enc, b_enc, idx, pre)`: the gathered pre-activations `[batch, k]`."""
    return GatherEncode.apply(*inputs)


def sparse_decode(idx: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """`Σ_j values[..., j] · W_dec[idx[..., j]]` for every row (no bias), reading only those rows of `W_dec`.

    `idx` and `values` are `[..., k]` (any leading dimensions); the result is `[..., d_out]`.
    """
    k = idx.shape[-1]
    out = F.embedding_bag(idx.reshape(-1, k), W_dec, per_sample_weights=values.reshape(-1, k), mode="sum")
    return out.reshape(*idx.shape[:-1], W_dec.shape[1])


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """`z · H(z - θ)`; θ gets the pseudo-derivative `-(θ/ε) K((z - θ)/ε)` (rectangle kernel K), summed
    over every row of `z [..., n_latents]`."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -((threshold / eps) * _rectangle((z - threshold) / eps) * grad).sum_to_size(threshold.shape)
        return (z > threshold) * grad, grad_threshold, None


class Step(torch.autograd.Function):
    """`H(z - θ)`; θ gets the pseudo-derivative `-(1/ε) K((z - θ)/ε)` summed over the rows of `z [..., n_latents]`,
    z none (DeepMind's L0 estimator)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -((1.0 / eps) * _rectangle((z - threshold) / eps) * grad).sum_to_size(threshold.shape)
        return None, grad_threshold, None
