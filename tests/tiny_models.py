"""Small random-weight models of every hooked-model adapter, shared by the contract test and the per-source tests.

`TIMM`, `OPEN_CLIP` and `HF` map a short kind to an inline `ModelEntry`; `load_model(entry, pretrained=False)`
builds it (seed 0). The multimodal language models are in `tests.lmm_tiny`.
"""

from __future__ import annotations

import torch

from prisma_ray.models import HookedVisionModel, ModelEntry, load_model


def small_entry(source, name: str, architecture: str, sizes: tuple[int, ...], config: dict, **fields) -> ModelEntry:
    """A small inline entry: `sizes` = (layers, width, heads, image_size, patch_size)."""
    layers, width, heads, image_size, patch_size = sizes
    return ModelEntry(
        name=name,
        source=source,
        architecture=architecture,
        family=fields.pop("family", "test"),
        layers=layers,
        width=width,
        heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        config=config,
        **fields,
    )


def timm_entry(kind: str, architecture: str, sizes: tuple[int, int, int, int, int]) -> ModelEntry:
    """A small timm ViT with 10 classes."""
    layers, width, heads, image_size, patch_size = sizes
    config = dict(img_size=image_size, patch_size=patch_size, depth=layers, embed_dim=width, num_heads=heads)
    return small_entry("timm", f"tiny-timm-{kind}", architecture, sizes, {**config, "num_classes": 10})


TIMM = {
    "vit": timm_entry("vit", "vit_tiny_patch16_224", (3, 48, 3, 32, 8)),
    "vit-reg": timm_entry("vit-reg", "vit_small_patch14_reg4_dinov2", (2, 48, 2, 28, 14)),
    "deit-distilled": timm_entry("deit-distilled", "deit_tiny_distilled_patch16_224", (2, 48, 3, 32, 8)),
    "eva02": timm_entry("eva02", "eva02_tiny_patch14_224", (2, 48, 3, 28, 14)),
    "beit": timm_entry("beit", "beit_base_patch16_224", (2, 48, 3, 32, 8)),
    "siglip": timm_entry("siglip", "vit_base_patch16_siglip_224", (2, 48, 3, 32, 8)),
}


def open_clip_entry(name, architecture, tag, vision_cfg, sizes, **config) -> ModelEntry:
    """A small OpenCLIP tower: `vision_cfg` overrides the architecture's vision config."""
    return small_entry("open_clip", name, architecture, sizes, {"vision_cfg": vision_cfg, **config}, pretrained=tag)


