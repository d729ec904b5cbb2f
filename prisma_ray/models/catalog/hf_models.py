"""Hugging Face `transformers` registry entries (`source="hf"`): hub id plus the config-class kwargs
of the hub model's architecture, so that `pretrained=False` builds the same shapes offline.

One helper a family: the registry name follows from the hub id (`hf_name`) and, for most families,
the model class from whether the config sets `num_labels` (`<prefix>For{Image,Video}Classification`,
else `<prefix>Model`).
`image_size` and `frames` are the model's input (after preprocessing); `config["image_size"]` is
the config's own value, which differs for DINOv2 (position embeddings for 518 px, run at 224 px).
"""

from typing import Any

from ..registry import ModelEntry
from . import catalog_entry, hf_name

Config = dict[str, Any]

TI = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
H = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120)
SO400M = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304)
G14 = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True)
VJEPA2_G = dict(hidden_size=1408, num_hidden_layers=40, num_attention_heads=22, mlp_ratio=48 / 11)
VIDEOMAE_S = dict(S, num_attention_heads=16)  # the Hugging Face conversion of VideoMAE-S uses 16 heads
BEIT = dict(
    use_relative_position_bias=True,
    use_mean_pooling=True,
    layer_scale_init_value=0.1,
    use_absolute_position_embeddings=False,
)
VIVIT = dict(**B, image_size=224, num_frames=32, tubelet_size=[2, 16, 16], hidden_act="gelu_fast", num_labels=400)


