"""The places in a source model's modules that each hook point attaches to.

An adapter describes a model as a list of `LayerSites` (one per transformer block) plus the
embedding and final sites; `HookedVisionModel` turns hook names into PyTorch forward hooks on
exactly these original modules, so no weights are converted or copied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .spec import MultimodalLayout, PreprocessSpec, TokenLayout

Scale = Callable[[], torch.Tensor | None]


class PatternSite(Protocol):
    """How a block exposes its attention probabilities `[batch, heads, tokens, tokens]`."""

    replaceable: bool

    def attach(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> AbstractContextManager:
        """Context in which `fn` sees (and, if `replaceable`, may replace) every pattern."""


@dataclass
class LayerSites:
    """Modules of one block.

    `block`: its first input is `resid_pre`, its output (or output[0]) is `resid_post`.
    `attn_out`: its output (or output[0]), times `attn_scale()` when that is not None, is the
    attention branch added to the residual stream; None where no single module produces it
    (then `hook_attn_out` is `resid_mid - resid_pre`, cache only).
    `resid_mid`: a module whose first input is `resid_mid` (used only when `attn_out` is None).
    `mlp_in`: its first input is the MLP input. `mlp_out`: its output (times `mlp_scale()`) is the
    MLP branch added to the residual stream.
    """

    block: nn.Module
    mlp_in: nn.Module
    mlp_out: nn.Module
    attn_out: nn.Module | None = None
    resid_mid: nn.Module | None = None
    attn_scale: Scale | None = None
    mlp_scale: Scale | None = None
    pattern: PatternSite | None = None


@dataclass
class LanguageSites:
    """The language model of a multimodal model, hooked under `lm.`-prefixed names."""

    layers: list[LayerSites]
    final: nn.Module
    d_model: int
    n_heads: int


@dataclass
class ModelSites:
    """Everything `HookedVisionModel` needs to know about a built source model.

    Multimodal language models add `lm`, `layout` (the `MultimodalLayout` of an input batch) and
    `encode` (their processor: `uint8` images or videos and one prompt each -> input tensors); their
    `layers` are the vision tower's blocks and `forward` takes the processor's output.
    """

    model: nn.Module
    layers: list[LayerSites]
    final: nn.Module
    token_layout: TokenLayout
    preprocess: PreprocessSpec
    forward: Callable[[Any], torch.Tensor]
    d_model: int
    n_heads: int
    seq_first: bool = False
    lm: LanguageSites | None = None
    layout: Callable[[Mapping[str, torch.Tensor]], MultimodalLayout] | None = None
    encode: Callable[[Sequence[np.ndarray], Sequence[str]], dict[str, torch.Tensor]] | None = None
