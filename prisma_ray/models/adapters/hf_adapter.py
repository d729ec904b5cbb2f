"""Hugging Face `transformers` vision and video transformers as `ModelSites`.

Supported model classes (`ModelEntry.architecture`) are the keys of `BACKBONES` (towers without a
task head) and of `HEADS` (the same towers with a head). `forward(x)` returns the first of
`logits`, `image_embeds`, `pooler_output` and `last_hidden_state` that the model returns: logits
for the `...For...Classification` classes, the projected embedding for
`CLIPVisionModelWithProjection`, the pooled output for ViT/DeiT/BEiT/DINOv2/CLIP/ViViT towers and
SigLIP towers with a pooling head, and the token sequence otherwise (I-JEPA, VideoMAE, TimeSformer,
V-JEPA 2 encoder). Inputs are `[B, 3, H, W]` images or `[B, T, 3, H, W]` videos of
`entry.image_size` pixels and `entry.frames` frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prisma_ray.errors import InvalidRequest

from ..registry import ModelEntry
from ..sites import BlockParts, LayerSites, ModelSites
from ..spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, TokenKind, TokenLayout

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# Backbone class -> (dotted path to its list of blocks, dotted path to the norm over the whole
# token sequence, or None where the model normalises only after pooling).
BACKBONES: dict[str, tuple[str, str | None]] = {
    "ViTModel": ("layers", "layernorm"),
    "DeiTModel": ("layers", "layernorm"),
    "BeitModel": ("layers", "layernorm"),
    "Dinov2Model": ("encoder.layer", "layernorm"),
    "Dinov2WithRegistersModel": ("encoder.layer", "layernorm"),
    "CLIPVisionModel": ("encoder.layers", None),
    "SiglipVisionModel": ("encoder.layers", "post_layernorm"),
    "IJepaModel": ("layers", "layernorm"),
    "VideoMAEModel": ("encoder.layer", "layernorm"),
    "TimesformerModel": ("encoder.layer", "layernorm"),
    "VivitModel": ("layers", "layernorm"),
    "VJEPA2Model": ("encoder.layer", "encoder.layernorm"),
}

# Head class -> backbone class (reached through the model's `base_model`).
HEADS: dict[str, str] = {
    "ViTForImageClassification": "ViTModel",
    "DeiTForImageClassification": "DeiTModel",
    "DeiTForImageClassificationWithTeacher": "DeiTModel",
    "BeitForImageClassification": "BeitModel",
    "Dinov2ForImageClassification": "Dinov2Model",
    "Dinov2WithRegistersForImageClassification": "Dinov2WithRegistersModel",
    "CLIPVisionModelWithProjection": "CLIPVisionModel",
    "IJepaForImageClassification": "IJepaModel",
    "VideoMAEForVideoClassification": "VideoMAEModel",
    "TimesformerForVideoClassification": "TimesformerModel",
    "VivitForVideoClassification": "VivitModel",
    "VJEPA2ForVideoClassification": "VJEPA2Model",
}

# Extra keyword arguments of a model class's forward.
_FORWARD_KWARGS: dict[str, dict] = {"VJEPA2Model": {"skip_predictor": True}}

# Evaluation transform per `ModelEntry.family`: the normalisation each family's checkpoints were
# trained with (and their hub image processors apply), the resampling filter, and the centre-crop
# fraction of the resize-shorter-side-then-crop pipeline (1.0: resize straight to the input size).
PREPROCESS: dict[str, dict] = {
    "vit": dict(mean=HALF, std=HALF, interpolation="bilinear", crop_pct=1.0),
    "deit": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic", crop_pct=0.875),
    "beit": dict(mean=HALF, std=HALF, interpolation="bicubic", crop_pct=1.0),
    "dinov2": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic", crop_pct=0.875),
    "clip": dict(mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", crop_pct=1.0),
    "siglip": dict(mean=HALF, std=HALF, interpolation="bicubic", crop_pct=1.0),
    "ijepa": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic", crop_pct=1.0),
    "videomae": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", crop_pct=1.0),
    "timesformer": dict(mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), interpolation="bilinear", crop_pct=1.0),
    # ViViT zero-centres pixels to [-1, 1] (no further normalisation).
    "vivit": dict(mean=HALF, std=HALF, interpolation="bilinear", crop_pct=0.875),
    "vjepa2": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", crop_pct=0.875),
}


class EagerPatternSite:
    """Attention probabilities of a `transformers` attention module that returns `(output, weights)`.

    While attached, the module's config selects the eager attention implementation (the only one
    that materialises the weights); the previous implementation is restored on exit. The weights
    are a by-product of the forward pass, so they can be read but not replaced.
    """

    replaceable = False
    exact = False

    def __init__(self, attn: nn.Module):
        self.attn = attn

    @contextmanager
    def attach(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
        config = self.attn.config
        previous = config._attn_implementation

        def post_hook(_module, _args, output):
            weights = output[1]
            if weights is None:
                raise RuntimeError(
                    f"{type(self.attn).__name__} returned no attention weights under the eager implementation."
                )
            fn(weights)

        config._attn_implementation = "eager"
        handle = self.attn.register_forward_hook(post_hook)
        try:
            yield
        finally:
            handle.remove()
            config._attn_implementation = previous


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _pattern_site(attn: nn.Module) -> EagerPatternSite | None:
    return EagerPatternSite(attn) if hasattr(attn, "config") else None


def _first(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(module, n) for n in names if getattr(module, n, None) is not None), None)


def block_parts(layer: nn.Module, attn: nn.Module, out: nn.Module | None, fc_in, fc_out) -> BlockParts | None:
    """The projections and norms of a `transformers` block (`attn`: the module that projects q, k, v);
    None where its attention has no separate q/k/v projections."""
    q, k, v = (_first(attn, names) for names in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")))
    if q is None or k is None or v is None:
        return None
    d_head = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
    return BlockParts(
        d_head=int(d_head or q.out_features // attn.config.num_attention_heads),
        q=q,
        k=k,
        v=v,
        out=out,
        fc_in=fc_in,
        fc_out=fc_out,
        ln1=_first(layer, ("layernorm_before", "layer_norm1", "norm1", "input_layernorm")),
        ln2=_first(layer, ("layernorm_after", "layer_norm2", "norm2", "post_attention_layernorm")),
    )


def layer_sites(layer: nn.Module) -> LayerSites:
    """Map one `transformers` block onto the hook sites.

    Three layouts: TimeSformer (divided space-time attention adds two branches, so the attention
    branch is derived from `resid_mid`), ViT-style blocks with `intermediate`/`output.dense` MLPs
    (VideoMAE), and blocks with an `mlp` module, optionally with DINOv2 `layer_scale` modules or
    BEiT `lambda` parameters.
    """
    if hasattr(layer, "temporal_attention"):
        return LayerSites(
            block=layer,
            resid_mid=layer.layernorm_after,
            mlp_in=layer.intermediate,
            mlp_out=layer.output,
        )
    if hasattr(layer, "intermediate"):
        attn = layer.attention.attention
        return LayerSites(
            block=layer,
            attn_out=layer.attention,
            mlp_in=layer.intermediate,
            mlp_out=layer.output.dense,
            pattern=_pattern_site(attn),
            parts=block_parts(layer, attn, layer.attention.output.dense, layer.intermediate.dense, layer.output.dense),
        )
    attn = getattr(layer, "attention", None) or getattr(layer, "self_attn", None)
    if attn is None or not hasattr(layer, "mlp"):
        raise TypeError(f"Unsupported transformers block {type(layer).__name__}: no attention/mlp branch to hook.")
    mlp = layer.mlp
    parts = block_parts(
        layer,
        attn,
        _first(attn, ("o_proj", "out_proj", "proj")),
        getattr(mlp, "fc1", None),
        _first(mlp, ("fc2", "down_proj")),
    )
    sites = LayerSites(block=layer, attn_out=attn, mlp_in=mlp, mlp_out=mlp, pattern=_pattern_site(attn), parts=parts)
    if hasattr(layer, "layer_scale1"):
        sites.attn_out, sites.mlp_out = layer.layer_scale1, layer.layer_scale2
    elif isinstance(getattr(layer, "lambda_1", None), nn.Parameter):
        sites.attn_scale, sites.mlp_scale = (lambda: layer.lambda_1), (lambda: layer.lambda_2)
    return sites


def token_layout(backbone: nn.Module, entry: ModelEntry) -> TokenLayout:
    """Prefix tokens from the embedding module, patch grid and time axis from the config and entry."""
    config = backbone.config
    embeddings = getattr(backbone, "embeddings", None) or backbone.encoder.embeddings
    prefix: list[TokenKind] = []
    if getattr(embeddings, "cls_token", None) is not None or hasattr(embeddings, "class_embedding"):
        prefix.append(TokenKind.CLS)
    if getattr(embeddings, "distillation_token", None) is not None:
        prefix.append(TokenKind.DISTILLATION)
    if getattr(embeddings, "register_tokens", None) is not None:
        prefix += [TokenKind.REGISTER] * int(config.num_register_tokens)
    tubelet = getattr(config, "tubelet_size", 1)
    if isinstance(tubelet, (list, tuple)):
        tubelet, patch = int(tubelet[0]), int(tubelet[1])
    else:
        tubelet, patch = int(tubelet), int(config.patch_size)
    side = entry.image_size // patch
    time = entry.frames // tubelet if entry.modality == "video" else 1
    order = "hwt" if type(backbone).__name__ == "TimesformerModel" else "thw"
    return TokenLayout(prefix=tuple(prefix), grid=(side, side), time=time, tubelet=tubelet, patch_order=order)


def preprocess_spec(entry: ModelEntry) -> PreprocessSpec:
    """The evaluation transform of the entry's family at the entry's input size and frame count."""
    if entry.family not in PREPROCESS:
        raise InvalidRequest(
            f"No preprocessing known for Hugging Face family {entry.family!r} of {entry.name!r}; "
            f"use one of {sorted(PREPROCESS)} or add it to hf_adapter.PREPROCESS."
        )
    return PreprocessSpec(
        modality=entry.modality,
        image_size=(entry.image_size, entry.image_size),
        num_frames=entry.frames if entry.modality == "video" else None,
        **PREPROCESS[entry.family],
    )


def _model_class(name: str) -> type:
    import transformers

    if name not in BACKBONES and name not in HEADS:
        raise InvalidRequest(
            f"Unsupported Hugging Face model class {name!r}; supported: {', '.join(sorted([*BACKBONES, *HEADS]))}."
        )
    return getattr(transformers, name)


def _forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    input_name = model.main_input_name
    extra = _FORWARD_KWARGS.get(type(model).__name__, {})

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = model(**{input_name: x}, **extra)
        for field in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
            value = getattr(out, field, None)
            if value is not None:
                return value
        raise RuntimeError(
            f"{type(model).__name__} returned none of logits/image_embeds/pooler_output/last_hidden_state."
        )

    return forward


def _patch_embed(backbone: nn.Module) -> nn.Module | None:
    """The convolution that embeds patches (or tubelets), where the embedding is one convolution."""
    embeddings = getattr(backbone, "embeddings", None)
    patches = getattr(embeddings, "patch_embeddings", None)
    conv = _first(patches, ("projection", "proj")) if patches is not None else _first(embeddings, ("patch_embedding",))
    return conv if isinstance(conv, (nn.Conv2d, nn.Conv3d)) else None


def _pos_embed(backbone: nn.Module) -> Callable[[], torch.Tensor] | None:
    """The learned position embeddings `[positions, d_model]` (a parameter or an `nn.Embedding`'s weight); None
    for fixed ones (VideoMAE's sinusoids) and none."""
    embeddings = getattr(backbone, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if isinstance(table, nn.Parameter):
        return lambda: table[0] if table.dim() == 3 else table
    embedding = getattr(embeddings, "position_embedding", None)
    if isinstance(embedding, nn.Embedding):
        return lambda: embedding.weight
    return None


def sites_from_hf(model: nn.Module, entry: ModelEntry) -> ModelSites:
    """Describe a built `transformers` model (its modules are used as they are)."""
    backbone = model.base_model
    kind = type(backbone).__name__
    if kind not in BACKBONES:
        raise TypeError(f"{type(model).__name__} has backbone {kind}, which the Hugging Face adapter does not know.")
    layers_path, final_path = BACKBONES[kind]
    blocks = list(_get(backbone, layers_path))
    final = _get(backbone, final_path) if final_path else None
    if final is None or isinstance(final, nn.Identity):
        final = blocks[-1]
    config = backbone.config
    return ModelSites(
        model=model,
        layers=[layer_sites(block) for block in blocks],
        final=final,
        token_layout=token_layout(backbone, entry),
        preprocess=preprocess_spec(entry),
        forward=_forward(model),
        d_model=int(config.hidden_size),
        n_heads=int(config.num_attention_heads),
        patch_embed=_patch_embed(backbone),
        pos_embed=_pos_embed(backbone),
    )


def instantiate(cls: type, entry: ModelEntry, pretrained: bool):
    """A transformers model of class `cls` in eval mode: hub weights if `pretrained`, else random weights
    from `entry.config`."""
    if pretrained:
        if not entry.pretrained:
            raise InvalidRequest(f"{entry.name!r} has no Hugging Face hub id to load pretrained weights from.")
        return cls.from_pretrained(entry.pretrained).eval()
    return cls._from_config(cls.config_class(**entry.config)).eval()


def build(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Create the entry's model: hub weights if `pretrained`, else random weights from `entry.config`."""
    return sites_from_hf(instantiate(_model_class(entry.architecture), entry, pretrained), entry)