def _entry(
    hub: str, architecture: str, family: str, config: Config, image_size: int | None = None, frames: int | None = None
) -> ModelEntry:
    """An entry whose shape fields are read off the config kwargs."""
    size = image_size or config.get("image_size") or config["crop_size"]
    patch = config.get("patch_size") or config["tubelet_size"][1]
    shape = (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"], size, patch)
    fields = dict(modality="video" if frames else "image", frames=frames, config=config)
    return catalog_entry("hf", hf_name(hub), architecture, hub, family, shape, **fields)


def _cls(prefix: str, config: Config, task: str = "Image") -> str:
    """`<prefix>For<task>Classification` when the config sets `num_labels`, else `<prefix>Model`."""
    return f"{prefix}For{task}Classification" if "num_labels" in config else f"{prefix}Model"


def _image(hub: str, prefix: str, family: str, size: Config, image: int, patch: int, **extra: Any) -> ModelEntry:
    """An image model whose config is `size` at `image` px in `patch` px patches, plus `extra`."""
    config = dict(**size, image_size=image, patch_size=patch, **extra)
    return _entry(hub, _cls(prefix, config), family, config)


def _vit(hub: str, size: Config, image: int, patch: int, **extra: Any) -> ModelEntry:
    """A ViT (`ViTForImageClassification` with `num_labels`, else `ViTModel`)."""
    return _image(hub, "ViT", "vit", size, image, patch, **extra)


def _deit(hub: str, size: Config, architecture: str = "ViTForImageClassification") -> ModelEntry:
    """A DeiT ImageNet-1k classifier at 224 px, 16 px patches."""
    return _entry(hub, architecture, "deit", dict(**size, image_size=224, patch_size=16, num_labels=1000))


def _dinov2(hub: str, size: Config, **extra: Any) -> ModelEntry:
    """DINOv2 run at 224 px: MLP width is `mlp_ratio * hidden_size` (SwiGLU for the giant); registers: own class."""
    layers = {k: v for k, v in size.items() if k != "intermediate_size"}
    config = dict(**layers, image_size=518, patch_size=14, layer_norm_eps=1e-6, **extra)
    prefix = "Dinov2WithRegisters" if "num_register_tokens" in extra else "Dinov2"
    return _entry(hub, _cls(prefix, config), "dinov2", config, image_size=224)


def _clip(hub: str, size: Config, image: int, patch: int, projection: int, act: str = "quick_gelu") -> ModelEntry:
    """A CLIP vision tower with its projection."""
    config = dict(**size, image_size=image, patch_size=patch, projection_dim=projection, hidden_act=act)
    return _entry(hub, "CLIPVisionModelWithProjection", "clip", config)


def _siglip(hub: str, size: Config, image: int, patch: int) -> ModelEntry:
    """A SigLIP vision tower."""
    return _image(hub, "SiglipVision", "siglip", size, image, patch)


IMAGE = [
    _vit("google/vit-base-patch16-224", B, 224, 16, num_labels=1000),
    _vit("google/vit-base-patch16-384", B, 384, 16, num_labels=1000),
    _vit("google/vit-large-patch16-224", L, 224, 16, num_labels=1000),
    _vit("google/vit-base-patch16-224-in21k", B, 224, 16),
    _vit("google/vit-huge-patch14-224-in21k", H, 224, 14),
    _deit("facebook/deit-tiny-patch16-224", TI),
    _deit("facebook/deit-small-patch16-224", S),
    _deit("facebook/deit-base-patch16-224", B),
    _deit("facebook/deit-base-distilled-patch16-224", B, "DeiTForImageClassificationWithTeacher"),
    _image("microsoft/beit-base-patch16-224", "Beit", "beit", B, 224, 16, num_labels=1000, **BEIT),
    _dinov2("facebook/dinov2-small", S),
    _dinov2("facebook/dinov2-base", B),
    _dinov2("facebook/dinov2-large", L),
    _dinov2("facebook/dinov2-giant", G14),
    _dinov2("facebook/dinov2-small-imagenet1k-1-layer", S, num_labels=1000),
    _dinov2("facebook/dinov2-with-registers-small", S, num_register_tokens=4),
    _dinov2("facebook/dinov2-with-registers-base", B, num_register_tokens=4),
    _dinov2("facebook/dinov2-with-registers-large", L, num_register_tokens=4),
    _dinov2("facebook/dinov2-with-registers-giant", G14, num_register_tokens=4),
    _clip("openai/clip-vit-base-patch32", B, 224, 32, 512),
    _clip("openai/clip-vit-base-patch16", B, 224, 16, 512),
    _clip("openai/clip-vit-large-patch14", L, 224, 14, 768),
    _clip("openai/clip-vit-large-patch14-336", L, 336, 14, 768),
    _clip("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", H, 224, 14, 1024, act="gelu"),
    _siglip("google/siglip-base-patch16-224", B, 224, 16),
    _siglip("google/siglip-large-patch16-256", L, 256, 16),
    _siglip("google/siglip-so400m-patch14-384", SO400M, 384, 14),
    _image("facebook/ijepa_vith14_1k", "IJepa", "ijepa", H, 224, 14),
]


def _videomae(hub: str, size: Config, **extra: Any) -> ModelEntry:
    """VideoMAE on 16 frames of 224 px, 16 px patches, tubelets of 2 frames."""
    config = dict(**size, image_size=224, patch_size=16, num_frames=16, tubelet_size=2, **extra)
    return _entry(hub, _cls("VideoMAE", config, "Video"), "videomae", config, frames=16)


def _timesformer(hub: str, image: int, frames: int, labels: int) -> ModelEntry:
    """A base-size TimeSformer classifier on `frames` frames of `image` px."""
    config = dict(**B, image_size=image, patch_size=16, num_frames=frames, num_labels=labels)
    return _entry(hub, "TimesformerForVideoClassification", "timesformer", config, frames=frames)


def _vjepa2(hub: str, size: Config, crop: int, frames: int, **extra: Any) -> ModelEntry:
    """V-JEPA 2 on `frames` frames of `crop` px, 16 px patches, tubelets of 2 frames."""
    layers = {k: v for k, v in size.items() if k != "intermediate_size"}
    config = dict(**layers, patch_size=16, tubelet_size=2, crop_size=crop, frames_per_clip=frames, **extra)
    return _entry(hub, _cls("VJEPA2", config, "Video"), "vjepa2", config, frames=frames)


VIDEO = [
    _videomae("MCG-NJU/videomae-small-finetuned-kinetics", VIDEOMAE_S, num_labels=400),
    _videomae("MCG-NJU/videomae-base", B, use_mean_pooling=False),
    _videomae("MCG-NJU/videomae-base-finetuned-kinetics", B, num_labels=400),
    _videomae("MCG-NJU/videomae-base-finetuned-ssv2", B, num_labels=174),
    _videomae("MCG-NJU/videomae-large", L, use_mean_pooling=False),
    _videomae("MCG-NJU/videomae-large-finetuned-kinetics", L, num_labels=400),
    _videomae("MCG-NJU/videomae-huge-finetuned-kinetics", H, num_labels=400),
    _timesformer("facebook/timesformer-base-finetuned-k400", 224, 8, 400),
    _timesformer("facebook/timesformer-base-finetuned-k600", 224, 8, 600),
    _timesformer("facebook/timesformer-base-finetuned-ssv2", 224, 8, 174),
    _timesformer("facebook/timesformer-hr-finetuned-k400", 448, 16, 400),
    _timesformer("facebook/timesformer-large-finetuned-k400", 224, 96, 400),
    _entry("google/vivit-b-16x2-kinetics400", "VivitForVideoClassification", "vivit", VIVIT, frames=32),
    _vjepa2("facebook/vjepa2-vitl-fpc64-256", L, 256, 64),
    _vjepa2("facebook/vjepa2-vith-fpc64-256", H, 256, 64),
    _vjepa2("facebook/vjepa2-vitg-fpc64-256", VJEPA2_G, 256, 64),
    _vjepa2("facebook/vjepa2-vitg-fpc64-384", VJEPA2_G, 384, 64),
    _vjepa2("facebook/vjepa2-vitl-fpc16-256-ssv2", L, 256, 16, num_labels=174),
    _vjepa2("facebook/vjepa2-vitl-fpc32-256-diving48", L, 256, 32, num_labels=48),
    _vjepa2("facebook/vjepa2-vitg-fpc64-384-ssv2", VJEPA2_G, 384, 64, num_labels=174),
    _vjepa2("facebook/vjepa2-vitg-fpc32-384-diving48", VJEPA2_G, 384, 32, num_labels=48),
]

ENTRIES: list[ModelEntry] = IMAGE + VIDEO
