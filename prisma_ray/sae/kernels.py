"""Autograd pieces: sparse TopK encode/decode, and the JumpReLU straight-through estimators.

A TopK step only needs the encoder product densely (to find the top latents). Everything after it
touches the `k` active latents per token: their values are gathered from the precomputed
pre-activations, the decoder reads `k` rows per token (`embedding_bag`), and the encoder gradient
is a sparse-dense product instead of a second dense one.

Device and precision: everything here runs on the device of its inputs (every tensor it creates is
made there), CPU or CUDA alike. Under `torch.autocast` the dense encoder product gives bfloat16
pre-activations; the `k` gathered values, the sparse decoder and every gradient of the sparse path
are computed in the parameters' dtype (float32 master weights), with autocast off inside the
backward passes, so that a backward computes what its forward's precision implies whether or not it
runs under autocast.

The sparse encoder gradient is the custom op `prisma_ray::sparse_encoder_grad`: its implementation
is `torch.sparse.mm` (cuSPARSE on CUDA, what keeps a TopK step at about one dense GEMM instead of
two), and its registered fake implementation gives the result's shape, dtype and device without
running it, which is what `FakeTensorMode` (the device tests, which run on fake CUDA tensors without
a GPU) and `torch.compile` need: sparse matmul itself has no fake kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


@torch.library.custom_op("prisma_ray::sparse_encoder_grad", mutates_args=())
def sparse_encoder_grad(idx: torch.Tensor, grad: torch.Tensor, centered: torch.Tensor, n_latents: int) -> torch.Tensor:
    """`Gᵀ centered [n_latents, d_in]`, where `G [batch, n_latents]` is zero but for `G[b, idx[b, j]] = grad[b, j]`
    (`idx`, `grad [batch, k]`, `centered [batch, d_in]`): the TopK encoder gradient, transposed.

    Accumulated in `centered`'s dtype (float32 in training: `grad` may come as bfloat16) with autocast off,
    on `centered`'s device.
    """
    batch, k = idx.shape
    rows = torch.arange(batch, device=idx.device).repeat_interleave(k)
    with torch.autocast(device_type=centered.device.type, enabled=False):
        sparse = torch.sparse_coo_tensor(
            torch.stack([idx.reshape(-1), rows]),
            grad.reshape(-1).to(centered.dtype),
            (n_latents, batch),
            check_invariants=False,
        )
        return torch.sparse.mm(sparse, centered)


@sparse_encoder_grad.register_fake
def _(idx: torch.Tensor, grad: torch.Tensor, centered: torch.Tensor, n_latents: int) -> torch.Tensor:
    return centered.new_empty((n_latents, centered.shape[1]))


class GatherEncode(torch.autograd.Function):
    """`(centered @ W_enc + b_enc).gather(1, idx)`, given those pre-activations as `pre`: 2-D rows only
    (`centered [B, d_in]`, `idx [B, k]`; `objectives.objective` flattens a batch to its rows).

    `centered` is the input minus the pre-bias `b_pre` (None for no pre-bias), computed without
    gradient. Gradients flow to `W_enc`, `b_enc` and `b_pre` through the gathered entries only:
    `dW_enc = centeredᵀ G` with `G` sparse, `db_pre = -W_enc Σ_b G_b`. The gathered values are returned
    in `W_enc`'s dtype (`pre` is bfloat16 under autocast) and the gradients computed in it.
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
        return pre.gather(1, idx).to(W_enc.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        centered, W_enc, idx = ctx.saved_tensors
        n_latents = W_enc.shape[1]
        grad = grad.to(W_enc.dtype)
        with torch.autocast(device_type=grad.device.type, enabled=False):
            per_latent = torch.zeros(n_latents, dtype=grad.dtype, device=grad.device)
            per_latent.index_add_(0, idx.reshape(-1), grad.reshape(-1))
            grad_W_enc = sparse_encoder_grad(idx, grad, centered, n_latents).t()
            grad_b_pre = -(W_enc @ per_latent) if ctx.has_pre_bias else None
        return None, grad_b_pre, grad_W_enc, per_latent, None, None


def gather_encode(*inputs: torch.Tensor | None) -> torch.Tensor:
    """`GatherEncode.apply(centered, b_pre, W_enc, b_enc, idx, pre)`: the gathered pre-activations `[batch, k]`."""
    return GatherEncode.apply(*inputs)


def sparse_decode(idx: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """`Σ_j values[..., j] · W_dec[idx[..., j]]` for every row (no bias), reading only those rows of `W_dec`.

    `idx` and `values` are `[..., k]` (any leading dimensions); the result is `[..., d_out]` in `W_dec`'s dtype
    (`values` are cast to it: bfloat16 values from an autocast product decode in float32).
    """
    k = idx.shape[-1]
    weights = values.reshape(-1, k).to(W_dec.dtype)
    out = F.embedding_bag(idx.reshape(-1, k), W_dec, per_sample_weights=weights, mode="sum")
    return out.reshape(*idx.shape[:-1], W_dec.shape[1])


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """`z · H(z - θ)`; θ gets the pseudo-derivative `-(θ/ε) K((z - θ)/ε)` (rectangle kernel K), summed
    over every row of `z [..., n_latents]`. `z` may be bfloat16 (autocast) and θ float32: the output and
    `z`'s gradient keep `z`'s dtype, θ's gradient is computed in θ's (type promotion, no autocast op)."""

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
    z none (DeepMind's L0 estimator). The output is in `z`'s dtype, θ's gradient in θ's (as `JumpReLU`)."""

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
