"""Hugging Face multimodal language models (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) as `ModelSites`.

`blocks.*` hook the vision tower (Qwen's tower packs every image into one sequence of patches in
its merge-window order), `lm.blocks.*` the language model's decoder layers. The model's input is
its processor's output (`input_ids`, `attention_mask`, `pixel_values`, and `image_sizes` or
`image_grid_thw`; built by `encode(images, prompts)`, see `lmm_processor`); `forward` returns the
logits (with `logits_at`, those of the masked positions only: transformers' `logits_to_keep`, so the
vocabulary projection runs on them alone). `visual_features` runs the vision tower once and returns the
input with its outputs in place of the pixels (transformers' `mm_encoder_outputs`): the model's output on
it is the same, without the tower. The `MultimodalLayout` of a batch is read off the placeholder ids in `input_ids`: Qwen
images are one base view of `(h, w)` merged patches (videos: that grid per temporal patch of
frames, from `pixel_values_videos` and `video_grid_thw`); LLaVA
images are the base view followed, for any-resolution inputs, by the high-resolution crops as one
grid whose rows each end with a newline token (the grid shape comes from the model's own packing).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from prisma_ray.errors import InvalidRequest

from ..registry import ModelEntry
from ..sites import ENCODED, LanguageSites, LayerSites, ModelSites
from ..spec import ImageView, MultimodalLayout, PreprocessSpec, TokenKind, TokenLayout
from .hf_adapter import BACKBONES, CLIP_MEAN, CLIP_STD, HALF, instantiate, layer_sites, token_layout
from .lmm_processor import build_processor, encoder

ARCHITECTURES = (
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)
NORMALISATION = {
    "llava-next": dict(mean=CLIP_MEAN, std=CLIP_STD),
    "llava-onevision": dict(mean=HALF, std=HALF),
    "qwen2-vl": dict(mean=CLIP_MEAN, std=CLIP_STD),
}
Inputs = Mapping[str, torch.Tensor]


def _is_qwen(model: nn.Module) -> bool:
    return hasattr(model.model, "visual")


def _image_token_id(model: nn.Module) -> int:
    return int(model.config.image_token_id)


def language_sites(model: nn.Module) -> LanguageSites:
    """The decoder layers and final norm of the language model."""
    lm = model.model.language_model
    return LanguageSites(
        layers=[layer_sites(layer) for layer in lm.layers],
        final=lm.norm,
        d_model=int(lm.config.hidden_size),
        n_heads=int(lm.config.num_attention_heads),
    )


def _qwen_vision(model: nn.Module, entry: ModelEntry) -> dict:
    visual = model.model.visual
    config = visual.config
    return dict(
        layers=[LayerSites(block=b, attn_out=b.attn, mlp_in=b.mlp, mlp_out=b.mlp) for b in visual.blocks],
        final=visual.merger.ln_q,
        token_layout=TokenLayout(prefix=(), grid=(entry.image_size // entry.patch_size,) * 2),
        d_model=int(getattr(config, "embed_dim", config.hidden_size)),
        n_heads=int(config.num_heads),
    )


def _llava_vision(model: nn.Module, entry: ModelEntry) -> dict:
    tower = model.model.vision_tower
    layers_path, final_path = BACKBONES[type(tower).__name__]
    blocks = list(tower.get_submodule(layers_path))
    final = tower.get_submodule(final_path) if final_path else blocks[-1]
    return dict(
        layers=[layer_sites(block) for block in blocks],
        final=final,
        token_layout=token_layout(tower, entry),
        d_model=int(tower.config.hidden_size),
        n_heads=int(tower.config.num_attention_heads),
    )


def _grid_tokens(view: int, rows: int, cols: int, frame: int = -1) -> np.ndarray:
    """`[rows * cols, 5]` (kind, view, row, col, frame) of a row-major grid of image tokens."""
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    columns = [
        np.full(rr.size, TokenKind.PATCH),
        np.full(rr.size, view),
        rr.ravel(),
        cc.ravel(),
        np.full(rr.size, frame),
    ]
    return np.stack(columns, axis=1).astype(np.int16)


def _qwen_visuals(model: nn.Module, inputs: Inputs) -> dict[int, list[np.ndarray]]:
    """Tokens of each image (one merged grid) and each video (that grid per temporal patch), by placeholder id."""
    vision = model.config.vision_config
    merge, step = vision.spatial_merge_size, vision.temporal_patch_size
    images = [
        _grid_tokens(0, h // merge, w // merge)
        for _, h, w in inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist()  # host: read as a list
    ]
    videos = [
        np.concatenate([_grid_tokens(0, h // merge, w // merge, frame=i * step) for i in range(t)])
        for t, h, w in inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist()  # host: read as a list
    ]
    return {_image_token_id(model): images, int(model.config.video_token_id): videos}


def _packed_tokens(packed: np.ndarray, side: int) -> np.ndarray:
    """(kind, view, row, col, frame) of one LLaVA image from its packed ones (patches) and zeros (newlines)."""
    base = _grid_tokens(0, side, side)
    rest = packed[side * side :]
    crops = rest.any()
    out, row, col = [], 0, 0
    for value in rest:
        if value:
            out.append((TokenKind.PATCH, 1, row, col, -1))
            col += 1
        else:
            out.append((TokenKind.NEWLINE, int(crops), row if crops else side - 1, -1, -1))
            row, col = row + 1, 0
    return np.concatenate([base, np.asarray(out, dtype=np.int16).reshape(-1, 5)])


def _llava_visuals(model: nn.Module, inputs: Inputs) -> dict[int, list[np.ndarray]]:
    return {_image_token_id(model): _llava_images(model, inputs)}


def _llava_images(model: nn.Module, inputs: Inputs) -> list[np.ndarray]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config, inner = model.config, model.model
    side = config.vision_config.image_size // config.vision_config.patch_size
    sizes = inputs["image_sizes"].cpu()
    counts = inputs.get("batch_num_images")
    patched = [True] * len(sizes) if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)]
    out = []
    for size, patch in zip(sizes, patched):
        n = (
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            if patch
            else 1
        )
        ones, newline = [torch.ones(n, side * side, 1)], torch.zeros(1)  # host: counts tokens, no model tensor
        if hasattr(config, "vision_aspect_ratio"):
            packed, _ = inner.pack_image_features(ones, size[None], newline, config.vision_aspect_ratio)
        else:
            packed, _ = inner.pack_image_features(ones, size[None], config.vision_feature_select_strategy, newline)
        out.append(_packed_tokens(packed[0][:, 0].numpy(), side))
    return out


def assemble_layout(input_ids: torch.Tensor, visuals: Mapping[int, list[np.ndarray]]) -> MultimodalLayout:
    """Place the (kind, view, row, col, frame) tokens of every image and video on their placeholders.

    `visuals` maps a placeholder token id (image, video) to the token arrays of the batch's images or
    videos of that kind, in order; each fills the next run of its placeholder positions.
    """
    ids = input_ids.cpu().numpy()
    placed = []
    for token_id, items in visuals.items():
        is_token = ids == token_id
        total = sum(len(tokens) for tokens in items)
        if is_token.sum() != total:
            raise InvalidRequest(
                f"input_ids hold {int(is_token.sum())} placeholder tokens of id {token_id} but the images or videos "
                f"give {total}; build the inputs with the model's processor (one placeholder per image token)."
            )
        queue = iter(items)
        for b in range(ids.shape[0]):
            positions = np.flatnonzero(is_token[b])
            while len(positions):
                tokens = next(queue)
                placed.append((b, positions[: len(tokens)], tokens))
                positions = positions[len(tokens) :]
    kind = np.full(ids.shape, TokenKind.TEXT, dtype=np.int8)
    image, view, row, col, frame = (np.full(ids.shape, -1, dtype=np.int16) for _ in range(5))
    views: list[ImageView] = []
    index = np.zeros(ids.shape[0], dtype=int)
    for b, at, tokens in sorted(placed, key=lambda p: (p[0], p[1][0])):
        kind[b, at], view[b, at], row[b, at], col[b, at], frame[b, at] = tokens.T
        image[b, at] = index[b]
        patches = tokens[tokens[:, 0] == TokenKind.PATCH]
        for v in np.unique(patches[:, 1]):
            grid = patches[patches[:, 1] == v]
            rows, cols = grid[:, 2:4].max(axis=0) + 1
            frames = len(np.unique(grid[:, 4]))
            views.append(
                ImageView(sample=b, image=int(index[b]), view=int(v), grid=(int(rows), int(cols)), frames=frames)
            )
        index[b] += 1
    return MultimodalLayout(
        kind=kind, image=image, view=view.astype(np.int8), row=row, col=col, frame=frame, views=tuple(views)
    )


def _layout(model: nn.Module) -> Callable[[Inputs], MultimodalLayout]:
    visuals = _qwen_visuals if _is_qwen(model) else _llava_visuals

    def layout(inputs: Inputs) -> MultimodalLayout:
        with torch.no_grad():
            return assemble_layout(inputs["input_ids"], visuals(model, inputs))

    return layout


def _forward(model: nn.Module) -> Callable[..., torch.Tensor]:
    qwen = _is_qwen(model)

    def forward(inputs: Inputs, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"use_cache": False, **inputs}
        if qwen and "mm_token_type_ids" not in kwargs:
            ids = kwargs["input_ids"]
            kwargs["mm_token_type_ids"] = (ids == _image_token_id(model)).int() + 2 * (
                ids == model.config.video_token_id
            ).int()
        if logits_at is not None:  # the vocabulary projection at these positions only: [N, vocab]
            kwargs["logits_to_keep"] = logits_at
        return model(**kwargs).logits

    return forward


PIXELS = {"image": ("pixel_values", "get_image_features"), "video": ("pixel_values_videos", "get_video_features")}


def _visual_features(model: nn.Module) -> Callable[[Inputs], dict[str, Any]]:
    """`inputs -> inputs` with the pixels replaced by the vision tower's outputs (`mm_encoder_outputs`), computed
    by the model's own `get_image_features` / `get_video_features` from the inputs they name; only the projected
    features the language model takes (`pooler_output`) are kept."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = model.model

    def features(inputs: Inputs) -> dict[str, Any]:
        out = {k: v for k, v in inputs.items() if k not in {key for key, _ in PIXELS.values()}}
        encoded = {}
        for kind, (key, method) in PIXELS.items():
            if inputs.get(key) is None or not hasattr(inner, method):
                continue
            encode = getattr(inner, method)
            params = list(inspect.signature(encode).parameters.values())[1:]  # after the pixels
            named = {p.name: inputs[p.name] for p in params if p.kind != p.VAR_KEYWORD and p.name in inputs}
            pooled = encode(inputs[key], **named, return_dict=True).pooler_output
            encoded[kind] = BaseModelOutputWithPooling(pooler_output=pooled)  # not the tower's hidden states
        return {**out, ENCODED: encoded}

    return features


