"""Training losses, one function per architecture, on normalised inputs and targets.

Reconstruction loss is the squared error summed over output dimensions and averaged over tokens.
A batch `[..., d]` is its rows: every leading position is one token, pooled (BatchTopK keeps `k`
times the number of rows, so a `[B, T, d]` batch is the `[B·T, d]` batch).
Every objective returns the total loss, its detached parts, the detached prediction and how many
tokens of the batch each latent fired on, all float32 (also under autocast: the encoder and decoder
products then run in bfloat16, the loss and metrics do not). A step makes every tensor on its inputs'
device and reads nothing back to the host (no data-dependent shapes), except `_dead_top` when dead
latents are possible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dictionary import Dictionary, rows
from .kernels import JumpReLU, Step, gather_encode, sparse_decode


@dataclass
class Outcome:
    """What one training forward pass of one dictionary produced."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    prediction: torch.Tensor
    fire_counts: torch.Tensor


def objective(
    d: Dictionary, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor | None, coefficient: float
) -> Outcome:
    """The training loss of `d` on normalised inputs `x_n` and targets `y_n` (`y_n is x_n` for autoencoders).

    `x_n` is `[..., d_in]`, `y_n` `[..., d_out]`, both taken as rows (leading dimensions flattened);
    `dead` is the boolean mask of dead latents (AuxK; None: none can be dead, no AuxK term),
    `coefficient` the current L1/L0 coefficient.
    The prediction is `[rows, d_out]`.
    """
    name = f"dictionary {d.cfg.display_name()!r}: training"
    x_rows, y_rows = rows(x_n, d.sites.d_in, name), rows(y_n, d.sites.d_out, name)
    return _OBJECTIVES[d.cfg.architecture](d, x_rows, y_rows, dead, coefficient)


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target).pow(2).sum(1).mean()


def _with_skip(d: Dictionary, out: torch.Tensor, x_n: torch.Tensor) -> torch.Tensor:
    return out + x_n @ d.W_skip.t() if d.cfg.skip_connection else out


def _dead_top(pre: torch.Tensor, dead: torch.Tensor | None, aux_k: int) -> torch.Tensor | None:
    """`[B, min(aux_k, n_dead)]` indices of each row's largest pre-activations among dead latents (None: none
    dead). Finding the dead latents reads their number back to the host (the trainer passes `dead=None`
    while none can be dead, so that this happens only once dead latents are possible)."""
    if dead is None:
        return None
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return None
    local = pre.index_select(1, dead_idx).topk(min(aux_k, dead_idx.numel()), dim=1, sorted=False).indices
    return dead_idx[local]


