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

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from prisma_ray.data.synthetic import COLOURS, SHAPES, ShapesConfig, patch_factors, render_shapes
from prisma_ray.errors import InvalidRequest, PrismaRayError
from prisma_ray.interpret.evidence import LatentEvidence, active_mask, dim_pixels, upsample

if TYPE_CHECKING:
    import torch


class UnknownConcept(PrismaRayError, ValueError):
    """A text that an embedder with a closed set of labels cannot embed."""


class Embedder(Protocol):
    """Images and texts into one space (unit-norm rows)."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """`uint8[n, H, W, 3]` → `float32[n, d]`."""

    def embed_regions(self, images: np.ndarray, regions: np.ndarray) -> np.ndarray:
        """`uint8[n, H, W, 3]` and where to look in each (`bool[n, H, W]`, or `bool[n, h, w]` over a patch grid)
        → `float32[n, d]`: what each image shows there."""

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


def region_embeddings(embedder: Embedder, evidence: LatentEvidence, threshold: float = 0.2) -> np.ndarray:
    """`float32[n, d]`: the embeddings of the evidence's top images over their highlighted patches (those whose
    activation reaches `threshold` × the image's peak)."""
    return embedder.embed_regions(evidence.images, active_mask(evidence.maps, evidence.maps.shape[1:], threshold))


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
        dim: float = 0.25,
    ):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.template, self.batch_size, self.device, self.dim = template, batch_size, device, dim

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

    def embed_regions(self, images: np.ndarray, regions: np.ndarray) -> np.ndarray:
        """The images with everything outside their regions dimmed to `dim` of its brightness, embedded."""
        keep = regions if regions.shape[1:] == images.shape[1:3] else upsample(regions, images.shape[1:3])
        return self.embed_images(np.where(keep[..., None], images, dim_pixels(images, self.dim, "embedder dim")))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer([self.template.format(t) for t in texts])
            return unit(self.model.encode_text(tokens.to(self.device)).float().cpu().numpy())