def sites_from_lmm(model: nn.Module, entry: ModelEntry, processor: Any) -> ModelSites:
    """Describe a built multimodal model (its modules are used as they are) and its `processor`."""
    if entry.family not in NORMALISATION:
        raise InvalidRequest(
            f"Unknown multimodal family {entry.family!r} of {entry.name!r}; use one of {sorted(NORMALISATION)}."
        )
    vision = _qwen_vision(model, entry) if _is_qwen(model) else _llava_vision(model, entry)
    preprocess = PreprocessSpec(
        modality="multimodal", image_size=(entry.image_size, entry.image_size), **NORMALISATION[entry.family]
    )
    return ModelSites(
        model=model,
        preprocess=preprocess,
        forward=_forward(model),
        lm=language_sites(model),
        visual_features=_visual_features(model),
        layout=_layout(model),
        encode=encoder(processor, entry.name, videos=_is_qwen(model)),
        tokenizer=processor.tokenizer,
        **vision,
    )


def build(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Create the entry's model: hub weights if `pretrained`, else random weights from `entry.config`."""
    import transformers

    if entry.architecture not in ARCHITECTURES:
        raise InvalidRequest(
            f"Unsupported multimodal model class {entry.architecture!r}; supported: {', '.join(ARCHITECTURES)}."
        )
    model = instantiate(getattr(transformers, entry.architecture), entry, pretrained)
    return sites_from_lmm(model, entry, build_processor(model, entry, pretrained, NORMALISATION[entry.family]))