NATIVE = dict(layers=2, width=64, head_width=32, image_size=32, patch_size=8)
OPEN_CLIP = {
    "native": open_clip_entry("native", "ViT-B-32-quickgelu", "openai", NATIVE, (2, 64, 2, 32, 8), embed_dim=32),
    "clipa": open_clip_entry(  # no ln_pre, average pool, ln_post after pooling; plus LayerScale
        "clipa",
        "ViT-L-14-CLIPA",
        "datacomp1b",
        {**NATIVE, "layers": 3, "ls_init_value": 0.5},
        (3, 64, 2, 32, 8),
        embed_dim=32,
    ),
    "coca": open_clip_entry(  # attentional pooler, (pooled, tokens) output
        "coca",
        "coca_ViT-B-32",
        "laion2b_s13b_b90k",
        {**NATIVE, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
        (2, 64, 2, 32, 8),
        embed_dim=32,
    ),
    "custom": open_clip_entry(  # CustomResidualAttentionBlock with OpenCLIP's own Attention
        "custom", "ViT-B-32", "laion2b_s34b_b79k", {**NATIVE, "qk_norm": True}, (2, 64, 2, 32, 8), embed_dim=32
    ),
    "siglip-timm": open_clip_entry(  # SigLIP's TimmModel (MAP pooling, no projection) over timm's tiny test_vit
        "siglip-timm",
        "ViT-B-16-SigLIP",
        "webli",
        {"timm_model_name": "test_vit", "image_size": 160},
        (6, 64, 2, 160, 16),
    ),
    "eva02-timm": open_clip_entry(
        "eva02-timm",
        "EVA02-B-16",
        "merged2b_s8b_b131k",
        {"timm_model_name": "eva02_tiny_patch14_224"},
        (12, 192, 3, 224, 14),
        embed_dim=32,
    ),
}

HF_TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
IMG = dict(image_size=32, patch_size=8)
NO_MLP = {k: v for k, v in HF_TINY.items() if k != "intermediate_size"}
VJEPA2 = dict(
    **NO_MLP,
    patch_size=8,
    tubelet_size=2,
    crop_size=32,
    frames_per_clip=4,
    pred_hidden_size=16,
    pred_num_attention_heads=2,
    pred_num_hidden_layers=1,
    num_pooler_layers=1,
)


def hf_entry(architecture: str, family: str, config: dict, frames: int | None = None) -> ModelEntry:
    """A tiny Hugging Face model of 32 px images (8 px patches), a video model when it has `frames`."""
    sizes = (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"], 32, 8)
    modality = "video" if frames else "image"
    return small_entry(
        "hf", f"tiny-{architecture}", architecture, sizes, config, family=family, modality=modality, frames=frames
    )


HF = [
    hf_entry("ViTForImageClassification", "vit", dict(**HF_TINY, **IMG, num_labels=5)),
    hf_entry("ViTModel", "vit", dict(**HF_TINY, **IMG)),
    hf_entry("DeiTForImageClassificationWithTeacher", "deit", dict(**HF_TINY, **IMG, num_labels=5)),
    hf_entry(
        "BeitForImageClassification", "beit", dict(**HF_TINY, **IMG, num_labels=5, use_relative_position_bias=True)
    ),
    hf_entry("Dinov2Model", "dinov2", dict(**NO_MLP, **IMG)),
    hf_entry("Dinov2WithRegistersModel", "dinov2", dict(**NO_MLP, **IMG, num_register_tokens=2, use_swiglu_ffn=True)),
    hf_entry("CLIPVisionModelWithProjection", "clip", dict(**HF_TINY, **IMG, projection_dim=16)),
    hf_entry("SiglipVisionModel", "siglip", dict(**HF_TINY, **IMG)),
    hf_entry("IJepaModel", "ijepa", dict(**HF_TINY, **IMG)),
    hf_entry("VideoMAEForVideoClassification", "videomae", dict(**HF_TINY, **IMG, num_frames=4, num_labels=5), 4),
    hf_entry("VideoMAEModel", "videomae", dict(**HF_TINY, **IMG, num_frames=4, use_mean_pooling=False), 4),
    hf_entry("TimesformerForVideoClassification", "timesformer", dict(**HF_TINY, **IMG, num_frames=4, num_labels=5), 4),
    hf_entry(
        "VivitForVideoClassification",
        "vivit",
        dict(**HF_TINY, image_size=32, num_frames=4, tubelet_size=[2, 8, 8], num_labels=5),
        4,
    ),
    hf_entry("VJEPA2Model", "vjepa2", VJEPA2, 4),
    hf_entry("VJEPA2ForVideoClassification", "vjepa2", dict(VJEPA2, num_labels=5), 4),
]
WITHOUT_PATTERN = {"TimesformerForVideoClassification"}  # HF architectures whose attention exposes no pattern


def tiny(entry: ModelEntry) -> HookedVisionModel:
    """`entry`'s hooked model with random weights from seed 0."""
    return load_model(entry, pretrained=False, seed=0)


def batch(model: HookedVisionModel, n: int = 2, seed: int = 1) -> torch.Tensor:
    """`n` random inputs of the model's input shape (fixed seed)."""
    return torch.randn(n, *model.preprocess.input_shape(), generator=torch.Generator().manual_seed(seed))


def read_only_names(model: HookedVisionModel) -> list[str]:
    """Every hook point whose reading leaves the computation as it is (attention patterns, and per-head points
    that switch the attention to its explicit path, excluded)."""
    return [n for n in model.hook_names if not n.endswith("hook_pattern") and model.read_is_exact(n)]


# The small models of the pipeline tests (extraction, evaluation, the sweep), as the plain dicts job configs take.
def tiny_vit(
    name: str = "test-vit-tiny",
    architecture: str = "vit_tiny_patch16_224",
    family: str = "vit",
    image_size: int = 32,
    patch_size: int = 8,
    **timm_config,
) -> dict:
    """A timm ViT of 2 blocks of width 32 (2 heads); `timm_config` adds to timm's model kwargs."""
    timm = dict(img_size=image_size, patch_size=patch_size, depth=2, embed_dim=32, num_heads=2, **timm_config)
    sizes = dict(layers=2, width=32, heads=2, image_size=image_size, patch_size=patch_size)
    return dict(name=name, source="timm", architecture=architecture, family=family, **sizes, config=timm)


def tiny_videomae(name: str, architecture: str, **hf_config) -> dict:
    """A VideoMAE of 2 layers of width 32 (2 heads) on 4-frame clips of 32 px, 8 px patches, tubelets of 2."""
    sizes = dict(layers=2, width=32, heads=2, image_size=32, patch_size=8)
    hf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)
    hf.update(patch_size=8, num_frames=4, tubelet_size=2, **hf_config)
    return dict(
        name=name,
        source="hf",
        architecture=architecture,
        family="videomae",
        modality="video",
        frames=4,
        **sizes,
        config=hf,
    )
