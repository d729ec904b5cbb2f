"""Hugging Face `transformers` registry entries (`source="hf"`): hub id plus the config-class kwargs
of the hub model's architecture, so that `pretrained=False` builds the same shapes offline.

`image_size` and `frames` are the model's input (after preprocessing); `config["image_size"]` is
the config's own value, which differs for DINOv2 (position embeddings for 518 px, run at 224 px).
"""

from typing import Any

from ..registry import ModelEntry

TI = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
H = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120)


def _entry(
    name: str,
    hub: str,
    architecture: str,
    family: str,
    config: dict[str, Any],
    image_size: int | None = None,
    frames: int | None = None,
) -> ModelEntry:
    """An entry whose shape fields are read off the config kwargs."""
    patch = config.get("patch_size") or config["tubelet_size"][1]
    return ModelEntry(
        name=f"hf-{name}",
        source="hf",
        architecture=architecture,
        pretrained=hub,
        family=family,
        modality="video" if frames else "image",
        layers=config["num_hidden_layers"],
        width=config["hidden_size"],
        heads=config["num_attention_heads"],
        image_size=image_size or config.get("image_size") or config["crop_size"],
        patch_size=patch,
        frames=frames,
        config=config,
    )


def _dinov2(size: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """DINOv2 config: MLP width is `mlp_ratio * hidden_size` (SwiGLU for the giant)."""
    layers = {k: v for k, v in size.items() if k != "intermediate_size"}
    return dict(**layers, image_size=518, patch_size=14, layer_norm_eps=1e-6, **extra)


G14 = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True)
VJEPA2_G = dict(hidden_size=1408, num_hidden_layers=40, num_attention_heads=22, mlp_ratio=48 / 11)


def _vjepa2(size: dict[str, Any], crop: int, frames: int, **extra: Any) -> dict[str, Any]:
    layers = {k: v for k, v in size.items() if k != "intermediate_size"}
    return dict(**layers, patch_size=16, tubelet_size=2, crop_size=crop, frames_per_clip=frames, **extra)


