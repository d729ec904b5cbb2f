"""Hugging Face multimodal language models (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) as `ModelSites`.

`blocks.*` hook the vision tower (Qwen's tower packs every image into one sequence of patches in
its merge-window order), `lm.blocks.*` the language model's decoder layers. The model's input is
its processor's output (`input_ids`, `attention_mask`, `pixel_values`, and `image_sizes` or
`image_grid_thw`, built by `encode(images, prompts)`: see `lmm_processor`); `forward` returns the logits. The `MultimodalLayout` of a batch is read off the
image token id in `input_ids`: Qwen images are one base view of `(h, w)` merged patches; LLaVA
images are the base view followed, for any-resolution inputs, by the high-resolution crops as one
grid whose rows each end with a newline token (the grid shape comes from the model's own packing).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..registry import ModelEntry
from ..sites import LanguageSites, LayerSites, ModelSites
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


def _grid_tokens(view: int, rows: int, cols: int) -> np.ndarray:
    """`[rows * cols, 4]` (kind, view, row, col) of a row-major grid of image tokens."""
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    out = np.stack([np.full(rr.size, TokenKind.PATCH), np.full(rr.size, view), rr.ravel(), cc.ravel()], axis=1)
    return out.astype(np.int16)


def _qwen_images(model: nn.Module, inputs: Inputs) -> list[np.ndarray]:
    merge = model.config.vision_config.spatial_merge_size
    grids = inputs["image_grid_thw"].tolist()
    return [_grid_tokens(0, t * h // merge, w // merge) for t, h, w in grids]


def _packed_tokens(packed: np.ndarray, side: int) -> np.ndarray:
    """(kind, view, row, col) of one LLaVA image from its packed ones (patches) and zeros (newlines)."""
    base = _grid_tokens(0, side, side)
    rest = packed[side * side :]
    crops = rest.any()
    out, row, col = [], 0, 0
    for value in rest:
        if value:
            out.append((TokenKind.PATCH, 1, row, col))
            col += 1
        else:
            out.append((TokenKind.NEWLINE, int(crops), row if crops else side - 1, -1))
            row, col = row + 1, 0
    return np.concatenate([base, np.asarray(out, dtype=np.int16).reshape(-1, 4)])


def _llava_images(model: nn.Module, inputs: Inputs) -> list[np.ndarray]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config, inner = model.config, model.model
    side = config.vision_config.image_size // config.vision_config.patch_size
    sizes = inputs["image_sizes"].cpu()
    counts = inputs.get("batch_num_images")
    patched = [True] * len(sizes) if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)]
    out = []
    for size, patch in zip(sizes, patched):
        n = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if patch else 1
        ones, newline = [torch.ones(n, side * side, 1)], torch.zeros(1)
        if hasattr(config, "vision_aspect_ratio"):
            packed, _ = inner.pack_image_features(ones, size[None], newline, config.vision_aspect_ratio)
        else:
            packed, _ = inner.pack_image_features(ones, size[None], config.vision_feature_select_strategy, newline)
        out.append(_packed_tokens(packed[0][:, 0].numpy(), side))
    return out


def assemble_layout(input_ids: torch.Tensor, image_token_id: int, images: list[np.ndarray]) -> MultimodalLayout:
    """Place each image's (kind, view, row, col) tokens, in order, on the image-token positions."""
    ids = input_ids.cpu().numpy()
    is_image = ids == image_token_id
    total = sum(len(image) for image in images)
    if is_image.sum() != total:
        raise ValueError(
            f"input_ids hold {int(is_image.sum())} image tokens (id {image_token_id}) but the images give {total}; "
            "build the inputs with the model's processor (one placeholder per image token)."
        )
    shape = ids.shape
    kind = np.full(shape, TokenKind.TEXT, dtype=np.int8)
    image, view, row, col = (np.full(shape, -1, dtype=np.int16) for _ in range(4))
    views: list[ImageView] = []
    queue = iter(images)
    for b in range(shape[0]):
        positions, index = np.flatnonzero(is_image[b]), 0
        while len(positions):
            tokens = next(queue)
            at, positions = positions[: len(tokens)], positions[len(tokens) :]
            kind[b, at], view[b, at], row[b, at], col[b, at] = tokens.T
            image[b, at] = index
            patches = tokens[tokens[:, 0] == TokenKind.PATCH]
            for v in np.unique(patches[:, 1]):
                grid = patches[patches[:, 1] == v, 2:].max(axis=0) + 1
                views.append(ImageView(sample=b, image=index, view=int(v), grid=(int(grid[0]), int(grid[1]))))
            index += 1
    view = view.astype(np.int8)
    return MultimodalLayout(kind=kind, image=image, view=view, row=row, col=col, views=tuple(views))


def _layout(model: nn.Module) -> Callable[[Inputs], MultimodalLayout]:
    images = _qwen_images if _is_qwen(model) else _llava_images

    def layout(inputs: Inputs) -> MultimodalLayout:
        with torch.no_grad():
            return assemble_layout(inputs["input_ids"], _image_token_id(model), images(model, inputs))

    return layout


def _forward(model: nn.Module) -> Callable[[Inputs], torch.Tensor]:
    qwen = _is_qwen(model)

    def forward(inputs: Inputs) -> torch.Tensor:
        kwargs = {"use_cache": False, **inputs}
        if qwen and "image_grid_thw" in kwargs and "mm_token_type_ids" not in kwargs:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == _image_token_id(model)).int()
        return model(**kwargs).logits

    return forward


def sites_from_lmm(model: nn.Module, entry: ModelEntry, processor: Any) -> ModelSites:
    """Describe a built multimodal model (its modules are used as they are) and its `processor`."""
    if entry.family not in NORMALISATION:
        raise ValueError(f"Unknown multimodal family {entry.family!r} of {entry.name!r}; use one of {sorted(NORMALISATION)}.")
    vision = _qwen_vision(model, entry) if _is_qwen(model) else _llava_vision(model, entry)
    preprocess = PreprocessSpec(
        modality="multimodal", image_size=(entry.image_size, entry.image_size), **NORMALISATION[entry.family]
    )
    return ModelSites(
        model=model,
        preprocess=preprocess,
        forward=_forward(model),
        lm=language_sites(model),
        layout=_layout(model),
        encode=encoder(processor),
        **vision,
    )


def build(entry: ModelEntry, pretrained: bool) -> ModelSites:
    """Create the entry's model: hub weights if `pretrained`, else random weights from `entry.config`."""
    import transformers

    if entry.architecture not in ARCHITECTURES:
        raise ValueError(f"Unsupported multimodal model class {entry.architecture!r}; supported: {', '.join(ARCHITECTURES)}.")
    model = instantiate(getattr(transformers, entry.architecture), entry, pretrained)
    return sites_from_lmm(model, entry, build_processor(model, entry, pretrained, NORMALISATION[entry.family]))
