"""OpenCLIP image towers (native `VisionTransformer` and timm-based `TimmModel`) as `ModelSites`.

Only the vision tower is built: with random weights from OpenCLIP's bundled model config
(offline, no text tower), or with pretrained weights through `open_clip.create_model`.
`entry.config` may override top-level model-config keys (`embed_dim`, `quick_gelu`) and, through
a `vision_cfg` dict, single vision-tower fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prisma_ray.errors import InvalidRequest

from ..registry import ModelEntry
from ..sites import BlockParts, InnerSite, LayerSites, ModelSites
from ..spec import PreprocessSpec, TokenKind, TokenLayout
from .timm_adapter import sites_from_timm

PatternFn = Callable[[torch.Tensor], torch.Tensor | None]


class MultiheadAttentionPatternSite:
    """Per-head probabilities of a block's `nn.MultiheadAttention` (cache only).

    While attached, the module is called with `need_weights=True, average_attn_weights=False`
    (PyTorch's explicit-softmax path, so outputs may differ from the fused path in the last bits)
    and `fn` reads the weights it returns.
    """

    replaceable = False
    exact = False

    def __init__(self, attn: nn.MultiheadAttention):
        self.attn = attn

    @contextmanager
    def attach(self, fn: PatternFn) -> Iterator[None]:
        def pre_hook(_module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def post_hook(_module, _args, output):
            fn(output[1])

        with ExitStack() as stack:
            stack.callback(self.attn.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
            stack.callback(self.attn.register_forward_hook(post_hook).remove)
            yield


class AttentionPatternSite:
    """Per-head probabilities of OpenCLIP's custom `Attention` (fused SDPA), cache only.

    The module never materialises them, so they are recomputed from its input with its own
    weights (q/k projection, q/k norms, scale); the module's output is untouched. Vision towers
    call it without an attention mask.
    """

    replaceable = False
    exact = True

    def __init__(self, attn: nn.Module):
        self.attn = attn

    @contextmanager
    def attach(self, fn: PatternFn) -> Iterator[None]:
        def pre_hook(module, args):
            fn(_attention_probs(module, args[0]))

        handle = self.attn.register_forward_pre_hook(pre_hook)
        try:
            yield
        finally:
            handle.remove()


class _InProjection(nn.Module):
    """`x -> [q | k | v]` with an `nn.MultiheadAttention`'s packed input projection, as a module to hook
    (held by the explicit path, not registered in the model)."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    @property
    def weight(self) -> torch.Tensor:
        return self.attn.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.attn.in_proj_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MultiheadAttentionPath:
    """The explicit path of an `nn.MultiheadAttention` used as self-attention: calling it gives a context in
    which the module computes `[q | k | v] = in_proj(x)`, `softmax(q k^T / sqrt(d_head) + mask) v` per head and
    `out_proj(z)` with `in_proj` and `out_proj` called as modules, so that the per-head hook points reach
    them. PyTorch's fused kernels round differently, so outputs move by float rounding while it is active."""

    def __init__(self, attn: nn.MultiheadAttention):
        self.attn = attn
        self.in_proj = _InProjection(attn)
        self._users = 0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        self._users += 1
        if self._users == 1:
            self.attn.forward = self._forward
        try:
            yield
        finally:
            self._users -= 1
            if not self._users:
                del self.attn.forward

    def _forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = self.attn
        if key is not query or value is not query or key_padding_mask is not None or is_causal:
            raise InvalidRequest(
                "Per-head hook points of nn.MultiheadAttention support self-attention only (one input, no "
                "key padding mask, not causal); hook the block-level points (hook_attn_out) instead."
            )
        x = query if attn.batch_first else query.transpose(0, 1)
        q, k, v = self.in_proj(x).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = (
                scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        pattern = scores.softmax(dim=-1)
        z = F.dropout(pattern, attn.dropout, attn.training) @ v
        out = attn.out_proj(z.transpose(1, 2).flatten(2))
        out = out if attn.batch_first else out.transpose(0, 1)
        weights = (pattern.mean(1) if average_attn_weights else pattern) if need_weights else None
        return out, weights


def _block_parts(block: nn.Module) -> BlockParts:
    """Norms and MLP of an OpenCLIP block; with `nn.MultiheadAttention`, its projections on the explicit path."""
    attn = block.attn
    mlp = {"fc_in": block.mlp.c_fc, "fc_out": block.mlp.c_proj} if hasattr(block.mlp, "c_fc") else {}
    parts = BlockParts(d_head=attn.head_dim, ln1=block.ln_1, ln2=block.ln_2, **mlp)
    if isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim:
        path = MultiheadAttentionPath(attn)
        parts.qkv, parts.out, parts.path = path.in_proj, attn.out_proj, path
    return parts


def _attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`softmax(q k^T * scale)` as OpenCLIP's `Attention` computes it, `[N, heads, L, L]`."""
    n, length, _ = x.shape
    q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = attn.ln_q(q.reshape(n, length, attn.num_heads, -1).transpose(1, 2))
    k = attn.ln_k(k.reshape(n, length, attn.num_heads, -1).transpose(1, 2))
    return ((q * attn.scale) @ k.transpose(-1, -2)).softmax(dim=-1)


def _pattern_site(attn: nn.Module) -> InnerSite | None:
    """None only for scaled-cosine `Attention`, which OpenCLIP 3.3 cannot run (`torch.bmm` on 4-D tensors)."""
    from open_clip.transformer import Attention

    if isinstance(attn, nn.MultiheadAttention):
        return MultiheadAttentionPatternSite(attn)
    if isinstance(attn, Attention) and attn.logit_scale is None:
        return AttentionPatternSite(attn)
    return None


def _final_module(visual: nn.Module) -> nn.Module:
    """`ln_post` when it normalises every token (see `VisionTransformer._pool`), else the last block."""
    if visual.attn_pool is not None:
        all_tokens = visual.attn_pool_contrastive is not None
    else:
        all_tokens = not visual.final_ln_after_pool
    return visual.ln_post if all_tokens else visual.transformer.resblocks[-1]


def _pooled(visual: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = visual(x)
        return out[0] if isinstance(out, tuple) else out

    return forward


def _native_sites(visual: nn.Module, preprocess: PreprocessSpec) -> ModelSites:
    blocks = list(visual.transformer.resblocks)
    layers = [
        LayerSites(
            block=b,
            attn_out=b.ls_1,
            mlp_in=b.mlp,
            mlp_out=b.ls_2,
            pattern=_pattern_site(b.attn),
            parts=_block_parts(b),
        )
        for b in blocks
    ]
    return ModelSites(
        model=visual,
        layers=layers,
        final=_final_module(visual),
        token_layout=TokenLayout(prefix=(TokenKind.CLS,), grid=tuple(int(g) for g in visual.grid_size)),
        preprocess=preprocess,
        forward=_pooled(visual),
        d_model=int(visual.transformer.width),
        n_heads=int(blocks[0].attn.num_heads),
        seq_first=not visual.transformer.batch_first,
        patch_embed=visual.conv1,
        pos_embed=lambda: visual.positional_embedding,
    )


def _preprocess_spec(cfg: dict[str, Any], image_size: int | tuple[int, int]) -> PreprocessSpec:
    size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    interpolation = cfg.get("interpolation", "bicubic")
    return PreprocessSpec(
        image_size=(int(size[0]), int(size[1])),
        crop_pct=1.0,
        interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def tag_preprocess_cfg(entry: ModelEntry | None = None) -> dict[str, Any]:
    """OpenCLIP's preprocessing for the entry's pretrained tag (defaults, and without an entry: OpenAI CLIP's)."""
    from open_clip import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    tag_cfg = get_pretrained_cfg(entry.architecture, entry.pretrained) if entry and entry.pretrained else {}
    return merge_preprocess_dict(dataclasses.asdict(PreprocessCfg()), tag_cfg)


def _model_config(entry: ModelEntry) -> dict[str, Any]:
    """The entry's bundled OpenCLIP model config with `entry.config` overrides applied."""
    import open_clip

    cfg = open_clip.get_model_config(entry.architecture)
    if cfg is None:
        raise InvalidRequest(
            f"OpenCLIP has no bundled model config {entry.architecture!r}; see open_clip.list_models()."
        )
    overrides = dict(entry.config)
    vision_cfg = {**cfg["vision_cfg"], **overrides.pop("vision_cfg", {})}
    return {**cfg, **overrides, "vision_cfg": vision_cfg}


def _vision_tower(entry: ModelEntry, pretrained: bool) -> nn.Module:
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = _model_config(entry)
    if pretrained:
        overrides = {key: cfg[key] for key in entry.config}
        model = open_clip.create_model(
            entry.architecture, pretrained=entry.pretrained, require_pretrained=True, **overrides
        )
        return model.visual
    vision_cfg = {**cfg["vision_cfg"], "timm_model_pretrained": False}
    return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))


def sites_from_open_clip(visual: nn.Module, preprocess_cfg: dict[str, Any]) -> ModelSites:
    """Describe a built OpenCLIP vision tower; `preprocess_cfg` is OpenCLIP's preprocess dict."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    preprocess = _preprocess_spec(preprocess_cfg, visual.image_size)
    if isinstance(visual, VisionTransformer):
        return _native_sites(visual, preprocess)
    if isinstance(visual, TimmModel):
        sites = sites_from_timm(visual.trunk, forward=visual)
        return dataclasses.replace(sites, model=visual, preprocess=preprocess)
    raise TypeError(
        f"Unsupported OpenCLIP vision tower {type(visual).__name__}: only ViT towers "
        "(VisionTransformer or timm-based TimmModel) have transformer blocks to hook."
    )


def build(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Build the entry's OpenCLIP vision tower (random weights unless `pretrained`) and describe it."""
    visual = _vision_tower(entry, pretrained).eval()
    preprocess_cfg = getattr(visual, "preprocess_cfg", None) or tag_preprocess_cfg(entry)
    return sites_from_open_clip(visual, preprocess_cfg)
