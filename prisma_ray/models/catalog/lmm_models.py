"""Multimodal language model registry entries (`source="hf-lmm"`, `modality="multimodal"`).

The shape fields describe the vision tower (`blocks.*`); `config` holds the config-class kwargs
of the hub model, so that `pretrained=False` builds the same shapes offline. The registry name
follows from the hub id (`hf_name`); the model class is `<prefix>ForConditionalGeneration`.
"""

from typing import Any

from ..registry import ModelEntry
from . import catalog_entry, hf_name

Config = dict[str, Any]

ANYRES_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ANYRES_384 = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]


def _entry(hub: str, prefix: str, family: str, shape: tuple[int, ...], config: Config) -> ModelEntry:
    """A `<prefix>ForConditionalGeneration` entry; `shape`: the vision tower's (layers, width, heads, image, patch)."""
    architecture = f"{prefix}ForConditionalGeneration"
    return catalog_entry("hf-lmm", hf_name(hub), architecture, hub, family, shape, modality="multimodal", config=config)


def _text(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int, **extra: Any) -> Config:
    """A language model's config kwargs (`text_config`)."""
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads)
    return dict(**sizes, intermediate_size=mlp, vocab_size=vocab, **extra)


QWEN_VISION = (32, 1280, 16, 448, 14)
QWEN_ROPE = dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6)
QWEN_PATCHES = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN_WINDOWS = dict(window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
QWEN_TOKENS = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
)


def _qwen(hub: str, prefix: str, sizes: tuple[int, ...], vision: Config) -> ModelEntry:
    """A Qwen2-VL-style model: language model `sizes` (hidden, layers, heads, kv_heads, mlp), vision tower `vision`."""
    config = dict(text_config=_text(*sizes, 151936, rope_parameters=QWEN_ROPE), vision_config=vision, **QWEN_TOKENS)
    return _entry(hub, prefix, "qwen2-vl", QWEN_VISION, config)


def _qwen2_vl(hub: str, *sizes: int) -> ModelEntry:
    """A Qwen2-VL model; `sizes` are its language model's (hidden, layers, heads, kv_heads, mlp)."""
    vision = dict(depth=32, embed_dim=1280, hidden_size=sizes[0], num_heads=16, mlp_ratio=4, **QWEN_PATCHES)
    return _qwen(hub, "Qwen2VL", sizes, vision)


def _qwen2_5_vl(hub: str, *sizes: int) -> ModelEntry:
    """A Qwen2.5-VL model (windowed attention vision tower); `sizes` as for `_qwen2_vl`."""
    tower = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=sizes[0])
    return _qwen(hub, "Qwen2_5_VL", sizes, dict(**tower, **QWEN_PATCHES, **QWEN_WINDOWS))


def _llava(hub: str, prefix: str, family: str, config: Config) -> ModelEntry:
    """A LLaVA model: the shape fields are read off its `vision_config`."""
    v = config["vision_config"]
    shape = (v["num_hidden_layers"], v["hidden_size"], v["num_attention_heads"], v["image_size"], v["patch_size"])
    return _entry(hub, prefix, family, shape, config)


SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)
SIGLIP_SO400M = dict(model_type="siglip_vision_model", **SO400M, image_size=384, patch_size=14)
CLIP_L336_TOWER = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336
)
CLIP_L336 = dict(
    model_type="clip_vision_model", **CLIP_L336_TOWER, patch_size=14, projection_dim=768, hidden_act="quick_gelu"
)
LLAVA_OV_QWEN2_0_5B = dict(
    vision_config=SIGLIP_SO400M,
    text_config={"model_type": "qwen2", **_text(896, 24, 14, 2, 4864, 152000)},
    image_token_index=151646,
    video_token_index=151647,
    image_grid_pinpoints=ANYRES_384,
    vision_feature_layer=-1,
    vision_feature_select_strategy="full",
    vision_aspect_ratio="anyres_max_9",
)
LLAVA_NEXT_MISTRAL_7B = dict(
    vision_config=CLIP_L336,
    text_config={"model_type": "mistral", **_text(4096, 32, 32, 8, 14336, 32064)},
    image_token_index=32000,
    image_grid_pinpoints=ANYRES_336,
)

ENTRIES: list[ModelEntry] = [
    _qwen2_vl("Qwen/Qwen2-VL-2B-Instruct", 1536, 28, 12, 2, 8960),
    _qwen2_vl("Qwen/Qwen2-VL-7B-Instruct", 3584, 28, 28, 4, 18944),
    _qwen2_5_vl("Qwen/Qwen2.5-VL-3B-Instruct", 2048, 36, 16, 2, 11008),
    _qwen2_5_vl("Qwen/Qwen2.5-VL-7B-Instruct", 3584, 28, 28, 4, 18944),
    _llava("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "LlavaOnevision", "llava-onevision", LLAVA_OV_QWEN2_0_5B),
    _llava("llava-hf/llava-v1.6-mistral-7b-hf", "LlavaNext", "llava-next", LLAVA_NEXT_MISTRAL_7B),
]