IMAGE = [
    _entry(
        "vit-base-patch16-224",
        "google/vit-base-patch16-224",
        "ViTForImageClassification",
        "vit",
        dict(**B, image_size=224, patch_size=16, num_labels=1000),
    ),
    _entry(
        "vit-base-patch16-384",
        "google/vit-base-patch16-384",
        "ViTForImageClassification",
        "vit",
        dict(**B, image_size=384, patch_size=16, num_labels=1000),
    ),
    _entry(
        "vit-large-patch16-224",
        "google/vit-large-patch16-224",
        "ViTForImageClassification",
        "vit",
        dict(**L, image_size=224, patch_size=16, num_labels=1000),
    ),
    _entry(
        "vit-base-patch16-224-in21k",
        "google/vit-base-patch16-224-in21k",
        "ViTModel",
        "vit",
        dict(**B, image_size=224, patch_size=16),
    ),
    _entry(
        "vit-huge-patch14-224-in21k",
        "google/vit-huge-patch14-224-in21k",
        "ViTModel",
        "vit",
        dict(**H, image_size=224, patch_size=14),
    ),
    _entry(
        "deit-tiny-patch16-224",
        "facebook/deit-tiny-patch16-224",
        "ViTForImageClassification",
        "deit",
        dict(**TI, image_size=224, patch_size=16, num_labels=1000),
    ),
    _entry(
        "deit-small-patch16-224",
        "facebook/deit-small-patch16-224",
        "ViTForImageClassification",
        "deit",
        dict(**S, image_size=224, patch_size=16, num_labels=1000),
    ),
    _entry(
        "deit-base-patch16-224",
        "facebook/deit-base-patch16-224",
        "ViTForImageClassification",
        "deit",
        dict(**B, image_size=224, patch_size=16, num_labels=1000),
    ),
    _entry(
        "deit-base-distilled-patch16-224",
        "facebook/deit-base-distilled-patch16-224",
        "DeiTForImageClassificationWithTeacher",
        "deit",
        dict(**B, image_size=224, patch_size=16, num_labels=1000),
    ),
    _entry(
        "beit-base-patch16-224",
        "microsoft/beit-base-patch16-224",
        "BeitForImageClassification",
        "beit",
        dict(
            **B,
            image_size=224,
            patch_size=16,
            num_labels=1000,
            use_relative_position_bias=True,
            use_mean_pooling=True,
            layer_scale_init_value=0.1,
            use_absolute_position_embeddings=False,
        ),
    ),
    _entry("dinov2-small", "facebook/dinov2-small", "Dinov2Model", "dinov2", _dinov2(S), image_size=224),
    _entry("dinov2-base", "facebook/dinov2-base", "Dinov2Model", "dinov2", _dinov2(B), image_size=224),
    _entry("dinov2-large", "facebook/dinov2-large", "Dinov2Model", "dinov2", _dinov2(L), image_size=224),
    _entry("dinov2-giant", "facebook/dinov2-giant", "Dinov2Model", "dinov2", _dinov2(G14), image_size=224),
    _entry(
        "dinov2-small-imagenet1k-1-layer",
        "facebook/dinov2-small-imagenet1k-1-layer",
        "Dinov2ForImageClassification",
        "dinov2",
        _dinov2(S, num_labels=1000),
        image_size=224,
    ),
    _entry(
        "dinov2-with-registers-small",
        "facebook/dinov2-with-registers-small",
        "Dinov2WithRegistersModel",
        "dinov2",
        _dinov2(S, num_register_tokens=4),
        image_size=224,
    ),
    _entry(
        "dinov2-with-registers-base",
        "facebook/dinov2-with-registers-base",
        "Dinov2WithRegistersModel",
        "dinov2",
        _dinov2(B, num_register_tokens=4),
        image_size=224,
    ),
    _entry(
        "dinov2-with-registers-large",
        "facebook/dinov2-with-registers-large",
        "Dinov2WithRegistersModel",
        "dinov2",
        _dinov2(L, num_register_tokens=4),
        image_size=224,
    ),
    _entry(
        "dinov2-with-registers-giant",
        "facebook/dinov2-with-registers-giant",
        "Dinov2WithRegistersModel",
        "dinov2",
        _dinov2(G14, num_register_tokens=4),
        image_size=224,
    ),
    _entry(
        "clip-vit-base-patch32",
        "openai/clip-vit-base-patch32",
        "CLIPVisionModelWithProjection",
        "clip",
        dict(**B, image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu"),
    ),
    _entry(
        "clip-vit-base-patch16",
        "openai/clip-vit-base-patch16",
        "CLIPVisionModelWithProjection",
        "clip",
        dict(**B, image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu"),
    ),
    _entry(
        "clip-vit-large-patch14",
        "openai/clip-vit-large-patch14",
        "CLIPVisionModelWithProjection",
        "clip",
        dict(**L, image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    ),
    _entry(
        "clip-vit-large-patch14-336",
        "openai/clip-vit-large-patch14-336",
        "CLIPVisionModelWithProjection",
        "clip",
        dict(**L, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    ),
    _entry(
        "clip-vit-h-14-laion2b-s32b-b79k",
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "CLIPVisionModelWithProjection",
        "clip",
        dict(**H, image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    ),
    _entry(
        "siglip-base-patch16-224",
        "google/siglip-base-patch16-224",
        "SiglipVisionModel",
        "siglip",
        dict(**B, image_size=224, patch_size=16),
    ),
    _entry(
        "siglip-large-patch16-256",
        "google/siglip-large-patch16-256",
        "SiglipVisionModel",
        "siglip",
        dict(**L, image_size=256, patch_size=16),
    ),
    _entry(
        "siglip-so400m-patch14-384",
        "google/siglip-so400m-patch14-384",
        "SiglipVisionModel",
        "siglip",
        dict(
            hidden_size=1152,
            num_hidden_layers=27,
            num_attention_heads=16,
            intermediate_size=4304,
            image_size=384,
            patch_size=14,
        ),
    ),
    _entry(
        "ijepa-vith14-1k", "facebook/ijepa_vith14_1k", "IJepaModel", "ijepa", dict(**H, image_size=224, patch_size=14)
    ),
]


def _videomae(size: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return dict(**size, image_size=224, patch_size=16, num_frames=16, tubelet_size=2, **extra)


VIDEOMAE_S = dict(S, num_attention_heads=16)  # the Hugging Face conversion of VideoMAE-S uses 16 heads

VIDEO = [
    _entry(
        "videomae-small-finetuned-kinetics",
        "MCG-NJU/videomae-small-finetuned-kinetics",
        "VideoMAEForVideoClassification",
        "videomae",
        _videomae(VIDEOMAE_S, num_labels=400),
        frames=16,
    ),
    _entry(
        "videomae-base",
        "MCG-NJU/videomae-base",
        "VideoMAEModel",
        "videomae",
        _videomae(B, use_mean_pooling=False),
        frames=16,
    ),
    _entry(
        "videomae-base-finetuned-kinetics",
        "MCG-NJU/videomae-base-finetuned-kinetics",
        "VideoMAEForVideoClassification",
        "videomae",
        _videomae(B, num_labels=400),
        frames=16,
    ),
    _entry(
        "videomae-base-finetuned-ssv2",
        "MCG-NJU/videomae-base-finetuned-ssv2",
        "VideoMAEForVideoClassification",
        "videomae",
        _videomae(B, num_labels=174),
        frames=16,
    ),
    _entry(
        "videomae-large",
        "MCG-NJU/videomae-large",
        "VideoMAEModel",
        "videomae",
        _videomae(L, use_mean_pooling=False),
        frames=16,
    ),
    _entry(
        "videomae-large-finetuned-kinetics",
        "MCG-NJU/videomae-large-finetuned-kinetics",
        "VideoMAEForVideoClassification",
        "videomae",
        _videomae(L, num_labels=400),
        frames=16,
    ),
    _entry(
        "videomae-huge-finetuned-kinetics",
        "MCG-NJU/videomae-huge-finetuned-kinetics",
        "VideoMAEForVideoClassification",
        "videomae",
        _videomae(H, num_labels=400),
        frames=16,
    ),
    _entry(
        "timesformer-base-finetuned-k400",
        "facebook/timesformer-base-finetuned-k400",
        "TimesformerForVideoClassification",
        "timesformer",
        dict(**B, image_size=224, patch_size=16, num_frames=8, num_labels=400),
        frames=8,
    ),
    _entry(
        "timesformer-base-finetuned-k600",
        "facebook/timesformer-base-finetuned-k600",
        "TimesformerForVideoClassification",
        "timesformer",
        dict(**B, image_size=224, patch_size=16, num_frames=8, num_labels=600),
        frames=8,
    ),
    _entry(
        "timesformer-base-finetuned-ssv2",
        "facebook/timesformer-base-finetuned-ssv2",
        "TimesformerForVideoClassification",
        "timesformer",
        dict(**B, image_size=224, patch_size=16, num_frames=8, num_labels=174),
        frames=8,
    ),
    _entry(
        "timesformer-hr-finetuned-k400",
        "facebook/timesformer-hr-finetuned-k400",
        "TimesformerForVideoClassification",
        "timesformer",
        dict(**B, image_size=448, patch_size=16, num_frames=16, num_labels=400),
        frames=16,
    ),
    _entry(
        "timesformer-large-finetuned-k400",
        "facebook/timesformer-large-finetuned-k400",
        "TimesformerForVideoClassification",
        "timesformer",
        dict(**B, image_size=224, patch_size=16, num_frames=96, num_labels=400),
        frames=96,
    ),
    _entry(
        "vivit-b-16x2-kinetics400",
        "google/vivit-b-16x2-kinetics400",
        "VivitForVideoClassification",
        "vivit",
        dict(**B, image_size=224, num_frames=32, tubelet_size=[2, 16, 16], hidden_act="gelu_fast", num_labels=400),
        frames=32,
    ),
    _entry(
        "vjepa2-vitl-fpc64-256",
        "facebook/vjepa2-vitl-fpc64-256",
        "VJEPA2Model",
        "vjepa2",
        _vjepa2(L, 256, 64),
        frames=64,
    ),
    _entry(
        "vjepa2-vith-fpc64-256",
        "facebook/vjepa2-vith-fpc64-256",
        "VJEPA2Model",
        "vjepa2",
        _vjepa2(H, 256, 64),
        frames=64,
    ),
    _entry(
        "vjepa2-vitg-fpc64-256",
        "facebook/vjepa2-vitg-fpc64-256",
        "VJEPA2Model",
        "vjepa2",
        _vjepa2(VJEPA2_G, 256, 64),
        frames=64,
    ),
    _entry(
        "vjepa2-vitg-fpc64-384",
        "facebook/vjepa2-vitg-fpc64-384",
        "VJEPA2Model",
        "vjepa2",
        _vjepa2(VJEPA2_G, 384, 64),
        frames=64,
    ),
    _entry(
        "vjepa2-vitl-fpc16-256-ssv2",
        "facebook/vjepa2-vitl-fpc16-256-ssv2",
        "VJEPA2ForVideoClassification",
        "vjepa2",
        _vjepa2(L, 256, 16, num_labels=174),
        frames=16,
    ),
    _entry(
        "vjepa2-vitl-fpc32-256-diving48",
        "facebook/vjepa2-vitl-fpc32-256-diving48",
        "VJEPA2ForVideoClassification",
        "vjepa2",
        _vjepa2(L, 256, 32, num_labels=48),
        frames=32,
    ),
    _entry(
        "vjepa2-vitg-fpc64-384-ssv2",
        "facebook/vjepa2-vitg-fpc64-384-ssv2",
        "VJEPA2ForVideoClassification",
        "vjepa2",
        _vjepa2(VJEPA2_G, 384, 64, num_labels=174),
        frames=64,
    ),
    _entry(
        "vjepa2-vitg-fpc32-384-diving48",
        "facebook/vjepa2-vitg-fpc32-384-diving48",
        "VJEPA2ForVideoClassification",
        "vjepa2",
        _vjepa2(VJEPA2_G, 384, 32, num_labels=48),
        frames=32,
    ),
]

ENTRIES: list[ModelEntry] = IMAGE + VIDEO
