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


class InnerSite(Protocol):
    """How a block exposes a tensor inside its attention or MLP, batch first: the attention probabilities
    `[batch, heads, tokens, tokens]` (`attn.hook_pattern`) or one of `hook_points.INNER_SITES` (shapes in
    `HookedVisionModel.hook_shape`).

    `exact`: reading it leaves the forward pass bit for bit as it is (False where the attention then takes
    another path, which rounds differently)."""

    replaceable: bool
    exact: bool

    def attach(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> AbstractContextManager:
        """Context in which `fn` sees (and, if `replaceable`, may replace) the tensor at every forward pass."""


ENCODED = "mm_encoder_outputs"  # transformers' name for a vision tower's outputs passed in place of the pixels


@dataclass
class BlockParts:
    """The linear maps and norms of one block, where they are modules called on the forward path.

    `qkv`: one projection whose output is `[q | k | v]` (timm); else `q`, `k`, `v` (Hugging Face). `out`: the
    attention's output projection (its input is `z`, heads concatenated). `fc_in` / `fc_out`: the MLP's first
    (absent for gated MLPs) and last linear map. `ln1` / `ln2`: the norms before attention and MLP. `d_head`:
    the width of one head (key/value heads of grouped-query attention have it too). `path`: a context that
    makes the source module call these modules (OpenCLIP's `nn.MultiheadAttention`: its explicit path);
    None where it always does. Each `nn.Linear`-like module has `weight` `[out, in]` and `bias`.
    """

    d_head: int
    qkv: nn.Module | None = None
    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    out: nn.Module | None = None
    fc_in: nn.Module | None = None
    fc_out: nn.Module | None = None
    ln1: nn.Module | None = None
    ln2: nn.Module | None = None
    path: Callable[[], AbstractContextManager] | None = None


@dataclass
class LayerSites:
    """Modules of one block.

    `block`: its first input is `resid_pre`, its output (or output[0]) is `resid_post`.
    `attn_out`: its output (or output[0]), times `attn_scale()` when that is not None, is the
    attention branch added to the residual stream; None where no single module produces it
    (then `hook_attn_out` is `resid_mid - resid_pre`, cache only).
    `resid_mid`: a module whose first input is `resid_mid` (used only when `attn_out` is None).
    `mlp_in`: its first input is the MLP input. `mlp_out`: its output (times `mlp_scale()`) is the
    MLP branch added to the residual stream. `parts`: the block's projections and norms, for the per-head,
    neuron and layer-norm hook points and the weight views (None: the model has none of them).
    """

    block: nn.Module
    mlp_in: nn.Module
    mlp_out: nn.Module
    attn_out: nn.Module | None = None
    resid_mid: nn.Module | None = None
    attn_scale: Scale | None = None
    mlp_scale: Scale | None = None
    pattern: InnerSite | None = None
    parts: BlockParts | None = None


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
    `encode` (their processor: `uint8` images or videos and one prompt each -> input tensors) and `tokenizer`
    (their processor's: token ids -> text); their
    `layers` are the vision tower's blocks, `forward` takes the processor's output (and `logits_at`, a
    `bool[B, T]` mask: the logits of those positions only, `[N, vocab]`) and `visual_features` gives that output
    with the vision tower already run (`mm_encoder_outputs` in place of the pixels). `patch_embed`: the
    convolution that embeds patches (its weight is `W_E`); `pos_embed`: the learned position embeddings
    `[tokens, d_model]` as a view of the parameter (None where there are none).
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
    patch_embed: nn.Module | None = None
    pos_embed: Callable[[], torch.Tensor] | None = None
    lm: LanguageSites | None = None
    layout: Callable[[Mapping[str, torch.Tensor]], MultimodalLayout] | None = None
    encode: Callable[[Sequence[np.ndarray], Sequence[str]], dict[str, torch.Tensor]] | None = None
    tokenizer: Any = None
    visual_features: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] | None = None
