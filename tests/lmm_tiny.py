"""Tiny random multimodal language models of every supported architecture, built offline."""

import torch

from prisma_ray.models import HookedVisionModel, ModelEntry, load_model

IMAGE_ID, VIDEO_ID = 100, 101
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TEXT["vocab_size"] = 300
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
TINY_VISION.update(image_size=28, patch_size=14)
PINPOINTS = [[28, 28], [28, 56]]
QWEN_TEXT = dict(TEXT, rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1e4))
QWEN_TOKENS = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=102, vision_end_token_id=103)
QWEN_VISION = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN2_VISION = dict(QWEN_VISION, embed_dim=16, hidden_size=32, mlp_ratio=2)
QWEN25_VISION = dict(QWEN_VISION, hidden_size=16, intermediate_size=32, out_hidden_size=32, window_size=56)
QWEN25_VISION["fullatt_block_indexes"] = [1]
LLAVA_OV_VISION = dict(TINY_VISION, model_type="siglip_vision_model")
LLAVA_NEXT_VISION = dict(TINY_VISION, model_type="clip_vision_model", projection_dim=16)
LLAVA_IDS = dict(image_token_index=IMAGE_ID, image_grid_pinpoints=PINPOINTS)
QWEN2_VL = dict(text_config=QWEN_TEXT, vision_config=QWEN2_VISION, **QWEN_TOKENS)
QWEN25_VL = dict(text_config=QWEN_TEXT, vision_config=QWEN25_VISION, **QWEN_TOKENS)
LLAVA_OV = dict(vision_config=LLAVA_OV_VISION, text_config=dict(TEXT, model_type="qwen2"), **LLAVA_IDS)
LLAVA_OV.update(video_token_index=VIDEO_ID, vision_feature_layer=-1, vision_feature_select_strategy="full")
LLAVA_NEXT = dict(vision_config=LLAVA_NEXT_VISION, text_config=dict(TEXT, model_type="llama"), **LLAVA_IDS)

CONFIGS = {  # name: (family, architecture, config)
    "qwen2-vl": ("qwen2-vl", "Qwen2VLForConditionalGeneration", QWEN2_VL),
    "qwen2.5-vl": ("qwen2-vl", "Qwen2_5_VLForConditionalGeneration", QWEN25_VL),
    "llava-onevision": ("llava-onevision", "LlavaOnevisionForConditionalGeneration", LLAVA_OV),
    "llava-next": ("llava-next", "LlavaNextForConditionalGeneration", LLAVA_NEXT),
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
    """The tiny `name` model with random weights from seed 0."""
    return load_model(tiny_entry(name), pretrained=False, seed=0)


def prompt(n_image_tokens: int) -> torch.Tensor:
    return torch.tensor([[1, 2] + [IMAGE_ID] * n_image_tokens + [3, 4, 5]])


def inputs(family: str) -> tuple[dict, int, tuple[int, int]]:
    """One small image plus a short prompt; also the number of image tokens and the base-view grid."""
    torch.manual_seed(1)
    if family.startswith("qwen"):  # 4x4 patches of 14 px, merged 2x2 -> 2x2 image tokens
        ids = prompt(4)
        pixels = dict(pixel_values=torch.randn(16, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 4, 4]]))
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels), 4, (2, 2)
    # a 28x56 image: base view 2x2 + crops 2x4 with a newline per row
    ids = prompt(4 + 2 * (4 + 1))
    pixels = dict(pixel_values=torch.randn(1, 3, 3, 28, 28), image_sizes=torch.tensor([[28, 56]]))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels), 14, (2, 2)
