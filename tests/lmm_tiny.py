"""Tiny random multimodal language models of every supported architecture, built offline."""

import torch

from prisma_ray.models import HookedVisionModel, ModelEntry
from prisma_ray.models.adapters.lmm_adapter import build

IMAGE_ID, VIDEO_ID = 100, 101
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
)
TINY_VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
)
PINPOINTS = [[28, 28], [28, 56]]
QWEN_TEXT = dict(TEXT, rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1e4))
QWEN_TOKENS = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=102, vision_end_token_id=103)

CONFIGS = {
    "qwen2-vl": (
        "qwen2-vl",
        "Qwen2VLForConditionalGeneration",
        dict(
            text_config=QWEN_TEXT,
            vision_config=dict(
                depth=2,
                embed_dim=16,
                hidden_size=32,
                num_heads=2,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            **QWEN_TOKENS,
        ),
    ),
    "qwen2.5-vl": (
        "qwen2-vl",
        "Qwen2_5_VLForConditionalGeneration",
        dict(
            text_config=QWEN_TEXT,
            vision_config=dict(
                depth=2,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[1],
            ),
            **QWEN_TOKENS,
        ),
    ),
    "llava-onevision": (
        "llava-onevision",
        "LlavaOnevisionForConditionalGeneration",
        dict(
            vision_config=dict(TINY_VISION, model_type="siglip_vision_model"),
            text_config=dict(TEXT, model_type="qwen2"),
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        ),
    ),
    "llava-next": (
        "llava-next",
        "LlavaNextForConditionalGeneration",
        dict(
            vision_config=dict(TINY_VISION, model_type="clip_vision_model", projection_dim=16),
            text_config=dict(TEXT, model_type="llama"),
            image_token_index=IMAGE_ID,
            image_grid_pinpoints=PINPOINTS,
        ),
    ),
}


def tiny_entry(name: str) -> ModelEntry:
    """The registry entry of a tiny `name` model: LLaVA takes 28 px images (2x2 patches of 14 px), Qwen 56 px
    ones (4x4 patches, merged 2x2 into 2x2 image tokens)."""
    family, architecture, config = CONFIGS[name]
    size = 56 if family == "qwen2-vl" else 28
    return ModelEntry(
        name=f"tiny-{name}",
        source="hf-lmm",
        architecture=architecture,
        family=family,
        modality="multimodal",
        layers=2,
        width=16,
        heads=2,
        image_size=size,
        patch_size=14,
        config=config,
    )


def tiny(name: str) -> HookedVisionModel:
    entry = tiny_entry(name)
    torch.manual_seed(0)
    return HookedVisionModel(build(entry, pretrained=False), entry.name).eval()