class HookedModelFeatures:
    """Image features from a `HookedVisionModel` (on its device): the activations at `hook` averaged over the
    patch tokens, or over those of a region of each image (`regions`).

    Region pooling follows the patch-level probing of vision SAEs (saev, Stevens et al. 2025,
    https://github.com/OSU-NLP-Group/saev): a latent is explained by the tokens it fires on, not by the
    whole image, so other objects and the background do not blur its description. Each image's patch
    tokens are computed once and kept (the last `cache_size` images; 256 of DINOv2 ViT-S at 224 px take
    100 MB), since one image is the top image of many latents.
    """

    def __init__(self, model, hook: str, batch_size: int = 128, cache_size: int = 256):
        self.model, self.hook, self.batch_size, self.cache_size = model, hook, batch_size, cache_size
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        model.hook_point(hook)

    @staticmethod
    def _key(image: np.ndarray) -> bytes:
        return hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).digest()

    def remember(self, images: np.ndarray, tokens: np.ndarray) -> None:
        """Keep `tokens` (`float32[n, patch tokens, d]`: this hook's activations at the patch tokens of `uint8[n, H,
        W, 3]` `images`, computed elsewhere, e.g. by an extraction pass) as if `tokens(images)` had computed them,
        so that the model does not run again on images whose activations are already known (the last
        `cache_size` are kept). Raises `InvalidRequest` where the shapes do not match."""
        images, tokens = np.asarray(images), np.asarray(tokens, dtype=np.float32)
        if tokens.ndim != 3 or len(tokens) != len(images):
            raise InvalidRequest(
                f"HookedModelFeatures.remember: tokens of shape {tokens.shape} for {len(images)} images; pass "
                "[images, patch tokens, width], the hook's activations at the patch tokens of each image"
            )
        for image, acts in zip(images, tokens):
            key = self._key(image)
            self._cache[key] = acts
            self._cache.move_to_end(key)
        self._trim()

    def tokens(self, images: np.ndarray) -> np.ndarray:
        """`float32[n, patch tokens, d]`: the hook's activations at the patch tokens of `uint8[n, H, W, 3]`."""
        keys = [self._key(im) for im in images]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for i, acts in zip(chunk, self._run(images[chunk])):
                self._cache[keys[i]] = acts
        out = np.stack([self._cache[k] for k in keys]) if keys else np.zeros((0, 0, 0), np.float32)
        for k in keys:
            self._cache.move_to_end(k)
        self._trim()
        return out

    def _trim(self) -> None:
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _run(self, images: np.ndarray) -> np.ndarray:
        import torch

        from prisma_ray.data.transforms import crop_to_model
        from prisma_ray.models.inputs import PixelInputs

        spec, n_prefix = self.model.preprocess, self.model.token_layout.n_prefix
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            crops = np.stack([crop_to_model(im, spec) for im in images])
            _, cache = self.model.run_with_cache(
                PixelInputs(self.model, device=device).pixels(crops), names=[self.hook], stop_early=True
            )
            return cache[self.hook][:, n_prefix:].float().cpu().numpy()

    def region_weights(self, regions: np.ndarray) -> np.ndarray:
        """`float32[n, patch tokens]`: the fraction of each patch inside each region. `regions` is `bool[n, H, W]`
        over the images (cropped as the model crops them) or `bool[n, h, w]` over the model's patch grid."""
        from prisma_ray.data.transforms import crop_to_model

        layout = self.model.token_layout
        h, w = layout.grid
        regions = np.asarray(regions, dtype=bool)
        if regions.shape[1:] != (h, w):
            crops = [
                crop_to_model(np.repeat(r[..., None], 3, -1).astype(np.uint8) * 255, self.model.preprocess)
                for r in regions
            ]
            regions = np.stack([patch_factors((c[..., 0] > 127).astype(np.uint8), (h, w))[1] for c in crops])
        per_frame = regions.reshape(len(regions), 1, h * w).astype(np.float32)
        return np.repeat(per_frame, layout.time, axis=1).reshape(len(regions), -1)

    def __call__(self, images: np.ndarray, regions: np.ndarray | None = None) -> np.ndarray:
        """`float32[n, d]`: mean patch-token activation of each image, over the patches of its region (weighted
        by the fraction of each patch inside it; the whole image where the region is empty or not given)."""
        tokens = self.tokens(images)
        if regions is None:
            return tokens.mean(1)
        weights = self.region_weights(regions)
        empty = weights.sum(1) <= 0
        weights[empty] = 1.0
        return np.einsum("nt,ntd->nd", weights / weights.sum(1, keepdims=True), tokens).astype(np.float32)


