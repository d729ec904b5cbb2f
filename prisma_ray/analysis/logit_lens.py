"""Logit lens per patch: the model's final norm and head applied to every layer's residual stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import HookedVisionModel
from .readout import Readout


@dataclass
class LensResult:
    """Lens outputs per residual stream (`hooks`: the embedding, then each block's output).

    `tokens [B, L + 1, T, C]`: every token read out on its own; `pooled [B, L + 1, C]`: the model's own
    pooling and head on the whole stream (at the last block this is the model's output).
    """

    hooks: list[str]
    tokens: torch.Tensor
    pooled: torch.Tensor


def lens_hooks(model: HookedVisionModel) -> list[str]:
    return ["hook_embed", *(f"blocks.{l}.hook_resid_post" for l in range(model.n_layers))]


@torch.inference_mode()
def logit_lens(model: HookedVisionModel, x: torch.Tensor, readout: Readout) -> LensResult:
    """The lens of `readout` (see `class_readout`) at every layer for inputs `x`."""
    hooks = lens_hooks(model)
    _, cache = model.run_with_cache(x, hooks)
    tokens = torch.stack([readout.tokens(cache[h]) for h in hooks], dim=1)
    pooled = torch.stack([readout.pooled(cache[h]) for h in hooks], dim=1)
    return LensResult(hooks, tokens, pooled)


def lens_accuracy(pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[L + 1]`: top-1 accuracy of the pooled lens at each layer against `labels [B]`."""
    return (pooled.argmax(-1) == labels[:, None]).float().mean(0)
