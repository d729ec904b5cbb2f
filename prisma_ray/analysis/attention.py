"""Attention maps per layer and head, and attention rollout (Abnar & Zuidema, 2020)."""

from __future__ import annotations

import torch

from prisma_ray.errors import InvalidRequest

from ..models import HookedVisionModel
from ..models.spec import TokenLayout


def pattern_hooks(model: HookedVisionModel, layers: list[int] | None = None) -> list[str]:
    """`blocks.{l}.attn.hook_pattern` for `layers` (default: all); a clear error where the model exposes none."""
    layers = list(range(model.n_layers)) if layers is None else layers
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    if "blocks.0.attn.hook_pattern" not in model.hook_names:
        raise InvalidRequest(f"{model.name} does not expose attention probabilities (no attn.hook_pattern hook points)")
    for name in names:
        model.hook_point(name)
    return names


@torch.inference_mode()
def attention_patterns(model: HookedVisionModel, x: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """`[B, L, heads, T, T]`: every head's attention probabilities (rows: queries) at `layers`."""
    names = pattern_hooks(model, layers)
    _, cache = model.run_with_cache(x, names, stop_early=True)
    return torch.stack([cache[n].float() for n in names], dim=1)


def rollout(patterns: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """`[B, L, T, T]`: attention rolled out through layers 0..l for every l, from `patterns [B, L, H, T, T]`.

    Each layer's map is the head mean mixed with the identity for the residual connection,
    `A = (1 - residual) · mean_h(P) + residual · I`, rows renormalised; the rollout after layer l is
    `A_l · ... · A_0`, so every row is a distribution over input tokens.
    """
    mean = patterns.mean(dim=2)
    eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
    mixed = (1 - residual) * mean + residual * eye
    mixed = mixed / mixed.sum(dim=-1, keepdim=True)
    out, acc = [], None
    for layer in range(mixed.shape[1]):
        acc = mixed[:, layer] if acc is None else mixed[:, layer] @ acc
        out.append(acc)
    return torch.stack(out, dim=1)


def query_rows(maps: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """`[..., T]`: the CLS token's row of `maps [..., T, T]`, or the mean row for models without a prefix token."""
    return maps[..., 0, :] if layout.n_prefix else maps.mean(dim=-2)