class PrototypeEmbedder:
    """Labels embedded as the mean feature of their prototype images (a stand-in for a CLIP text tower).

    With `regions` (`bool[n, H, W]` per label, e.g. the object masks of rendered prototypes), a
    prototype's feature is pooled over its region only (`features(images, regions)`), as evidence is
    pooled over a latent's highlighted patches (`embed_regions`). Features are centred on the mean over
    all prototypes and whitened by their shrunk covariance (Ledoit-Wolf style shrinkage towards the
    identity) before normalising, so that what every prototype shares (the background, an object's
    presence) and directions of large but uninformative variance do not dominate the similarities: a
    cosine in this space is a nearest-class-mean rule in the metric of regularised discriminant
    analysis (Friedman 1989; Hastie, Tibshirani & Friedman, The Elements of Statistical Learning,
    4.3.1). The shrinkage is strong by default (`shrinkage` × the mean variance added to the diagonal):
    prototypes are tens per label against hundreds of feature dimensions, and weak shrinkage blows up
    the directions in which prototypes barely vary, which then dominate the evidence's embeddings
    (`benchmarks/explainer_agreement.py`: on DINOv2 agreement 0.6 at 0.1, 0.9-1.0 at 10).

    `reference` (`float32[m, d]`) holds the embeddings of all prototypes, the reference set against
    which `VocabularyExplainer` calibrates each label's similarities.
    """

    def __init__(
        self,
        features: Callable[..., np.ndarray],
        prototypes: Mapping[str, np.ndarray],
        regions: Mapping[str, np.ndarray] | None = None,
        shrinkage: float = 10.0,
    ):
        if not prototypes:
            raise InvalidRequest("PrototypeEmbedder: no prototypes; give at least one label with its images")
        missing = sorted(set(prototypes) - set(regions)) if regions is not None else []
        if missing:
            raise InvalidRequest(f"PrototypeEmbedder: regions lack the labels {missing}; give one mask per image")
        self.features = features
        self.labels = list(prototypes)
        feats = {
            label: np.asarray(
                features(images) if regions is None else features(images, regions[label]), dtype=np.float64
            )
            for label, images in prototypes.items()
        }
        pooled = np.concatenate(list(feats.values()))
        self.centre = pooled.mean(0)
        cov = np.cov(pooled - self.centre, rowvar=False).reshape(pooled.shape[1], pooled.shape[1])
        cov += shrinkage * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))
        values, vectors = np.linalg.eigh(cov)
        self.whiten = vectors / np.sqrt(values)
        self.label_embeddings = unit((np.stack([f.mean(0) for f in feats.values()]) - self.centre) @ self.whiten)
        self.reference = unit((pooled - self.centre) @ self.whiten)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        return unit((self.features(images) - self.centre) @ self.whiten)

    def embed_regions(self, images: np.ndarray, regions: np.ndarray) -> np.ndarray:
        """`float32[n, d]`: each image's feature pooled over its region (`bool[n, H, W]` or `bool[n, h, w]`)."""
        return unit((self.features(images, regions) - self.centre) @ self.whiten)

    def embed_patches(self, images: np.ndarray) -> np.ndarray | None:
        """`float32[n, patch tokens, d]`: every patch token embedded on its own; None where the features give no
        tokens (only `HookedModelFeatures` does)."""
        tokens = getattr(self.features, "tokens", None)
        return None if tokens is None else unit((tokens(images) - self.centre) @ self.whiten)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            named = [self.labels.index(label) for label in named_labels(text, self.labels)]
            if not named:
                raise UnknownConcept(f"PrototypeEmbedder: {text!r} names none of its labels {self.labels}")
            rows.append(self.label_embeddings[named].sum(0))
        return unit(np.stack(rows))


def factor_groups(labels: Sequence[str]) -> list[list[str]]:
    """The labels grouped by the factor they name: the shapes, the colours, then every other label on its own
    (an explanation names at most one label of a group)."""
    shapes = [label for label in labels if label in SHAPES]
    colours = [label for label in labels if label in COLOURS]
    return [g for g in (shapes, colours) if g] + [[label] for label in labels if label not in SHAPES + tuple(COLOURS)]


def synthetic_prototypes(
    labels: Sequence[str], base: ShapesConfig, n: int = 16, dim: float | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(images, regions)`: per label `uint8[n, H, W, 3]` `shapes` images rendered from `base` with that factor
    fixed, and `bool[n, H, W]`, where their objects are.

    A label is a shape (`circle`, ...) or a colour (`red`, ...). The other factor cycles through all of
    `base`'s values (image `i` of `red` shows `base.shapes[i % len(base.shapes)]`), so that each prototype
    set averages over the other factor instead of carrying a chance bias towards one of its values; size,
    position, rotation and background vary as in `base`. With `dim`, the background is dimmed to that
    fraction of its brightness.
    """
    images, regions = {}, {}
    for k, label in enumerate(labels):
        if label in SHAPES:
            fixed, other, values = {"shapes": (label,)}, "colours", base.colours
        elif label in COLOURS:
            fixed, other, values = {"colours": (label,)}, "shapes", base.shapes
        else:
            raise InvalidRequest(
                f"synthetic_prototypes: {label!r} is neither a shape {SHAPES} nor a colour {tuple(COLOURS)}"
            )
        renders = [  # independent draws per label
            render_shapes(base.model_copy(update={**fixed, other: (values[i % len(values)],)}), k * n + i)
            for i in range(n)
        ]
        shown = np.stack([image for image, *_ in renders])
        objects = np.stack([mask > 0 for _, mask, *_ in renders])
        if dim is not None:
            shown = np.where(objects[..., None], shown, dim_pixels(shown, dim, "synthetic_prototypes: dim"))
        images[label], regions[label] = shown, objects
    return images, regions
