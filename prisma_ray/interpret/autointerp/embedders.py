"""Image-text embedders for the offline explainer and the scorers: a shared space for images and labels.

- `OpenClipEmbedder`: an OpenCLIP model's image and text towers (the real thing).
- `PrototypeEmbedder`: a stand-in for a text tower where there is none. Each label is embedded as
  the mean image embedding of prototype images rendered to show that concept (on the synthetic
  datasets: `synthetic_prototypes`), through any image feature extractor (e.g. `HookedModelFeatures`
  over the toy model). It only knows the labels it was given prototypes for; a free text is
  embedded as the mean of the known labels it names, and a text naming none is an error.

Every embedding is float32 with unit L2 norm, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from prisma_ray.data.synthetic import COLOURS, SHAPES, ShapesConfig, render_shapes
from prisma_ray.errors import InvalidRequest, PrismaRayError
from prisma_ray.interpret.evidence import dim_pixels

if TYPE_CHECKING:
    import torch


class UnknownConcept(PrismaRayError, ValueError):
    """A text that an embedder with a closed set of labels cannot embed."""


class Embedder(Protocol):
    """Images and texts into one space (unit-norm rows)."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """`uint8[n, H, W, 3]` → `float32[n, d]`."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """`m` texts → `float32[m, d]`."""


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


def named_labels(text: str, labels: Sequence[str]) -> list[str]:
    """The `labels` that `text` names as whole words (case-insensitive, plural `s` allowed)."""
    return [label for label in labels if re.search(rf"\b{re.escape(label.lower())}s?\b", text.lower())]


class OpenClipEmbedder:
    """An OpenCLIP model's image tower and text tower; texts are put into `template` first."""

    def __init__(
        self,
        model,
        preprocess: Callable,
        tokenizer: Callable,
        template: str = "a photo of {}.",
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.template, self.batch_size, self.device = template, batch_size, device

    @classmethod
    def from_name(
        cls, name: str, pretrained: str | None, template: str = "a photo of {}.", device: str | torch.device = "cpu"
    ) -> OpenClipEmbedder:
        """`open_clip.create_model_and_transforms(name, pretrained)` on `device`; `pretrained=None` gives random
        weights offline."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        return cls(model, preprocess, open_clip.get_tokenizer(name), template, device=device)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        import torch
        from PIL import Image

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = torch.stack(
                    [self.preprocess(Image.fromarray(im)) for im in images[start : start + self.batch_size]]
                )
                out.append(self.model.encode_image(x.to(self.device)).float().cpu().numpy())
        return unit(np.concatenate(out))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer([self.template.format(t) for t in texts])
            return unit(self.model.encode_text(tokens.to(self.device)).float().cpu().numpy())


class HookedModelFeatures:
    """Image features from a `HookedVisionModel` (on its device): the activations at `hook` averaged over patch
    tokens."""

    def __init__(self, model, hook: str, batch_size: int = 128):
        self.model, self.hook, self.batch_size = model, hook, batch_size
        model.hook_point(hook)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        from prisma_ray.data.transforms import crop_to_model
        from prisma_ray.models.inputs import PixelInputs

        spec, n_prefix = self.model.preprocess, self.model.token_layout.n_prefix
        device = next(self.model.parameters()).device
        inputs, out = PixelInputs(self.model, device=device), []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                crops = np.stack([crop_to_model(im, spec) for im in images[start : start + self.batch_size]])
                _, cache = self.model.run_with_cache(inputs.pixels(crops), names=[self.hook], stop_early=True)
                out.append(cache[self.hook][:, n_prefix:].float().mean(1).cpu().numpy())
        return np.concatenate(out)


class PrototypeEmbedder:
    """Labels embedded as the mean feature of their prototype images (a stand-in for a CLIP text tower).

    Features are centred on the mean over all prototype images before normalising, so that what all
    images share (the background, the object's presence) does not dominate the similarities.
    """

    def __init__(
        self, features: Callable[[np.ndarray], np.ndarray], prototypes: Mapping[str, np.ndarray], shrinkage: float = 0.1
    ):
        if not prototypes:
            raise InvalidRequest("PrototypeEmbedder: no prototypes; give at least one label with its images")
        self.features = features
        self.labels = list(prototypes)
        feats = {label: np.asarray(features(images), dtype=np.float64) for label, images in prototypes.items()}
        pooled = np.concatenate(list(feats.values()))
        self.centre = pooled.mean(0)
        cov = np.cov(pooled - self.centre, rowvar=False).reshape(pooled.shape[1], pooled.shape[1])
        cov += shrinkage * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))
        values, vectors = np.linalg.eigh(cov)
        self.whiten = vectors / np.sqrt(values)
        self.label_embeddings = unit((np.stack([f.mean(0) for f in feats.values()]) - self.centre) @ self.whiten)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        return unit((self.features(images) - self.centre) @ self.whiten)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            named = [self.labels.index(label) for label in named_labels(text, self.labels)]
            if not named:
                raise UnknownConcept(f"PrototypeEmbedder: {text!r} names none of its labels {self.labels}")
            rows.append(self.label_embeddings[named].sum(0))
        return unit(np.stack(rows))


def synthetic_prototypes(
    labels: Sequence[str], base: ShapesConfig, n: int = 16, dim: float | None = 0.25
) -> dict[str, np.ndarray]:
    """`uint8[n, H, W, 3]` per label: `shapes` images rendered from `base` with that factor fixed.

    A label is a shape (`circle`, ...) or a colour (`red`, ...); every other factor varies as in `base`.
    With `dim`, the background is dimmed to that fraction of its brightness, as `mask_images` shows
    a latent's top images with the inactive patches dimmed.
    """
    out = {}
    for k, label in enumerate(labels):
        if label in SHAPES:
            cfg = base.model_copy(update={"shapes": (label,)})
        elif label in COLOURS:
            cfg = base.model_copy(update={"colours": (label,)})
        else:
            raise InvalidRequest(
                f"synthetic_prototypes: {label!r} is neither a shape {SHAPES} nor a colour {tuple(COLOURS)}"
            )
        renders = [render_shapes(cfg, k * n + i) for i in range(n)]  # independent draws per label
        images = np.stack([image for image, *_ in renders])
        if dim is not None:
            objects = np.stack([mask > 0 for _, mask, *_ in renders])[..., None]
            images = np.where(objects, images, dim_pixels(images, dim, "synthetic_prototypes: dim"))
        out[label] = images
    return out