def _aux_k(d: Dictionary, residual: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """AuxK: the dead latents' reconstruction of what the live ones missed (no bias)."""
    return d.cfg.aux_coefficient * _mse(sparse_decode(idx, values, d.W_dec), residual)


def _finish(
    d: Dictionary, loss_parts: dict[str, torch.Tensor], prediction: torch.Tensor, fire_counts: torch.Tensor
) -> Outcome:
    parts = {k: v.float() for k, v in loss_parts.items()}
    loss = sum(parts.values())
    return Outcome(loss, {k: v.detach() for k, v in parts.items()}, prediction.detach().float(), fire_counts.float())


def _fired(d: Dictionary, idx: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """`[n_latents]`: how many rows each latent fired on, from `idx` and `acts [B, k]` (no host read-back)."""
    counts = torch.zeros(d.n_latents, dtype=torch.float32, device=idx.device)
    return counts.index_add_(0, idx.reshape(-1), (acts.detach() > 0).reshape(-1).to(counts.dtype))


def _topk(
    d: Dictionary, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor | None, coefficient: float
) -> Outcome:
    k = d.cfg.top_k
    b_pre = d.pre_bias
    with torch.no_grad():
        centered = d.centered(x_n)
        pre = torch.addmm(d.b_enc, centered, d.W_enc)
        idx = pre.topk(k, dim=1, sorted=False).indices
        aux_idx = _dead_top(pre, dead, d.cfg.aux_k)
        gathered = idx if aux_idx is None else torch.cat([idx, aux_idx], 1)
    values = gather_encode(centered, b_pre, d.W_enc, d.b_enc, gathered, pre).relu()
    acts = values[:, :k]
    prediction = _with_skip(d, sparse_decode(idx, acts, d.W_dec) + d.b_dec, x_n)
    parts = {"mse": _mse(prediction, y_n)}
    if aux_idx is not None:
        parts["aux"] = _aux_k(d, (y_n - prediction).detach(), aux_idx, values[:, k:])
    return _finish(d, parts, prediction, _fired(d, idx, acts))


def _batchtopk(
    d: Dictionary, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor | None, coefficient: float
) -> Outcome:
    """BatchTopK, and Matryoshka BatchTopK: the same `k·rows` activations decoded prefix by prefix.

    Each prefix `[0, width)` of `matryoshka_widths` reconstructs the target from its latents alone (plus the
    bias and skip term); the loss sums their squared errors, as SAELens's `MatryoshkaBatchTopKTrainingSAE` does:
    `inner_mse_{width}` for the inner prefixes, `mse` for the whole dictionary (BatchTopK's only prefix).
    The prefixes' products add up to one full decode. AuxK reconstructs the whole dictionary's residual.
    """
    pre = torch.addmm(d.b_enc, d.centered(x_n), d.W_enc)
    acts = pre.relu().flatten()
    values, flat_idx = acts.topk(d.cfg.top_k * x_n.shape[0], sorted=False)
    z = torch.zeros_like(acts).scatter(0, flat_idx, values).view_as(pre)
    parts: dict[str, torch.Tensor] = {}
    decoded, start = d.b_dec, 0
    for width in d.cfg.matryoshka_widths or (d.n_latents,):
        decoded = z[:, start:width] @ d.W_dec[start:width] + decoded
        start = width
        prediction = _with_skip(d, decoded, x_n)
        parts["mse" if width == d.n_latents else f"inner_mse_{width}"] = _mse(prediction, y_n)
    with torch.no_grad():
        _update_threshold(d, values)
        aux_idx = _dead_top(pre, dead, d.cfg.aux_k)
    if aux_idx is not None:
        parts["aux"] = _aux_k(d, (y_n - prediction).detach(), aux_idx, pre.gather(1, aux_idx).relu())
    return _finish(d, parts, prediction, (z.detach() > 0).sum(0).to(x_n.dtype))


def _update_threshold(d: Dictionary, selected: torch.Tensor) -> None:
    """Move the BatchTopK inference threshold towards the smallest positive selected activation (unchanged when
    none is positive), on the device, without reading anything back."""
    smallest = torch.where(selected > 0, selected, torch.inf).min().to(torch.float64)
    lr = d.cfg.batchtopk_threshold_lr
    moved = d.topk_threshold * (1 - lr) + lr * smallest
    d.topk_threshold.copy_(torch.where(smallest.isfinite(), moved, d.topk_threshold))


def _relu(
    d: Dictionary, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor | None, coefficient: float
) -> Outcome:
    z = torch.addmm(d.b_enc, d.centered(x_n), d.W_enc).relu()
    prediction = _with_skip(d, z @ d.W_dec + d.b_dec, x_n)
    parts = {"mse": _mse(prediction, y_n), "l1": coefficient * (z * d.decoder_norms()).sum(1).mean()}
    return _finish(d, parts, prediction, (z.detach() > 0).sum(0).to(x_n.dtype))


def _jumprelu(
    d: Dictionary, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor | None, coefficient: float
) -> Outcome:
    pre = torch.addmm(d.b_enc, d.centered(x_n), d.W_enc)
    bandwidth = d.cfg.jumprelu_bandwidth
    z = JumpReLU.apply(pre, d.threshold, bandwidth)
    prediction = _with_skip(d, z @ d.W_dec + d.b_dec, x_n)
    l0 = Step.apply(pre, d.threshold, bandwidth).sum(1, dtype=torch.float32).mean()
    parts = {"mse": _mse(prediction, y_n), "l0_penalty": coefficient * l0}
    return _finish(d, parts, prediction, (z.detach() > 0).sum(0).to(x_n.dtype))


def _gated(
    d: Dictionary, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor | None, coefficient: float
) -> Outcome:
    shared = d.centered(x_n) @ d.W_enc
    pi_gate = shared + d.b_gate
    z = (pi_gate > 0) * torch.relu(shared * d.r_mag.exp() + d.b_mag)
    prediction = _with_skip(d, z @ d.W_dec + d.b_dec, x_n)
    gate = pi_gate.relu()
    with torch.no_grad():
        frozen_rest = _with_skip(d, d.b_dec.expand_as(y_n), x_n)
    parts = {
        "mse": _mse(prediction, y_n),
        "l1": coefficient * (gate * d.decoder_norms()).sum(1).mean(),
        "gate_aux": _mse(gate @ d.W_dec.detach() + frozen_rest, y_n),
    }
    return _finish(d, parts, prediction, (z.detach() > 0).sum(0).to(x_n.dtype))


_OBJECTIVES = {
    "topk": _topk,
    "batchtopk": _batchtopk,
    "matryoshka_batchtopk": _batchtopk,
    "relu": _relu,
    "jumprelu": _jumprelu,
    "gated": _gated,
}
