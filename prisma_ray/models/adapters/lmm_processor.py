"""The processor of a multimodal language model: images and prompts -> its input tensors.

`pretrained=True` loads the hub processor (tokenizer, chat template, image processor). Random-weight
models get an offline processor of the same family built from the model's config: the family's
image processor at the vision tower's nominal size, a byte-level tokenizer whose special tokens
(image, video, vision start/end) sit at the config's ids, and a plain chat template. Both expand each
image placeholder into as many image tokens as the vision tower yields, the way the hub one does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prisma_ray.errors import InvalidRequest

from ..registry import ModelEntry

Encode = Callable[[Sequence[np.ndarray], Sequence[str]], dict[str, torch.Tensor]]

PLAIN_TEMPLATE = (
    "{%- for message in messages -%}{{ message.role }}: "
    "{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}IMAGE{%- elif part.type == 'video' -%}VIDEO"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor %}\n{% endfor -%}{%- if add_generation_prompt -%}assistant:{%- endif -%}"
)


def byte_tokenizer(special: dict[str, int], pad: str, vocab_size: int):
    """A byte-level tokenizer (one token per UTF-8 byte) with `special` tokens at the given ids and `pad` on a free id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    free = [i for i in range(vocab_size) if i not in set(special.values())]
    if len(free) < len(alphabet) + 1:
        raise InvalidRequest(
            f"an offline byte-level tokenizer needs {len(alphabet) + 1 + len(special)} token ids but the language "
            f"model's vocab_size is {vocab_size}; raise text_config.vocab_size"
        )
    if max(special.values()) >= vocab_size:
        raise InvalidRequest(f"special token ids {special} do not fit the language model's vocab_size {vocab_size}")
    vocab = dict(zip(alphabet, free))
    vocab.update(special)
    vocab[pad] = free[len(alphabet)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([*special, pad])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad)


def _qwen(config: Any, size: int, norm: dict) -> Any:
    import transformers as tf

    vision = config.vision_config
    patches = dict(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
    )
    pixels = {"shortest_edge": size * size, "longest_edge": size * size}
    images = tf.Qwen2VLImageProcessor(size=pixels, image_mean=norm["mean"], image_std=norm["std"], **patches)
    videos = tf.Qwen2VLVideoProcessor(
        size=pixels, image_mean=norm["mean"], image_std=norm["std"], cap_pixels_per_frame=False, **patches
    )
    special = {
        "<|image_pad|>": config.image_token_id,
        "<|video_pad|>": config.video_token_id,
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
    }
    tokenizer = byte_tokenizer(special, "<|endoftext|>", config.text_config.vocab_size)
    template = PLAIN_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>").replace(
        "VIDEO", "<|vision_start|><|video_pad|><|vision_end|>"
    )
    return tf.Qwen2VLProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=template
    )


def _llava_template() -> str:
    return PLAIN_TEMPLATE.replace("IMAGE", "<image>\n").replace("VIDEO", "<video>\n")


def _llava_tokenizer(config: Any, video: bool) -> Any:
    special = {"<image>": config.image_token_id}
    if video:
        special["<video>"] = config.video_token_id
    return byte_tokenizer(special, "<pad>", config.text_config.vocab_size)


def _llava_next(config: Any, size: int, norm: dict) -> Any:
    import transformers as tf

    vision = config.vision_config
    images = tf.LlavaNextImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=norm["mean"],
        image_std=norm["std"],
    )
    return tf.LlavaNextProcessor(
        image_processor=images,
        tokenizer=_llava_tokenizer(config, video=False),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(vision.model_type == "clip_vision_model"),
        chat_template=_llava_template(),
    )


def _llava_onevision(config: Any, size: int, norm: dict) -> Any:
    import transformers as tf

    vision = config.vision_config
    kwargs = dict(image_mean=norm["mean"], image_std=norm["std"])
    images = tf.LlavaOnevisionImageProcessor(
        size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints, **kwargs
    )
    return tf.LlavaOnevisionProcessor(
        image_processor=images,
        tokenizer=_llava_tokenizer(config, video=True),
        video_processor=tf.LlavaOnevisionVideoProcessor(**kwargs),
        num_image_tokens=(size // vision.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=_llava_template(),
    )


OFFLINE = {"qwen2-vl": _qwen, "llava-next": _llava_next, "llava-onevision": _llava_onevision}


def build_processor(model: nn.Module, entry: ModelEntry, pretrained: bool, norm: dict) -> Any:
    """The hub processor of `entry` (`pretrained`) or an offline one matching the built `model`."""
    if pretrained:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(entry.pretrained)
    return OFFLINE[entry.family](model.config, entry.image_size, norm)


def user_turn(prompt: str, visual: str = "image") -> list[dict[str, Any]]:
    """One user message: the image (or video), then `prompt`."""
    return [{"role": "user", "content": [{"type": visual}, {"type": "text", "text": prompt}]}]


def encoder(processor: Any, name: str, videos: bool) -> Encode:
    """`encode(visuals, prompts)`: `uint8[H, W, 3]` images or `uint8[T, H, W, 3]` videos (the model
    `name` takes videos only if `videos`), one prompt each -> the model's input (CPU tensors).

    Each sample is the chat template's user turn (its image or video, then its prompt) with the
    assistant's turn opened, as when the model is asked the prompt; shorter sequences are padded
    (`attention_mask` 0).
    """

    def encode(visuals: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if len(visuals) != len(prompts):
            raise InvalidRequest(
                f"got {len(visuals)} images or videos but {len(prompts)} prompts; give one prompt each"
            )
        dims = {np.ndim(v) for v in visuals}
        if not dims <= {3, 4} or len(dims) > 1:
            raise InvalidRequest(
                f"{name}: pass a batch of uint8 [H, W, 3] images or of [T, H, W, 3] videos; got ndim {dims}"
            )
        if empty := [i for i, v in enumerate(visuals) if 0 in np.shape(v)]:
            raise InvalidRequest(f"{name}: images or videos {empty} are empty (shapes with a 0); give real pixels")
        visual = "video" if dims == {4} else "image"
        if visual == "video" and not videos:
            raise InvalidRequest(f"{name} takes images here; video inputs are supported for Qwen2-VL and Qwen2.5-VL")
        texts = [
            processor.apply_chat_template(user_turn(p, visual), add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        return dict(processor(text=texts, return_tensors="pt", padding=True, **{f"{visual}s": list(visuals)}))

    return encode
