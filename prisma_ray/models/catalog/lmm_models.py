"""Multimodal language model registry entries (`source="hf-lmm"`, `modality="multimodal"`).

The shape fields describe the vision tower (`blocks.*`); `config` holds the config-class kwargs
of the hub model, so that `pretrained=False` builds the same shapes offline.
"""

from typing import Any

from ..registry import ModelEntry

ANYRES_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ANYRES_384 = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]


def _entry(
    name: str, hub: str, architecture: str, family: str, vision: dict[str, Any], config: dict[str, Any]
) -> ModelEntry:
    return ModelEntry(
        name=f"hf-{name}",
        source="hf-lmm",
        architecture=architecture,
        pretrained=hub,
        family=family,
        modality="multimodal",
        layers=vision["layers"],
        width=vision["width"],
        heads=vision["heads"],
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        config=config,
    )


def _qwen2_vl(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> dict[str, Any]:
    return dict(
        text_config=dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=mlp,
            vocab_size=151936,
            rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6),
        ),
        vision_config=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=hidden,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )


def _qwen2_5_vl(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> dict[str, Any]:
    config = _qwen2_vl(hidden, layers, heads, kv_heads, mlp)
    config["vision_config"] = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
    )
    return config


QWEN_VISION = dict(layers=32, width=1280, heads=16, image_size=448, patch_size=14)
SIGLIP_SO400M = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
CLIP_L336 = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)

ENTRIES: list[ModelEntry] = [
    _entry(
        "qwen2-vl-2b-instruct",
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen2VLForConditionalGeneration",
        "qwen2-vl",
        QWEN_VISION,
        _qwen2_vl(1536, 28, 12, 2, 8960),
    ),
    _entry(
        "qwen2-vl-7b-instruct",
        "Qwen/Qwen2-VL-7B-Instruct",
        "Qwen2VLForConditionalGeneration",
        "qwen2-vl",
        QWEN_VISION,
        _qwen2_vl(3584, 28, 28, 4, 18944),
    ),
    _entry(
        "qwen2.5-vl-3b-instruct",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen2_5_VLForConditionalGeneration",
        "qwen2-vl",
        QWEN_VISION,
        _qwen2_5_vl(2048, 36, 16, 2, 11008),
    ),
    _entry(
        "qwen2.5-vl-7b-instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen2_5_VLForConditionalGeneration",
        "qwen2-vl",
        QWEN_VISION,
        _qwen2_5_vl(3584, 28, 28, 4, 18944),
    ),
    _entry(
        "llava-onevision-qwen2-0.5b-ov",
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        "LlavaOnevisionForConditionalGeneration",
        "llava-onevision",
        dict(layers=26, width=1152, heads=16, image_size=384, patch_size=14),
        dict(
            vision_config=SIGLIP_SO400M,
            text_config=dict(
                model_type="qwen2",
                hidden_size=896,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                intermediate_size=4864,
                vocab_size=152000,
            ),
            image_token_index=151646,
            video_token_index=151647,
            image_grid_pinpoints=ANYRES_384,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        ),
    ),
    _entry(
        "llava-v1.6-mistral-7b",
        "llava-hf/llava-v1.6-mistral-7b-hf",
        "LlavaNextForConditionalGeneration",
        "llava-next",
        dict(layers=24, width=1024, heads=16, image_size=336, patch_size=14),
        dict(
            vision_config=CLIP_L336,
            text_config=dict(
                model_type="mistral",
                hidden_size=4096,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                intermediate_size=14336,
                vocab_size=32064,
            ),
            image_token_index=32000,
            image_grid_pinpoints=ANYRES_336,
        ),
    ),
]
